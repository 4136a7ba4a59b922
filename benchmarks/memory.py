"""Memory of the full-size training step by order, microbatches and remat policy; what fits where.

  .venv/bin/python benchmarks/memory.py measure [--configs cifar10_ddpmpp,cifar10_ncsnpp]
  .venv/bin/python benchmarks/memory.py timing            # time cost of each setting (tiny DDPM++)
  .venv/bin/python benchmarks/memory.py recommend [--memory_gb 40]

measure: the whole jitted training step (losses.get_step_fn with Adam and EMA, the state donated)
of the full-size CIFAR-10 configs at the paper's batch (128 on one device),
compiled only (abstract state, no accelerator needed; the microbatches as the lax.scan that
accelerators run): peak = arguments + outputs - aliased + XLA
temp bytes, as `compile().memory_analysis()` reports them for this backend. Rows are appended to
--csv as they finish, so an interrupted run continues where it stopped.
timing: median step time of the same settings on the tiny DDPM++ (batch 16) on this machine (on
a CPU the microbatches unrolled, losses.UNROLLED_BACKENDS), as a ratio to the plain step of the
same order, timed round-robin with it.
recommend: for each order and device memory, the fastest measured setting whose peak leaves 10%
headroom (--results, default the committed table of the README's run).
"""
import argparse
import csv
import os
import time

import bench_common as bc  # also puts the repo root on sys.path
import jax

import losses
import sde_lib
import train_lib
import train_state as ts
from models import utils as mutils

GiB = 2. ** 30
FULL = {'cifar10_ddpmpp': 'vp.cifar10_ddpmpp_continuous',
        'cifar10_ncsnpp': 've.cifar10_ncsnpp_continuous'}
FIELDS = ['config', 'batch', 'order', 'n_microbatches', 'remat', 'peak_gib', 'temp_gib',
          'args_gib', 'compile_s', 'time_ratio']
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'memory_cifar10.csv')
DEVICE_GB = (16, 24, 40, 80)


def config_for(name, batch, order, n_micro, remat):
  import importlib  # pylint: disable=import-outside-toplevel
  config = (importlib.import_module(f'configs.{FULL[name]}').getconfig_for() if name in FULL
            else bc.tiny_config(name, batch))
  t = config.training
  t.batch_size, t.score_matching_order, t.n_microbatches, t.remat = batch, order, n_micro, remat
  t.reduce_mean = t.reduce_mean or order > 1
  return config


def train_call(config, abstract, donate=True):
  """(jitted training step, state donated unless not `donate`; state; batch) of config:
  train_lib's step (the body of its n_jitted_steps scan; the scan wrapper itself took 5x longer to
  compile on CPU)."""
  sde, _ = sde_lib.get_sde(config)
  model = mutils.get_model(config.model.name)(config=config)
  tx = losses.get_optimizer(config)
  call = jax.jit(train_lib.get_step_fns(config, sde, model, tx)[0],
                 donate_argnums=0 if donate else ())
  shape = (config.training.batch_size,) + mutils.get_data_shape(config)
  if abstract:
    def init():
      model_state, params = mutils.init_model(jax.random.PRNGKey(0), config)[1:]
      return ts.create_train_state(jax.random.PRNGKey(1), config, model, params, model_state, tx)
    return call, jax.eval_shape(init), {'image': jax.ShapeDtypeStruct(shape, 'float32')}
  state = train_lib.build_state(config, jax.random.PRNGKey(0))[2]
  return call, state, {'image': jax.random.uniform(jax.random.PRNGKey(1), shape)}


def measure(name, batch, order, n_micro, remat):
  config = config_for(name, batch, order, n_micro, remat)
  call, state, data = train_call(config, abstract=True)
  start = time.perf_counter()
  mem = call.lower(state, data).compile().memory_analysis()
  args = mem.argument_size_in_bytes
  peak = args + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return dict(peak_gib=peak / GiB, temp_gib=mem.temp_size_in_bytes / GiB, args_gib=args / GiB,
              compile_s=time.perf_counter() - start)


def step_times(order, settings, repeats):
  """{(n_microbatches, remat): median step time / the plain step's} on the tiny DDPM++ (batch
  16), every setting of the order timed round-robin with the plain step."""
  calls = {}
  for n, remat in [(1, 'none')] + [x for x in settings if x != (1, 'none')]:
    call, state, data = train_call(config_for('tiny_ddpmpp', 16, order, n, remat), False, False)
    calls[(n, remat)] = (call, (state, data))
  times = bc.interleaved_times(calls, repeats)
  return {k: times[k][0] / times[(1, 'none')][0] for k in calls}


def read_rows(path):
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _append(path, row):
  new = not os.path.exists(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a', newline='') as f:
    w = csv.DictWriter(f, FIELDS)
    if new:
      w.writeheader()
    w.writerow({k: (f'{v:.4g}' if isinstance(v, float) else v) for k, v in row.items()})


def _key(row):
  return tuple(str(row[k]) for k in ('config', 'batch', 'order', 'n_microbatches', 'remat'))


def run_grid(args, configs, batch, measure_row):
  done = {_key(r) for r in read_rows(args.csv)}
  for name in configs:
    for order in args.orders:
      for remat in args.remats:
        for n in args.microbatches:
          row = dict(config=name, batch=batch, order=order, n_microbatches=n, remat=remat)
          if _key(row) in done:
            continue
          row.update(measure_row(name, order, n, remat))
          print(', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                          for k, v in row.items()), flush=True)
          _append(args.csv, row)


def recommend(rows, memory_gb, headroom=0.9):
  """{(config, order): (row, time factor or None)}: per config and order the measured setting
  that fits memory_gb with 10% headroom at the lowest time factor (fewest microbatches on ties).

  The time factor of (n, remat) is time(n, none) / time(1, none) x time(1, remat) / time(1, none)
  from the tiny-config timing rows; None where one of them was not measured."""
  timing = {(int(r['order']), int(r['n_microbatches']), r['remat']): float(r['time_ratio'])
            for r in rows if r['config'] == 'tiny_ddpmpp' and r.get('time_ratio')}
  out = {}
  for r in rows:
    if r['config'] == 'tiny_ddpmpp' or float(r['peak_gib']) * GiB > headroom * memory_gb * 1e9:
      continue
    o, n, remat = int(r['order']), int(r['n_microbatches']), r['remat']
    parts = [1. if n == 1 else timing.get((o, n, 'none')),
             1. if remat == 'none' else timing.get((o, 1, remat))]
    factor = None if None in parts else parts[0] * parts[1]
    key = (r['config'], o)
    rank = (1. if factor is None else factor, n)
    if key not in out or rank < out[key][2]:
      out[key] = (r, factor, rank)
  return {k: v[:2] for k, v in out.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('what', choices=['measure', 'timing', 'recommend'])
  p.add_argument('--configs', default='cifar10_ddpmpp,cifar10_ncsnpp')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--orders', default='3,2,1')
  p.add_argument('--microbatches', default='1,2,4,8,16')
  p.add_argument('--remats', default='none')
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--csv', default=bc.default_out('memory_cifar10.csv'))
  p.add_argument('--results', default=RESULTS, help='table read by recommend')
  p.add_argument('--memory_gb', default=','.join(map(str, DEVICE_GB)))
  args = p.parse_args()
  args.orders = [int(o) for o in args.orders.split(',')]
  args.microbatches = [int(n) for n in args.microbatches.split(',')]
  args.remats = args.remats.split(',')
  print(bc.machine_line(), flush=True)
  if args.what == 'measure':
    losses.UNROLLED_BACKENDS = ()  # the program accelerators run (a lax.scan of microbatches)
    run_grid(args, args.configs.split(','), args.batch,
             lambda name, o, n, remat: measure(name, args.batch, o, n, remat))
  elif args.what == 'timing':
    done = {_key(r) for r in read_rows(args.csv)}
    for order in args.orders:
      settings = [(n, r) for r in args.remats for n in args.microbatches]
      for (n, remat), ratio in step_times(order, settings, args.repeats).items():
        row = dict(config='tiny_ddpmpp', batch=16, order=order, n_microbatches=n, remat=remat,
                   peak_gib=0., temp_gib=0., args_gib=0., compile_s=0., time_ratio=ratio)
        if _key(row) not in done:
          print(row, flush=True)
          _append(args.csv, row)
  else:
    rows = read_rows(args.results)
    for gb in (int(g) for g in args.memory_gb.split(',')):
      for (name, order), (r, factor) in sorted(recommend(rows, gb).items()):
        cost = 'step time not measured' if factor is None else f'step time x{factor:.2f}'
        print(f'{gb} GB, {name}, order {order}: n_microbatches={r["n_microbatches"]}, '
              f'remat={r["remat"]} (peak {float(r["peak_gib"]):.1f} GiB, {cost})')
      for name in sorted({r['config'] for r in rows} - {'tiny_ddpmpp'}):
        for order in (1, 2, 3):
          if (name, order) not in recommend(rows, gb):
            measured = any(r['config'] == name and int(r['order']) == order for r in rows)
            print(f'{gb} GB, {name}, order {order}: '
                  + ('no measured setting fits' if measured else 'not measured'))


if __name__ == '__main__':
  main()
