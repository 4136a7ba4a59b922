"""Memory of the full-size training step by order, microbatches and remat policy; what fits where.

  .venv/bin/python benchmarks/memory.py measure [--jobs 2]   # full-size peak memory (compile only)
  .venv/bin/python benchmarks/memory.py timing               # time cost of each setting (tiny)
  .venv/bin/python benchmarks/memory.py recommend [--memory_gb 40]
  .venv/bin/python benchmarks/memory.py doc [--write | --check]   # docs/performance.md's section

measure: the whole jitted training step (losses.get_step_fn with Adam and EMA, the state donated)
of the full-size CIFAR-10 configs at batch 128 on one device (the batch of the paper's code for
orders 1 and 2; its order-3 configs use 48 to fit memory), compiled only
(abstract state, no accelerator needed; the microbatches as the lax.scan that accelerators run):
peak = arguments + outputs - aliased + XLA temp bytes, as `compile().memory_analysis()` reports
them for this backend. Each row compiles in its own process (--jobs at once) with LLVM's
optimisations off (FAST_COMPILE: buffer assignment, hence the peak, is decided before them; the
same bytes either way, 15% less compile time for order 1). Rows are appended to --csv as they
finish, so an interrupted run continues where it stopped.
timing: median step time of each setting on the tiny DDPM++ (batch 16) on this machine (on a CPU
the microbatches unrolled, parallel.UNROLLED_BACKENDS), as a ratio to the plain step of the same
order, timed round-robin with it.
recommend: for each order and device memory, the fastest measured setting whose peak leaves 10%
headroom (--results, default the committed table, benchmarks/results/memory_cifar10.csv).
doc: the `memory` section of docs/performance.md (tables of memory, time cost and
recommendations) from --results.
"""
import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys
import time

import bench_common as bc  # also puts the repo root on sys.path
import jax

import losses
import optim
import parallel
import doc_sections
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
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
SECTION = 'memory'  # the generated section of DOC (doc_sections)
DOC = os.path.join(doc_sections.DOCS, 'performance.md')
REMATS = tuple(losses.REMAT_POLICIES)  # none, convs, nothing
# timing: the most microbatches timed per order. On a CPU they are unrolled, and 16 unrolled copies
# of the tiny order-3 step took over 5 min and 15 GB to compile (4: 133 s, 3.4 GB).
MOST_TIMED = {1: 16, 2: 16, 3: 8}


def config_for(name, batch, order, n_micro, remat):
  import importlib
  config = (importlib.import_module(f'configs.{FULL[name]}').get_config() if name in FULL
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
  tx = optim.get_optimizer(config)
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


def measure_in_child(name, batch, order, n_micro, remat):
  """measure() in a fresh process with FAST_COMPILE (None, after printing why, if it failed)."""
  env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE}'.strip())
  cmd = [sys.executable, os.path.abspath(__file__), 'row', '--configs', name, '--batch', str(batch),
         '--orders', str(order), '--microbatches', str(n_micro), '--remats', remat]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if r.returncode:
    print(f'{name} order {order} n_microbatches={n_micro} remat={remat} failed:\n'
          f'{r.stderr[-2000:]}', flush=True)
    return None
  return json.loads(r.stdout.strip().splitlines()[-1])


def run_grid(args):
  """measure() every setting of the grid not yet in --csv, --jobs at a time, slowest first: each
  order at every --microbatches without remat, and with each other --remats at --remat_at."""
  done = {_key(r) for r in read_rows(args.csv)}
  todo = [dict(config=name, batch=args.batch, order=o, n_microbatches=n, remat=remat)
          for o in sorted(args.orders, reverse=True) for n in args.microbatches
          for remat in args.remats for name in args.configs.split(',')
          if remat == 'none' or n in args.remat_at]
  todo = [row for row in todo if _key(row) not in done]
  failed = 0
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(measure_in_child, r['config'], r['batch'], r['order'],
                           r['n_microbatches'], r['remat']): r for r in todo}
    for future in concurrent.futures.as_completed(futures):
      row, result = futures[future], future.result()
      if result is None:
        failed += 1
        continue
      row.update(result)
      print(', '.join(f'{k}={bc.fmt(v, 4)}' for k, v in row.items()), flush=True)
      _append(args.csv, row)
  if failed:
    raise SystemExit(f'{failed} of {len(todo)} settings failed (above); rerun to retry them.')


def recommend(rows, memory_gb, headroom=0.9):
  """{(config, order): (row, time factor or None)}: per config and order the measured setting
  that fits memory_gb with 10% headroom at the lowest time factor (fewest microbatches on ties).

  The time factor of (n, remat) is time(n, none) / time(1, none) x time(1, remat) / time(1, none)
  from the tiny-config timing rows; None where one of them was not measured (ranked after every
  setting with a measured factor). Factors below 1 rank as 1: unrolled slices of the tiny model
  can run faster on a CPU (cache), which says nothing of an accelerator."""
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
    rank = (factor is None, max(factor or 0., 1.), n)
    if key not in out or rank < out[key][2]:
      out[key] = (r, factor, rank)
  return {k: v[:2] for k, v in out.items()}


def _gib(rows, name, order, n, remat):
  peak = [float(r['peak_gib']) for r in rows if _key(r) == (name, '128', str(order), str(n), remat)]
  return f'{peak[0]:.1f}' if peak else '-'


def section_text(rows, device_gb=DEVICE_GB):
  """docs/performance.md's memory section: full-size peak GiB by setting, tiny-model time cost, the
  recommendation per device size (rows as read_rows gives them)."""
  full = [r for r in rows if r['config'] in FULL]
  names = [n for n in FULL if any(r['config'] == n for r in full)]
  ns = sorted({int(r['n_microbatches']) for r in full})
  settings = sorted({(int(r['order']), r['remat']) for r in full},
                    key=lambda x: (x[0], REMATS.index(x[1])))
  label = ' / '.join({'cifar10_ddpmpp': 'DDPM++', 'cifar10_ncsnpp': 'NCSN++'}[n] for n in names)
  lines = [f'Peak GiB of the full-size training step, batch 128 on one device ({label}):', '',
           '| order | remat | ' + ' | '.join(f'{n} microbatch{"es" * (n > 1)}' for n in ns) + ' |',
           '|---|---|' + '---|' * len(ns)]
  for order, remat in settings:
    lines.append(f'| {order} | {remat} | ' + ' | '.join(
      ' / '.join(_gib(full, name, order, n, remat) for name in names) for n in ns) + ' |')
  timing = {(int(r['order']), int(r['n_microbatches']), r['remat']): float(r['time_ratio'])
            for r in rows if r['config'] == 'tiny_ddpmpp' and r.get('time_ratio')}
  t_ns = sorted({k[1] for k in timing if k[1] > 1})
  t_remats = [x for x in REMATS[1:] if any(k[2] == x for k in timing)]
  lines += ['', 'Step time of each setting on the tiny DDPM++ (batch 16, this CPU, microbatches '
            'unrolled), over the plain step of the same order timed round-robin with it:', '',
            '| order | ' + ' | '.join([f'{n} microbatches' for n in t_ns]
                                     + [f'remat {x}' for x in t_remats]) + ' |',
            '|---|' + '---|' * (len(t_ns) + len(t_remats))]
  for order in sorted({k[0] for k in timing}):
    cells = [timing.get((order, n, 'none')) for n in t_ns] + [
      timing.get((order, 1, x)) for x in t_remats]
    lines.append(f'| {order} | ' + ' | '.join('-' if c is None else f'{c:.2f}x' for c in cells)
                 + ' |')
  lines += ['', 'Recommended (`memory.py recommend`: the fastest measured setting whose peak '
            'leaves 10% headroom, a factor below 1x counted as 1x, fewest microbatches on ties; '
            'time = microbatches x remat factors above; 4 x 32 = 4 microbatches of 32):', '',
            '| device | model | order 1 | order 2 | order 3 |', '|---|---|---|---|---|']
  for gb in device_gb:
    plan = recommend(rows, gb)
    for name in names:
      cells = []
      for order in (1, 2, 3):
        if (name, order) not in plan:
          cells.append('nothing measured fits')
          continue
        r, factor = plan[(name, order)]
        cells.append(f'{r["n_microbatches"]} x {128 // int(r["n_microbatches"])}, remat '
                     f'{r["remat"]} ({float(r["peak_gib"]):.1f} GiB, '
                     + ('time -' if factor is None else f'time x{factor:.2f}') + ')')
      lines.append(f'| {gb} GB | {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('what', choices=['measure', 'timing', 'recommend', 'doc', 'row'])
  p.add_argument('--configs', default='cifar10_ddpmpp,cifar10_ncsnpp')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--orders', default='3,2,1')
  p.add_argument('--microbatches', default='1,2,4,8,16')
  p.add_argument('--remats', default=','.join(REMATS))
  p.add_argument('--remat_at', default='1', help='measure: microbatches measured with remat')
  p.add_argument('--jobs', type=int, default=2, help='measure: settings compiled at once')
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--csv', default=bc.default_out('memory_cifar10.csv'), help='rows written')
  p.add_argument('--results', default=RESULTS, help='rows read by recommend and doc')
  p.add_argument('--memory_gb', default=','.join(map(str, DEVICE_GB)))
  p.add_argument('--write', action='store_true', help='doc: rewrite its section of docs/performance.md')
  p.add_argument('--check', action='store_true', help='doc: exit 1 if docs/performance.md differs')
  args = p.parse_args()
  args.orders = [int(o) for o in args.orders.split(',')]
  args.microbatches = [int(n) for n in args.microbatches.split(',')]
  args.remats = args.remats.split(',')
  args.remat_at = [int(n) for n in args.remat_at.split(',')]
  if args.what == 'row':  # one setting, in the child process of measure_in_child
    parallel.UNROLLED_BACKENDS = ()  # the program accelerators run (a lax.scan of microbatches)
    print(json.dumps(measure(args.configs, args.batch, args.orders[0], args.microbatches[0],
                             args.remats[0])))
    return
  if args.what == 'doc':
    doc_sections.write_or_check(SECTION, section_text(read_rows(args.results)), args.write,
                                args.check, DOC)
    return
  print(bc.machine_line(), flush=True)
  if args.what == 'measure':
    run_grid(args)
  elif args.what == 'timing':
    done = {_key(r) for r in read_rows(args.csv)}
    for order in args.orders:
      settings = [(n, 'none') for n in args.microbatches if n <= MOST_TIMED[order]] + [
        (1, r) for r in args.remats]
      todo = [(n, r) for n, r in dict.fromkeys(settings) if (n, r) != (1, 'none') and _key(dict(
        config='tiny_ddpmpp', batch=16, order=order, n_microbatches=n, remat=r)) not in done]
      if not todo:
        continue
      for (n, remat), ratio in step_times(order, todo, args.repeats).items():
        row = dict(config='tiny_ddpmpp', batch=16, order=order, n_microbatches=n, remat=remat,
                   peak_gib=0., temp_gib=0., args_gib=0., compile_s=0., time_ratio=ratio)
        if _key(row) not in done:
          print(', '.join(f'{k}={bc.fmt(v, 4)}' for k, v in row.items()), flush=True)
          _append(args.csv, row)
  else:
    rows = read_rows(args.results)
    for gb in (int(g) for g in args.memory_gb.split(',')):
      plan = recommend(rows, gb)
      for (name, order), (r, factor) in sorted(plan.items()):
        cost = 'step time not measured' if factor is None else f'step time x{factor:.2f}'
        print(f'{gb} GB, {name}, order {order}: n_microbatches={r["n_microbatches"]}, '
              f'remat={r["remat"]} (peak {float(r["peak_gib"]):.1f} GiB, {cost})')
      for name in sorted({r['config'] for r in rows} - {'tiny_ddpmpp'}):
        for order in (1, 2, 3):
          if (name, order) not in plan:
            measured = any(r['config'] == name and int(r['order']) == order for r in rows)
            print(f'{gb} GB, {name}, order {order}: '
                  + ('no measured setting fits' if measured else 'not measured'))


if __name__ == '__main__':
  main()
