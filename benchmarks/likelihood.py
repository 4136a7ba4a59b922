"""Probability-flow ODE likelihood: the jitted solver vs the scipy host loop, and the cost of one
drift-and-divergence evaluation.

Tiny DDPM++ (configs/tiny/digits_ddpmpp.py pinned to nf 32, ch_mult (1, 2), one res block,
16x16x3; DIGITS test batch of --batch, rtol = atol = --tol): likelihood.get_likelihood_fn with
method 'jax' (ode_solver.solve, one XLA program) and 'scipy' (solve_ivp RK45 calling a jitted
drift-and-divergence function per evaluation): bits/dim agreement, NFE, median time of whole
solves, their ratio, and the jitted solve's time over NFE x the time of one jitted evaluation.
One evaluation is timed three ways: the forward pass alone (drift), drift plus the reverse-mode
Hutchinson divergence (the originals: grad of <eps, f> then <grad, eps>), and drift with the
forward-mode divergence of likelihood.py (one jvp gives both).
Parameters: random init, or (default) briefly trained with the order-1 loss (realistic NFE).

The 2-D toy (configs/toy/checkerboard_ve.py MLP, batch --toy-batch, exact divergence): jax vs
scipy time and NFE.

  .venv/bin/python benchmarks/likelihood.py [--quick] [--out runs/bench/likelihood.md]
"""
import argparse
import time

import numpy as np

import bench_common as bc  # also puts the repo root on sys.path
import jax
import jax.numpy as jnp

import datasets
import divergence
import likelihood
import sde_lib
import toy_data
from models import utils as mutils


def toy_config():
  from configs.toy import checkerboard_ve
  return checkerboard_ve.get_config()


def eval_fns_of(sde, model, params, states):
  """Jitted single evaluations (x, t, eps): the forward pass (drift), drift + the reverse-mode
  Hutchinson divergence (grad of <eps, f>, as the originals), drift + forward-mode div (jvp)."""
  score_fn = mutils.get_score_fn(sde, model, params, states, train=False, continuous=True)
  rsde = sde.reverse(score_fn, probability_flow=True)
  drift_fn = lambda x, t: rsde.sde(x, t)[0]

  def reverse_div(x, t, eps):
    grad = jax.grad(lambda y: jnp.sum(drift_fn(y, t) * eps))(x)
    return drift_fn(x, t), divergence.batch_sum(grad * eps)

  return {
    'forward pass (drift only)': jax.jit(lambda x, t, eps: drift_fn(x, t)),
    'drift + reverse-mode div': jax.jit(reverse_div),
    'drift + forward-mode div (jvp)': jax.jit(divergence.get_value_div_fn(drift_fn)),
  }


def eval_inputs(data):
  t = jnp.full((data.shape[0],), 0.5)
  return data, t, divergence.get_hutchinson_noise(jax.random.PRNGKey(5), data.shape)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=bc.default_out('likelihood.md'),
                      help='table file (.md markdown or .csv)')
  parser.add_argument('--quick', action='store_true',
                      help='random-init params, fewer repeats, toy batch 1000')
  parser.add_argument('--params', choices=('trained', 'random'), default='trained',
                      help='random init, or briefly trained (--train-steps order-1 steps)')
  parser.add_argument('--train-steps', type=int, default=300)
  parser.add_argument('--toy-train-steps', type=int, default=300)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--tol', type=float, default=1e-5, help='rtol = atol')
  parser.add_argument('--repeats', type=int, default=1,
                      help='interleaved timing rounds (one whole solve per route each) after the '
                           'warm-up solves; a trained tiny solve takes ~30-40 s')
  parser.add_argument('--eval-repeats', type=int, default=7, help='timed single evaluations')
  parser.add_argument('--toy-batch', type=int, default=5000)
  args = parser.parse_args()
  if args.quick:
    args.params, args.repeats, args.eval_repeats = 'random', 1, 5
  header = ['case', 'route', 'params', 'NFE', 'bpd (mean)', 'time s (median)', 'ms / NFE',
            'ratio']
  rows = []
  notes = []

  # ---------------------------------------------------------------- tiny DDPM++
  config = bc.tiny_config('tiny_ddpmpp', args.batch)
  sde, _ = sde_lib.get_sde(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
  train, data = bc.digits_batches(config, 8)
  case = f'tiny DDPM++ B={args.batch} tol={args.tol:g}'
  if args.params == 'trained':
    start = time.perf_counter()
    params, loss = bc.train_briefly(config, sde, model, params, states, train, args.train_steps)
    notes.append(f'tiny DDPM++ trained {args.train_steps} order-1 steps (Adam 2e-3, batch '
                 f'{args.batch}) in {time.perf_counter() - start:.0f} s, final loss {loss:.3g}.')
  kw = dict(rtol=args.tol, atol=args.tol, eps=1e-5)
  rng = jax.random.PRNGKey(7)
  solve_args = (rng, params, states, data)
  fns = {m: likelihood.get_likelihood_fn(sde, model, inverse_scaler, method=m, **kw)
         for m in ('jax', 'scipy')}
  eval_fns = eval_fns_of(sde, model, params, states)
  outs = {}
  for method, fn in fns.items():
    start = time.perf_counter()
    outs[method] = bc.block(fn(*solve_args))
    notes.append(f'{method}: first call (compile + solve) {time.perf_counter() - start:.1f} s.')
  eval_args = eval_inputs(data)
  for f in eval_fns.values():
    bc.block(f(*eval_args))
  # Interleaved rounds (jax solve, scipy solve, one-eval timings) so that both routes see the
  # same load on a shared machine; ratios are medians of per-round ratios.
  rounds = []
  for r in range(args.repeats):
    rec = {}
    for method, fn in fns.items():
      start = time.perf_counter()
      bc.block(fn(*solve_args))
      rec[method] = time.perf_counter() - start
    for name, f in eval_fns.items():
      rec[name] = bc.median_time(f, *eval_args, repeats=args.eval_repeats)[0]
    rounds.append(rec)
    print(f'round {r}: ' + ', '.join(f'{k} {v:.3f}' for k, v in rec.items()), flush=True)
  med = lambda key: float(np.median([rec[key] for rec in rounds]))
  med_ratio = lambda f: float(np.median([f(rec) for rec in rounds]))
  (bpd_jax, _, nfe_jax), (bpd_sp, _, nfe_sp) = outs['jax'], outs['scipy']
  nfe_jax, nfe_sp = int(nfe_jax), int(nfe_sp)
  bpd_jax, bpd_sp = np.asarray(bpd_jax), np.asarray(bpd_sp)
  one = 'drift + forward-mode div (jvp)'
  rows.append([case, 'jax (jitted Dormand-Prince)', args.params, nfe_jax, float(bpd_jax.mean()),
               med('jax'), med('jax') / nfe_jax * 1e3, None])
  rows.append([case, 'scipy (solve_ivp host loop)', args.params, nfe_sp, float(bpd_sp.mean()),
               med('scipy'), med('scipy') / nfe_sp * 1e3, None])
  rows.append([case, 'jax / scipy time', '', None, None, None, None,
               med_ratio(lambda r: r['jax'] / r['scipy'])])
  rows.append([case, 'jax NFE / scipy NFE', '', None, None, None, None, nfe_jax / nfe_sp])
  rows.append([case, 'jax time / (NFE x one jitted eval)', '', None, None, None, None,
               med_ratio(lambda r: r['jax'] / (nfe_jax * r[one]))])
  rows.append([case, 'scipy time / (NFE x one jitted eval)', '', None, None, None, None,
               med_ratio(lambda r: r['scipy'] / (nfe_sp * r[one]))])
  for name in eval_fns:
    rows.append([case, f'one eval: {name}', args.params, 1, None, med(name), med(name) * 1e3,
                 med_ratio(lambda r, name=name: r[name] / r['forward pass (drift only)'])])
  notes.append(f'bpd |jax - scipy|: max {np.max(np.abs(bpd_jax - bpd_sp)):.2e}, mean '
               f'{np.mean(np.abs(bpd_jax - bpd_sp)):.2e} (per example, {args.batch} examples).')
  notes.append('ratios: medians over rounds of per-round ratios; one-eval ratio column: time / '
               'forward pass alone; "one jitted eval" = drift + forward-mode div (what '
               'likelihood.py evaluates).')

  # ---------------------------------------------------------------- 2-D toy
  toy_batch = 1000 if args.quick else args.toy_batch
  tconfig = toy_config()
  tsde, _ = sde_lib.get_sde(tconfig)
  tmodel, tstates, tparams = mutils.init_model(jax.random.PRNGKey(0), tconfig)
  tdata = jnp.asarray(toy_data.sample_toy('CHECKERBOARD', 0, toy_batch), jnp.float32)
  tparams_kind = args.params
  if args.params == 'trained':
    tbatches = [jnp.asarray(toy_data.sample_toy('CHECKERBOARD', i + 1, 1000), jnp.float32)
                for i in range(8)]
    tparams, tloss = bc.train_briefly(tconfig, tsde, tmodel, tparams, tstates, tbatches,
                                   args.toy_train_steps, lr=1e-3)
    notes.append(f'toy MLP trained {args.toy_train_steps} order-1 steps (Adam 1e-3, batch '
                 f'1000), final loss {tloss:.3g}.')
  tcase = f'toy checkerboard VE MLP B={toy_batch} exact div tol={args.tol:g}'
  tfns = {m: likelihood.get_likelihood_fn(tsde, tmodel, None, method=m, exact_div=True,
                                         data_is_images=False, return_nll=True, **kw)
          for m in ('jax', 'scipy')}
  targs = (rng, tparams, tstates, tdata)
  touts = {m: bc.block(f(*targs)) for m, f in tfns.items()}
  trounds = []
  for r in range(args.repeats):
    rec = {}
    for method, fn in tfns.items():
      start = time.perf_counter()
      bc.block(fn(*targs))
      rec[method] = time.perf_counter() - start
    trounds.append(rec)
    print(f'toy round {r}: ' + ', '.join(f'{k} {v:.3f}' for k, v in rec.items()), flush=True)
  tres = {m: (float(np.median([rec[m] for rec in trounds])), int(touts[m][2]),
              np.asarray(touts[m][3])) for m in tfns}
  for method, label in (('jax', 'jax (jitted Dormand-Prince)'),
                        ('scipy', 'scipy (solve_ivp host loop)')):
    med, nfe, nll = tres[method]
    rows.append([tcase, label, tparams_kind, nfe, None, med, med / nfe * 1e3, None])
  rows.append([tcase, 'scipy / jax time (speed-up)', '', None, None, None, None,
               float(np.median([rec['scipy'] / rec['jax'] for rec in trounds]))])
  notes.append(f'toy: mean NLL jax {tres["jax"][2].mean():.4f} vs scipy '
               f'{tres["scipy"][2].mean():.4f} nats (max |diff| '
               f'{np.max(np.abs(tres["jax"][2] - tres["scipy"][2])):.1e}).')
  notes.append(f'times: {args.repeats} interleaved rounds after a warm-up solve, each one solve per '
               f'route and {args.eval_repeats} calls of each single evaluation (median).')

  bc.write_table(args.out, 'Likelihood: jitted ODE solve vs scipy host loop', header, rows,
                 notes)


if __name__ == '__main__':
  main()
