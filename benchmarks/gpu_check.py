"""One accelerator check in at most 5 minutes: full-size CIFAR-10 training step time and peak memory
for orders 1, 2, 3 at batch 128 in the recommended setting, and one exact bits/dim batch.

Install nothing here; on a CUDA machine after `make install`, the one line is
  .venv/bin/pip install -U "jax[cuda12]==0.10.2"        (the pinned jax; cuda13 also exists)
then
  .venv/bin/python benchmarks/gpu_check.py [--config cifar10_ddpmpp] [--memory_gb 80]
Each order runs in its own process (so the device's peak memory is that order's alone) in the
setting `benchmarks/memory.py recommend` gives for the device's memory. --cpu_smoke runs the same
functions in one process on a tiny model and batch (gpu_check_test.py, in make test).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import bench_common as bc  # also puts the repo root on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import memory

SMOKE = dict(config='tiny_ddpmpp', batch=4, bpd_batch=2, rtol=1e-3, steps=2)
FULL = dict(batch=128, bpd_batch=16, rtol=1e-5, steps=5)


def _smoke_config(batch, order, n_micro, remat):
  config = memory.config_for('tiny_ddpmpp', batch, order, n_micro, remat)
  config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 8, (1,), ()
  return config


def one_order(args):
  """{order, setting, step_ms, peak_gib} of one order's training step on this device."""
  if args.cpu_smoke:
    config = _smoke_config(SMOKE['batch'], args.one, args.n_micro, args.remat)
  else:
    config = memory.config_for(args.config, FULL['batch'], args.one, args.n_micro, args.remat)
  call, state, data = memory.train_call(config, abstract=False)
  start = time.perf_counter()
  state = jax.block_until_ready(call(state, data)[0])
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(SMOKE['steps'] if args.cpu_smoke else FULL['steps']):
    start = time.perf_counter()
    state = jax.block_until_ready(call(state, data)[0])
    times.append(time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  return dict(what=f'train order {args.one}', setting=f'n_microbatches={args.n_micro}, '
              f'remat={args.remat}', compile_s=compile_s, ms=1e3 * float(np.median(times)),
              peak_gib=stats.get('peak_bytes_in_use', 0) / memory.GiB or None)


def one_bpd(args):
  """{what, ms, nfe, bpd} of one exact bits/dim batch (probability-flow ODE, RK45)."""
  import likelihood
  import datasets
  import sde_lib
  import train_lib
  from models import utils as mutils
  size = SMOKE if args.cpu_smoke else FULL
  config = (_smoke_config(size['bpd_batch'], 1, 1, 'none') if args.cpu_smoke
            else memory.config_for(args.config, size['bpd_batch'], 1, 1, 'none'))
  model, _, state = train_lib.build_state(config, jax.random.PRNGKey(0))
  sde, eps = sde_lib.get_sde(config)
  fn = likelihood.get_likelihood_fn(sde, model, datasets.get_data_inverse_scaler(config),
                                    rtol=size['rtol'], atol=size['rtol'], eps=eps)
  shape = (size['bpd_batch'],) + mutils.get_data_shape(config)
  data = jax.random.uniform(jax.random.PRNGKey(2), shape, jnp.float32) * 2 - 1
  fn(jax.random.PRNGKey(3), state.params_ema, state.model_state, data)  # compile
  start = time.perf_counter()
  bpd, _, nfe = jax.block_until_ready(fn(jax.random.PRNGKey(3), state.params_ema,
                                         state.model_state, data))
  return dict(what=f'exact bpd, batch {size["bpd_batch"]} (untrained model)', setting=
              f'rtol = atol = {size["rtol"]}', ms=1e3 * (time.perf_counter() - start),
              nfe=int(nfe), bpd=float(jnp.mean(bpd)))


def _child(args, **what):
  """One measurement (one=ORDER, n_micro, remat; or bpd=True) in a fresh process, so its peak
  memory is its own; in this process for --cpu_smoke."""
  one = argparse.Namespace(**{**vars(args), 'one': 0, 'bpd': False, **what})
  if args.cpu_smoke:
    return one_bpd(one) if one.bpd else one_order(one)
  extra = ['--bpd'] if one.bpd else ['--one', str(one.one), '--n_micro', str(one.n_micro),
                                    '--remat', one.remat]
  cmd = [sys.executable, os.path.abspath(__file__), *extra, '--config', args.config]
  r = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if r.returncode:
    raise SystemExit(f'{" ".join(extra)} failed:\n{r.stderr[-3000:]}')
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='cifar10_ddpmpp', choices=sorted(memory.FULL))
  p.add_argument('--memory_gb', type=float, default=None,
                 help='device memory for the recommendation (default: what the device reports)')
  p.add_argument('--orders', default='1,2,3')
  p.add_argument('--cpu_smoke', action='store_true', help='tiny model and batch, any backend')
  p.add_argument('--one', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--bpd', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--n_micro', type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument('--remat', default='none', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one or args.bpd:
    print(json.dumps(one_bpd(args) if args.bpd else one_order(args)))
    return
  stats = jax.devices()[0].memory_stats() or {}
  gb = args.memory_gb or stats.get('bytes_limit', 0) / 1e9 or 16.
  plan = memory.recommend(memory.read_rows(memory.RESULTS), gb)
  print(bc.machine_line(), f'| recommendations for {gb:.0f} GB', flush=True)
  rows = []
  for order in (int(o) for o in args.orders.split(',')):
    row = plan.get((args.config, order), ({'n_microbatches': 1, 'remat': 'none'}, 1.))[0]
    n_micro = 2 if args.cpu_smoke and order == 3 else int(row['n_microbatches'])
    rows.append(_child(args, one=order, n_micro=n_micro, remat=row['remat']))
    print(rows[-1], flush=True)
  rows.append(_child(args, bpd=True))
  header = ['what', 'setting', 'ms', 'peak_gib', 'nfe', 'bpd']
  print(bc.markdown_table(f'gpu_check ({"cpu smoke" if args.cpu_smoke else args.config})', header,
                          [[r.get(h) for h in header] for r in rows]))


if __name__ == '__main__':
  main()
