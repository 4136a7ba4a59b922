"""Loops around the score network, bare vs looped, and main.py's training speed vs its bare step.

XLA:CPU runs a gradient of a conv net inside a compiled loop (lax.scan, while_loop) many times
slower than the same gradient outside one (parallel.UNROLLED_BACKENDS). For each loop of the
product, on the tiny DDPM++ (configs/tiny/digits_ddpmpp.py, batch 16; the dequantizer's rows use
configs/tiny/digits_deq.py), the median time of one iteration:
- bare: the loop's body jitted alone (steps: jit(step_fn)); for the samplers, the ODE solves and
  the bound, one jitted call of what the body evaluates, called from Python;
- looped: the body inside its compiled loop (steps: jit(lax.scan(step_fn)) over one row; the
  PC sampler's fori_loop, the bound's scan and the Dormand-Prince while_loop per iteration);
- ours: what the product runs on this backend (parallel.get_multi_step_fn / get_multi_eval_fn;
  the ODE-score diagnostic's host-driven backward solve).
Then the toy MLP's 10-step training call unrolled vs scanned (why parallel.SCANNED_MODELS keeps
it scanned), and `main.py --mode train` for each order (--steps steps, log every --log_every): the steps/s of
its last log line against the bare step's, in the same run.

  .venv/bin/python benchmarks/loops.py [--quick] [--toy_only] [--out runs/bench/loops.md]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import bench_common as bc  # also puts the repo root on sys.path
import jax
import jax.numpy as jnp

import bound_likelihood
import datasets
import deq_lib
import divergence
import likelihood
import ode_score
import parallel
import sampling
import sde_lib
import train_lib
from models import utils as mutils


def step_rows(name, step_fn, state, batch, consts, repeats, eval_=False):
  """[name, bare, looped, ours, looped/bare, ours/bare] (ms) of one step on one batch row."""
  mesh = parallel.make_mesh()
  rows = jax.tree_util.tree_map(lambda x: x[None], batch)
  bare = jax.jit(lambda s, b, *c: step_fn(s, b, *c))
  scanned = jax.jit(lambda s, b, *c: jax.lax.scan(lambda s_, b_: step_fn(s_, b_, *c), s, b))
  make = parallel.get_multi_eval_fn if eval_ else parallel.get_multi_step_fn
  ours = (make(step_fn, mesh, n_consts=len(consts)) if eval_ else
          make(step_fn, mesh, donate=False, n_consts=len(consts)))
  times = bc.interleaved_times({'bare': (bare, (state, batch) + consts),
                                'looped': (scanned, (state, rows) + consts),
                                'ours': (ours, (state, parallel.global_batch(rows, mesh)) + consts)},
                               repeats)
  t = {k: v[0] * 1e3 for k, v in times.items()}
  return [name, t['bare'], t['looped'], t['ours'], t['looped'] / t['bare'], t['ours'] / t['bare']]


def per_iteration(name, n_iter, looped, bare_parts, repeats, ours=None):
  """[name, bare, looped, ours, looped/bare, ours/bare] (ms per iteration). looped, ours: (fn,
  args) of the whole loop (ours defaults to looped: the product runs that loop compiled);
  bare_parts: [(fn, args, calls per iteration)], what one iteration evaluates, called alone."""
  calls = {'looped': looped, **({'ours': ours} if ours else {})}
  calls.update({i: (fn, fn_args) for i, (fn, fn_args, _) in enumerate(bare_parts)})
  times = {k: v[0] * 1e3 for k, v in bc.interleaved_times(calls, repeats).items()}
  bare = sum(times[i] * n for i, (_, _, n) in enumerate(bare_parts))
  looped_ms = times['looped'] / n_iter
  ours_ms = times.get('ours', times['looped']) / n_iter
  return [name, bare, looped_ms, ours_ms, looped_ms / bare, ours_ms / bare]


def loop_rows(args):
  config = bc.tiny_config('tiny_ddpmpp', args.batch)
  train, test = bc.digits_batches(config, 1)
  batch = {'image': train[0]}
  rows = []
  for order in args.orders:
    config.training.score_matching_order = order
    sde, _ = sde_lib.get_sde(config)
    print(f'order {order}', flush=True)
    model, tx, state = train_lib.build_state(config, jax.random.PRNGKey(0))
    train_fn, eval_fn = train_lib.get_step_fns(config, sde, model, tx)
    rows.append(step_rows(f'train step, order {order}', train_fn, state, batch, (), args.repeats))
    rows.append(step_rows(f'eval loss, order {order}', eval_fn, state, batch, (), args.repeats,
                          eval_=True))
  params, states = state.params_ema, state.model_state
  score_fn = mutils.get_score_fn(sde, model, params, states, train=False, continuous=True)
  forward = jax.jit(lambda x, t: score_fn(x, t))
  x, t = test, jnp.full((test.shape[0],), 0.5)
  probe = divergence.get_hutchinson_noise(jax.random.PRNGKey(4), x.shape)

  # PC sampler (reverse diffusion + Langevin): per time step, against one jitted corrector +
  # predictor update.
  n = config.model.num_scales
  sampler = sampling.get_sampling_fn(config, sde, model, test.shape, lambda v: v, 1e-3)
  predictor = sampling.get_predictor(config.sampling.predictor.lower())(sde, score_fn, False)
  corrector = sampling.get_corrector(config.sampling.corrector.lower())(
    sde, score_fn, config.sampling.snr, config.sampling.n_steps_each)
  pc_step = jax.jit(lambda rng, x, t: predictor.update_fn(
    rng, corrector.update_fn(rng, x, t)[0], t)[0])
  rows.append(per_iteration('PC sampler (fori_loop), per time step', n,
                            (sampler, (jax.random.PRNGKey(1), params, states)),
                            [(pc_step, (jax.random.PRNGKey(1), x, t), 1)], args.repeats))

  # ODE likelihood: Dormand-Prince while_loop, per drift-and-divergence evaluation.
  lik = likelihood.get_likelihood_fn(sde, model, lambda v: v, rtol=args.tol, atol=args.tol,
                                     data_is_images=False)
  nfe = int(lik(jax.random.PRNGKey(2), params, states, test)[2])
  drift_div = jax.jit(likelihood.get_drift_div_fn(sde, score_fn))
  rows.append(per_iteration('ODE likelihood (while_loop), per NFE', nfe,
                            (lik, (jax.random.PRNGKey(2), params, states, test)),
                            [(drift_div, (x, t, probe), 1)], args.repeats))

  # The bound: a scan over time samples; each is one forward pass (DSM form).
  k = args.bound_times
  bound = bound_likelihood.get_bound_fn(sde, model, None, N=k, offset=False, data_is_images=False)
  rows.append(per_iteration('bound (scan), per time', k,
                            (bound, (jax.random.PRNGKey(3), params, states, test)),
                            [(forward, (x, t), 1)], args.repeats))

  # ODE-score diagnostic: a forward solve (drift) and a backward one (drift, div and its
  # gradient), compiled whole (accelerators) and as the product runs it here.
  unrolled = parallel.UNROLLED_BACKENDS
  parallel.UNROLLED_BACKENDS = ()
  compiled = ode_score.get_ode_score_fn(sde, model, nt=4, rtol=args.tol, atol=args.tol)
  parallel.UNROLLED_BACKENDS = unrolled
  ours = ode_score.get_ode_score_fn(sde, model, nt=4, rtol=args.tol, atol=args.tol)
  traj = jax.jit(lambda data: ode_score.ode_score_gap(
    jax.random.PRNGKey(4), score_fn, data, sde, nt=4, rtol=args.tol, atol=args.tol,
    return_trajectory=True)['nfe'])(test)
  nfe_fwd, nfe_bwd = (int(v) for v in traj)
  nfe = nfe_fwd + nfe_bwd
  dynamics = jax.jit(lambda x_, s_: ode_score.get_score_dynamics_fn(sde, score_fn, [probe])(
    0.5, (x_, s_)))
  gap_args = (jax.random.PRNGKey(4), params, states, test)
  rows.append(per_iteration('ODE-score diagnostic (while_loop), per NFE', nfe, (compiled, gap_args),
                            [(dynamics, (x, x), nfe_bwd / nfe), (forward, (x, t), nfe_fwd / nfe)],
                            args.repeats, ours=(ours, gap_args)))

  # The dequantizer's training and evaluation steps (they differentiate through the score model).
  dconfig = bc.tiny_config('tiny_ddpmpp', args.batch)
  from configs.tiny import digits_deq
  dconfig.model = digits_deq.get_config().model
  dconfig.deq = digits_deq.get_config().deq
  dsde, _ = sde_lib.get_sde(dconfig)
  smodel, _, sstate = train_lib.build_state(dconfig, jax.random.PRNGKey(0))
  images = datasets.get_data_inverse_scaler(dconfig)(batch['image'])
  deq_model, dtx, dstate = deq_lib.init_deq_state(dconfig, jax.random.PRNGKey(5), images)
  scaler, inverse = datasets.get_data_scaler(dconfig), datasets.get_data_inverse_scaler(dconfig)
  consts = (sstate.params_ema, sstate.model_state)
  for train in (True, False):
    fn = deq_lib.get_deq_step_fn(dsde, smodel, deq_model, scaler, inverse, dtx, train=train)
    rows.append(step_rows(f'dequantizer {"train" if train else "eval"} step', fn, dstate,
                          {'image': images}, consts, args.repeats, eval_=not train))
  return rows


def toy_rows(args, steps=10):
  """[toy, order, unrolled, scanned, scanned / unrolled] (ms per step) of the toy MLP's training
  call of `steps` steps: a Python loop over the jitted step vs one jitted lax.scan (the MLP has no
  convolutions, so parallel.SCANNED_MODELS keeps it scanned on every backend)."""
  from configs.toy import checkerboard_ve, mog1d_ve
  rows = []
  for name, module in (('mog1d', mog1d_ve), ('checkerboard', checkerboard_ve)):
    for order in args.orders:
      config = module.get_config()
      config.training.score_matching_order = order
      sde, _ = sde_lib.get_sde(config)
      model, tx, state = train_lib.build_state(config, jax.random.PRNGKey(0))
      step = train_lib.get_step_fns(config, sde, model, tx)[0]
      mesh = parallel.make_mesh()
      state = parallel.replicate(state, mesh)
      shape = (steps, config.training.batch_size, config.data.dim)
      batch = parallel.global_batch(
        {'image': jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-1., maxval=1.)}, mesh)
      calls = {}
      for key, backends in (('unrolled', (jax.default_backend(),)), ('scanned', ())):
        parallel.UNROLLED_BACKENDS, kept = backends, parallel.UNROLLED_BACKENDS
        calls[key] = (parallel.get_multi_step_fn(step, mesh, donate=False), (state, batch))
        parallel.UNROLLED_BACKENDS = kept
      t = {k: v[0] * 1e3 / steps for k, v in bc.interleaved_times(calls, args.repeats).items()}
      rows.append([name, order, t['unrolled'], t['scanned'], t['scanned'] / t['unrolled']])
  return rows


def main_rows(args):
  """[order, main.py steps/s (last log line), bare step steps/s, ratio] per order."""
  config = bc.tiny_config('tiny_ddpmpp', args.batch)
  train, _ = bc.digits_batches(config, 1)
  rows = []
  for order in args.orders:
    with tempfile.TemporaryDirectory() as workdir:
      cmd = [sys.executable, os.path.join(bc.ROOT, 'main.py'), '--mode', 'train',
             '--config', os.path.join(bc.ROOT, 'configs/tiny/digits_ddpmpp.py'),
             '--workdir', workdir, f'--config.training.score_matching_order={order}',
             f'--config.training.n_iters={args.steps}', f'--config.training.log_freq={args.log_every}',
             f'--config.training.eval_freq={args.steps}', f'--config.training.snapshot_freq={args.steps}',
             f'--config.training.snapshot_freq_for_preemption={args.steps}',
             f'--config.training.batch_size={args.batch}', '--config.training.snapshot_sampling=False']
      out = subprocess.run(cmd, cwd=bc.ROOT, capture_output=True, text=True, check=True)
      logged = [float(r) for r in re.findall(r'\(([\d.]+) steps/s', out.stderr + out.stdout)]
    config.training.score_matching_order = order
    sde, _ = sde_lib.get_sde(config)
    model, tx, state = train_lib.build_state(config, jax.random.PRNGKey(0))
    step = jax.jit(train_lib.get_step_fns(config, sde, model, tx)[0])
    bare = 1. / bc.median_time(step, state, {'image': train[0]}, repeats=args.repeats)[0]
    rows.append([order, logged[-1], bare, logged[-1] / bare])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=bc.default_out('loops.md'))
  parser.add_argument('--quick', action='store_true', help='order 1 only, 3 repeats, 20 steps')
  parser.add_argument('--orders', default='1,3')
  parser.add_argument('--toy_only', action='store_true', help='the toy MLP table only')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--steps', type=int, default=60, help='main.py training steps per order')
  parser.add_argument('--log_every', type=int, default=20)
  parser.add_argument('--tol', type=float, default=1e-3, help='ODE rtol = atol')
  parser.add_argument('--bound_times', type=int, default=16)
  args = parser.parse_args()
  args.orders = [int(o) for o in args.orders.split(',')]
  if args.quick:
    args.orders, args.repeats, args.steps, args.log_every = [1], 3, 20, 10
  print(bc.machine_line(), flush=True)
  toy = bc.markdown_table(
    'Toy MLP training call of 10 steps (the toys\' config batch): unrolled vs scanned (ms/step)',
    ['toy', 'order', 'unrolled', 'scanned', 'scanned / unrolled'], toy_rows(args))
  print(toy, flush=True)
  if args.toy_only:
    return
  text = bc.markdown_table(
    'Loops around the tiny DDPM++: one iteration bare vs inside its compiled loop (ms)',
    ['loop', 'bare', 'looped', 'ours', 'looped / bare', 'ours / bare'], loop_rows(args),
    notes=['ours: what the product runs on this backend (loops_unrolled: '
           f'{parallel.loops_unrolled()}).'])
  print(text, flush=True)
  text += '\n' + toy
  text += '\n' + bc.markdown_table(
    f'main.py --mode train ({args.steps} steps, batch {args.batch}) vs its bare step',
    ['order', 'main.py steps/s (last log line)', 'bare step steps/s', 'ratio'], main_rows(args))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  print(text[text.index('### main.py'):])
  print(f'written to {args.out}')


if __name__ == '__main__':
  main()
