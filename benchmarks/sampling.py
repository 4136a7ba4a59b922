"""Sampler cost on the tiny configs: PC (reverse_diffusion + langevin, euler_maruyama + none) and
the probability-flow ODE sampler (jitted Dormand-Prince).

For each tiny config (pinned to nf 32, ch_mult (1, 2), one res block, 16x16x3) and sampler:
sampling.get_sampling_fn, jitted; compile time, median time of --repeats batches of --batch
samples after compilation, time per sample, NFE (score evaluations per batch, as the sampler
reports it) and time per NFE. Parameters: random init, or (default) briefly trained with the
order-1 loss (the ODE sampler's adaptive NFE depends on the learnt flow).

  .venv/bin/python benchmarks/sampling.py [--quick] [--out runs/bench/sampling.md]
"""
import argparse
import time

import numpy as np

import bench_common as bc  # also puts the repo root on sys.path
import jax

import datasets
import sampling
import sde_lib
from models import utils as mutils

SAMPLERS = (
  ('pc', 'reverse_diffusion', 'langevin'),
  ('pc', 'euler_maruyama', 'none'),
  ('ode', None, None),
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=bc.default_out('sampling.md'),
                      help='table file (.md markdown or .csv)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny DDPM++ only, random init, 2 repeats')
  parser.add_argument('--configs', default='tiny_ddpmpp,tiny_ncsnpp')
  parser.add_argument('--params', choices=('trained', 'random'), default='trained')
  parser.add_argument('--train-steps', type=int, default=150)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--ode-tol', type=float, default=None,
                      help='rtol = atol of the ODE sampler (default: the config, 1e-3)')
  args = parser.parse_args()
  names = [c for c in args.configs.split(',') if c]
  if args.quick:
    names, args.params, args.repeats = ['tiny_ddpmpp'], 'random', 2

  header = ['config', 'sampler', 'params', 'N (steps)', 'NFE', 'compile s', 'batch s (median)',
            'ms / sample', 'ms / NFE']
  rows, notes = [], []
  for name in names:
    config = bc.tiny_config(name, args.batch)
    sde, eps = sde_lib.get_sde(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
    if args.params == 'trained':
      train, _ = bc.digits_batches(config, 8)
      start = time.perf_counter()
      params, loss = bc.train_briefly(config, sde, model, params, states, train,
                                      args.train_steps)
      notes.append(f'{name}: trained {args.train_steps} order-1 steps in '
                   f'{time.perf_counter() - start:.0f} s, final loss {loss:.3g}.')
    shape = (args.batch,) + mutils.get_data_shape(config)
    for method, predictor, corrector in SAMPLERS:
      config.sampling.method = method
      if method == 'pc':
        config.sampling.predictor, config.sampling.corrector = predictor, corrector
        label = f'PC {predictor} + {corrector}'
      else:
        if args.ode_tol is not None:
          config.sampling.rtol = config.sampling.atol = args.ode_tol
        label = f'ODE (rtol = atol = {config.sampling.rtol:g})'
      fn = sampling.get_sampling_fn(config, sde, model, shape, inverse_scaler, eps)
      rng = jax.random.PRNGKey(1)
      start = time.perf_counter()
      samples, nfe = bc.block(fn(rng, params, states))
      compile_s = time.perf_counter() - start
      med, times = bc.median_time(fn, rng, params, states, repeats=args.repeats)
      nfe = int(nfe)
      ok = bool(np.all(np.isfinite(np.asarray(samples))))
      rows.append([name, label + ('' if ok else ' (non-finite samples)'), args.params,
                   sde.N if method == 'pc' else None, nfe, compile_s, med,
                   med / args.batch * 1e3, med / nfe * 1e3])
      print(' | '.join(bc.fmt(c) for c in rows[-1]), flush=True)
  notes.append(f'batch {args.batch}; time: median of {args.repeats} jitted calls after the '
               'first (compile + run) call, block_until_ready; NFE: score evaluations per batch '
               '(PC: N x (predictor + corrector steps); ODE: solver evaluations + 1 denoising).')
  notes.append('configs: ' + ', '.join(f'{n} = {bc.TINY[n]}' for n in names) + ' (pinned to nf '
               '32, ch_mult (1, 2), 1 res block, 16x16x3); snr and steps from the config.')
  bc.write_table(args.out, 'Sampling: PC and ODE samplers on the tiny configs', header,
                 rows, notes)


if __name__ == '__main__':
  main()
