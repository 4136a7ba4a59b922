"""Cost of the jitted loss-and-gradient step of orders 1, 2, 3: ours vs the original formulation.

For each config and order: value_and_grad (wrt params) of the DSM loss, jitted; the XLA temp
memory `jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes` and, for the tiny
configs, the median wall time of `--repeats` calls after compilation. Orders 2 and 3 are reported
as ratios to order 1 of the same formulation and config (measured within this run).

Formulations:
- ours: losses.get_sde_loss_fn (score_matching_losses).
- original: `original_formulation`, the order-1/2/3 loss of LuChengTHU/mle_score_ode losses.py re-created
  on current JAX with the same maths and the same autodiff structure: order 2 takes the score
  and J v from one `jax.jvp`; order 3 takes `jax.grad` of <v, J v> with (J v, score) as aux.
- naive (--formulations naive): separate passes (a score call, a separate jvp for J v and a
  separate grad of <v, J v>) -- not what the original does; shows what sharing the primal buys.

Toy MLP (--toy mog1d,checkerboard; on by default): the toy configs at batch 1000 with exact
Jacobians and loss weights (1, 0.5, 0.1), formulation ours, each order-3 way of taking the exact
derivatives (--toy-methods): 'ours' (high_order.exact_derivatives: the toy MLP's own Taylor
pass, models.mlp.taylor_derivatives), 'autodiff' (high_order.autodiff_derivatives, what 'ours'
does for other models: forward-over-forward in 1-D, reverse over the linearized Jacobian in 2-D),
'vmap' (vmapped tangents for J, reverse mode over them), 'jet' (Taylor mode, jax.experimental.jet; in 2-D along e1, e2, e1 + e2),
'fwdfwd' (nested jvps; in 2-D the three pairs (1,1), (1,2), (2,2)).

Full-size configs (--full cifar10_ddpmpp,cifar10_ncsnpp; off by default, ~6 min per config on
2 CPU cores) are compile-only (no timing): abstract parameters (jax.eval_shape), batch
--full-batch per device, formulation ours (the original compiles to the same figures).

  .venv/bin/python benchmarks/train_step.py [--quick] [--out runs/bench/train_step.md]
  .venv/bin/python benchmarks/train_step.py --configs '' --full cifar10_ddpmpp,cifar10_ncsnpp
"""
import argparse
import time

import numpy as np

import bench_common as bc  # also puts the repo root on sys.path
import jax
import jax.numpy as jnp

import high_order
import losses
import sde_lib
from divergence import batch_mul
from models import utils as mutils

MiB = 2. ** 20


# ------------------------------------------------------------------------------------------------
# The original formulation (mle_score_ode losses.py get_sde_loss_fn), on current JAX.
# ------------------------------------------------------------------------------------------------
def original_formulation(sde, model, train, reduce_mean=True, continuous=True,
                     likelihood_weighting=True, importance_weighting=True, eps=1e-5,
                     score_matching_order=1, naive=False):
  """loss_fn(rng, params, states, batch) -> (loss, (new_state, loss1, loss2, loss3)).

  The original's maths and autodiff structure, line by line (rng splits, Rademacher probe from
  randint, order-1 term from the score of the order-2/3 pass, losses weighted 1, 1, 1). With
  naive=True the score, J v and grad_x <v, J v> come from separate passes instead.
  """
  reduce_op = jnp.mean if reduce_mean else lambda *a, **k: 0.5 * jnp.sum(*a, **k)

  def inner_prod(x, y):
    x = x.reshape((x.shape[0], -1))
    y = y.reshape((y.shape[0], -1))
    return jnp.sum(x * y, axis=-1, keepdims=True)

  def loss_fn(rng, params, states, batch):
    score_fn = mutils.get_score_fn(sde, model, params, states, train=train, continuous=continuous,
                                   return_state=True)
    score_fn_div = mutils.get_score_fn(sde, model, params, states, train=train,
                                       continuous=continuous, return_state=False)
    data = batch['image']
    b = data.shape[0]
    rng, step_rng = jax.random.split(rng)
    if likelihood_weighting and importance_weighting:
      t = sde.sample_importance_weighted_time_for_likelihood(step_rng, (b,), eps=eps)
    else:
      t = jax.random.uniform(step_rng, (b,), minval=eps, maxval=sde.T)
    rng, step_rng = jax.random.split(rng)
    z = jax.random.normal(step_rng, data.shape)
    mean, std = sde.marginal_prob(data, t)
    perturbed_data = mean + batch_mul(std, z)
    rng, step_rng = jax.random.split(rng)

    if score_matching_order == 1:
      rng, step_rng = jax.random.split(rng)
      score, new_model_state = score_fn(perturbed_data, t, rng=step_rng)
      losses_2 = jnp.zeros((b,))
      losses_3 = jnp.zeros_like(losses_2)
    else:
      v = jax.random.randint(step_rng, data.shape, minval=0, maxval=2).astype(jnp.float32) * 2 - 1
      rng, step_rng = jax.random.split(rng)
      fn = lambda inputs: score_fn_div(inputs, t, rng=step_rng)
      new_model_state = states
      if score_matching_order == 2:
        if naive:
          score = fn(perturbed_data)
          score_jvp = jax.jvp(fn, (perturbed_data,), (v,))[1]
        else:
          score, score_jvp = jax.jvp(fn, (perturbed_data,), (v,))
      else:
        def score_jvp_fn(x):
          score, score_jvp = jax.jvp(fn, (x,), (v,))
          return jnp.sum(v * score_jvp), (score_jvp, score)
        if naive:
          score = fn(perturbed_data)
          score_jvp = jax.jvp(fn, (perturbed_data,), (v,))[1]
          score_grad_div = jax.grad(lambda x: score_jvp_fn(x)[0])(perturbed_data)
        else:
          score_grad_div, (score_jvp, score) = jax.grad(score_jvp_fn, has_aux=True)(
            perturbed_data)
      dim = int(np.prod(data.shape[1:]))
      score_fixed = jax.lax.stop_gradient(score)
      std_2 = jnp.square(std).reshape((b, 1))
      std_ = std.reshape((b, 1))
      v_2 = inner_prod(v, v)
      cond_score = z.reshape((b, dim)) + score_fixed.reshape((b, dim)) * std_
      cond_score_v_prod_norm_square = jnp.square(inner_prod(cond_score, v))
      # Frobenius:
      frob = (score_jvp.reshape((b, dim)) * std_2 + v.reshape((b, dim))
              - inner_prod(cond_score, v) * cond_score)
      frob = reduce_op(jnp.square(frob) / float(dim), axis=-1)
      # Trace:
      score_div = inner_prod(score_jvp, v)
      losses_2 = jnp.square((score_div * std_2 + v_2 - cond_score_v_prod_norm_square) / dim)
      losses_2 = reduce_op(losses_2, axis=-1) + frob
      losses_3 = jnp.zeros_like(losses_2)
      if score_matching_order == 3:
        score_div = jax.lax.stop_gradient(score_div)
        score_jvp = jax.lax.stop_gradient(score_jvp)
        losses_3 = (std_2 * std_ * score_grad_div.reshape((b, dim))
                    + cond_score_v_prod_norm_square * cond_score
                    - (std_2 * score_div + v_2) * cond_score
                    - 2 * inner_prod(v, cond_score)
                    * (std_2 * score_jvp.reshape((b, dim)) + v.reshape((b, dim))))
        losses_3 = reduce_op(jnp.square(losses_3 / float(dim)), axis=-1)

    if likelihood_weighting and not importance_weighting:
      g2 = sde.sde(jnp.zeros_like(data), t)[1] ** 2
      losses_1 = jnp.square(score + batch_mul(z, 1. / std))
      losses_1 = reduce_op(losses_1.reshape((b, -1)), axis=-1) * g2
    else:
      losses_1 = reduce_op(jnp.square(batch_mul(score, std) + z).reshape((b, -1)), axis=-1)
    loss1, loss2, loss3 = jnp.mean(losses_1), jnp.mean(losses_2), jnp.mean(losses_3)
    return loss1 + loss2 + loss3, (new_model_state, loss1, loss2, loss3)

  return loss_fn


# ------------------------------------------------------------------------------------------------
# Ways of taking the exact derivatives of the toy losses (s, J, grad_x tr J), D <= 2.
# ------------------------------------------------------------------------------------------------
def _derivs_vmap(fn, x, order):
  """J from vmapped tangents, grad tr J by reverse mode over them."""
  b, d = x.shape
  basis = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype)[:, None, :], (d, b, d))

  def jacobian(y):
    s, cols = jax.vmap(lambda e: jax.jvp(fn, (y,), (e,)), out_axes=(None, 0))(basis)
    return s, jnp.moveaxis(cols, 0, -1)

  if order == 2:
    return jacobian(x) + (None,)

  def trace_fn(y):
    s, jac = jacobian(y)
    return jnp.sum(jnp.trace(jac, axis1=1, axis2=2)), (s, jac)
  grad_tr, (s, jac) = jax.grad(trace_fn, has_aux=True)(x)
  return s, jac, grad_tr


def _hessian_trace_grad(h11, h12, h22, d):
  """grad_x tr J from the second directional derivatives f''[e_a, e_b] (each (B, D))."""
  if d == 1:
    return h11
  return jnp.stack([h11[:, 0] + h12[:, 1], h12[:, 0] + h22[:, 1]], -1)


def _derivs_jet(fn, x, order):
  """Taylor mode: one order-2 jet per direction (e1; or e1, e2, e1 + e2 by polarisation)."""
  from jax.experimental import jet
  if order == 2:
    return high_order.exact_derivatives(fn, x, 2)
  d = x.shape[1]
  basis = high_order.basis(x)
  dirs = basis + ([] if d == 1 else [jnp.ones_like(x)])
  outs = [jet.jet(fn, (x,), ((u, jnp.zeros_like(x)),)) for u in dirs]
  s = outs[0][0]
  jac = jnp.stack([o[1][0] for o in outs[:d]], -1)
  h = [o[1][1] for o in outs]
  h12 = None if d == 1 else 0.5 * (h[2] - h[0] - h[1])
  return s, jac, _hessian_trace_grad(h[0], h12, h[1] if d == 2 else None, d)


def _derivs_fwdfwd(fn, x, order):
  """Forward over forward: one nested jvp per pair of directions."""
  if order == 2:
    return high_order.exact_derivatives(fn, x, 2)
  e = high_order.basis(x)
  d = x.shape[1]

  def second(a, b):  # (s, J e_a, J e_b, f''[e_a, e_b])
    (s, ja), (jb, hab) = jax.jvp(lambda y: jax.jvp(fn, (y,), (e[a],)), (x,), (e[b],))
    return s, ja, jb, hab

  s, j1, _, h11 = second(0, 0)
  if d == 1:
    return s, j1[:, :, None], h11
  _, _, j2, h12 = second(0, 1)
  h22 = second(1, 1)[3]
  return s, jnp.stack([j1, j2], -1), _hessian_trace_grad(h11, h12, h22, d)


DERIVATIVE_METHODS = {'ours': high_order.exact_derivatives,
                      'autodiff': high_order.autodiff_derivatives, 'vmap': _derivs_vmap,
                      'jet': _derivs_jet, 'fwdfwd': _derivs_fwdfwd}


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------
def toy_config(name, batch=1000):
  """The demo's toy config (VE, exact Jacobians, loss weights (1, 0.5, 0.1)) at `batch`."""

  from configs.toy import checkerboard_ve, mog1d_ve
  config = {'mog1d': mog1d_ve, 'checkerboard': checkerboard_ve}[name].get_config()
  config.training.batch_size = batch
  return config


def full_config(name, batch):
  if name == 'cifar10_ddpmpp':
    from configs.vp import cifar10_ddpmpp_continuous as mod
  else:
    from configs.ve import cifar10_ncsnpp_continuous as mod
  config = mod.get_config()
  config.training.batch_size = batch
  return config


CONFIGS = {
  'tiny_ddpmpp': 'configs/tiny/digits_ddpmpp.py',
  'tiny_ncsnpp': 'configs/tiny/digits_ncsnpp.py',
  'cifar10_ddpmpp': 'configs/vp/cifar10_ddpmpp_continuous.py',
  'cifar10_ncsnpp': 'configs/ve/cifar10_ncsnpp_continuous.py',
}


def build_loss(formulation, sde, model, config, order):
  t = config.training
  kwargs = dict(reduce_mean=True, continuous=True, likelihood_weighting=t.likelihood_weighting,
                importance_weighting=t.importance_weighting, eps=t.smallest_time,
                score_matching_order=order)
  if formulation == 'ours':
    return losses.get_sde_loss_fn(sde, model, True, loss_weights=tuple(t.loss_weights),
                                  exact_jacobian=t.exact_jacobian, **kwargs)
  return original_formulation(sde, model, True, naive=formulation == 'naive', **kwargs)


def grad_step(loss_fn):
  """The benchmarked function: value_and_grad of the loss wrt params."""
  def step(rng, params, states, batch):
    return jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(rng, params, states, batch)
  return jax.jit(step)


def measure(config, formulation, order, abstract, method='ours'):
  """compile_step with the exact derivatives of exact-Jacobian losses taken by `method` (a
  DERIVATIVE_METHODS entry)."""
  saved = high_order.exact_derivatives
  high_order.exact_derivatives = DERIVATIVE_METHODS[method]
  try:
    return compile_step(config, formulation, order, abstract)
  finally:
    high_order.exact_derivatives = saved


def compile_step(config, formulation, order, abstract):
  """(compiled step, its arguments, compile seconds, temp bytes, GFLOP (XLA cost analysis))."""
  sde, _ = sde_lib.get_sde(config)
  shape = (config.training.batch_size,) + mutils.get_data_shape(config)
  rng = jax.random.PRNGKey(0)
  if abstract:
    model = mutils.get_model(config.model.name)(config=config)
    variables = jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                         jnp.zeros((1,) + shape[1:]), jnp.ones((1,)), train=False))
    variables = dict(variables)
    params = variables.pop('params')
    states = variables
    batch = {'image': jax.ShapeDtypeStruct(shape, jnp.float32)}
  else:
    model, states, params = mutils.init_model(rng, config)
    batch = {'image': jax.random.uniform(jax.random.PRNGKey(1), shape, jnp.float32)}
  step = grad_step(build_loss(formulation, sde, model, config, order))
  start = time.perf_counter()
  compiled = step.lower(rng, params, states, batch).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflop = float(cost.get('flops', 0.)) / 1e9 if cost else None
  return compiled, (rng, params, states, batch), compile_s, temp, gflop


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=bc.default_out('train_step.md'),
                      help='table file (.md markdown or .csv)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny DDPM++ only, 5 repeats, no full-size configs')
  parser.add_argument('--repeats', type=int, default=7, help='timed calls after compile (>= 5)')
  parser.add_argument('--formulations', default='original,ours',
                      help='comma list of original, ours, naive')
  parser.add_argument('--configs', default='tiny_ddpmpp,tiny_ncsnpp',
                      help='timed tiny configs: tiny_ddpmpp, tiny_ncsnpp')
  parser.add_argument('--toy', default='mog1d,checkerboard',
                      help="timed toy MLP configs at batch 1000 (exact Jacobians): mog1d, "
                           "checkerboard; '' for none")
  parser.add_argument('--toy-methods', default='ours,autodiff,vmap,jet,fwdfwd',
                      help='ways of taking the exact derivatives (order 3; order 2 uses ours '
                           'except for autodiff and vmap): ' + ', '.join(DERIVATIVE_METHODS))
  parser.add_argument('--full', default='',
                      help='compile-only full-size configs, e.g. cifar10_ddpmpp,cifar10_ncsnpp '
                           '(off by default: order 3 alone compiles for ~4 min per config on 2 '
                           'CPU cores)')
  parser.add_argument('--full-batch', type=int, default=1, help='batch of the full-size configs')
  parser.add_argument('--full-formulations', default='ours',
                      help='formulations compiled for the full-size configs (original gives the same '
                           'program as ours; compiling it too doubles the time)')
  parser.add_argument('--orders', default='1,2,3')
  args = parser.parse_args()
  if args.repeats < 5:
    raise SystemExit('--repeats must be >= 5 (the median of at least 5 timed calls).')
  formulations = [f for f in args.formulations.split(',') if f]
  for f in formulations:
    if f not in ('original', 'ours', 'naive'):
      raise SystemExit(f"Unknown formulation '{f}': use original, ours, naive.")
  orders = [int(o) for o in args.orders.split(',')]
  if orders[0] != 1:
    raise SystemExit('--orders must start with 1 (ratios are to order 1).')
  tiny = [c for c in args.configs.split(',') if c]
  full = [c for c in args.full.split(',') if c]
  toys = [c for c in args.toy.split(',') if c]
  toy_methods = [m for m in args.toy_methods.split(',') if m]
  for m in toy_methods:
    if m not in DERIVATIVE_METHODS:
      raise SystemExit(f"Unknown toy method '{m}': use {', '.join(DERIVATIVE_METHODS)}.")
  if args.quick:
    tiny, full, args.repeats = ['tiny_ddpmpp'], [], 5
    toys, toy_methods = ['mog1d'], ['ours']

  header = ['config', 'batch', 'formulation', 'order', 'compile s', 'step ms (median)',
            'step ms (min)', 'time / order 1', 'temp MiB', 'temp / order 1', 'GFLOP',
            'GFLOP / order 1']
  rows = []
  runs = ([(c, False) for c in tiny] + [(c, True) for c in full]
          + [(f'toy_{c}', False) for c in toys])
  for name, abstract in runs:
    toy = name.startswith('toy_')
    if toy:
      config = toy_config(name[4:])
    else:
      config = full_config(name, args.full_batch) if abstract else bc.tiny_config(name)
    full_formulations = [f for f in args.full_formulations.split(',') if f]
    if toy:  # one order-1 baseline; order 2 has one way besides the old one (J alone)
      plan = [('ours', 'ours', 1)] + [('ours', m, o) for m in toy_methods for o in orders[1:]
                                      if o == 3 or m in ('ours', 'autodiff', 'vmap')]
    else:
      plan = [(f, 'ours', o) for f in (full_formulations if abstract else formulations)
              for o in orders]
    base = None
    compiled = [measure(config, f, o, abstract, m) for f, m, o in plan]
    timings = {}
    if not abstract:  # every step of this config timed round-robin (see bc.interleaved_times)
      timings = bc.interleaved_times({i: c[:2] for i, c in enumerate(compiled)}, args.repeats)
    for i, ((formulation, method, order), (_, _, compile_s, temp, gflop)) in enumerate(
        zip(plan, compiled)):
      med, times = timings.get(i, (None, []))
      if toy and order > 1:
        formulation = f'exact: {method}'
      if order == 1:
        base = (med, temp, gflop)
      t_ratio = med / base[0] if med is not None else None
      m_ratio = temp / base[1] if base[1] else None
      f_ratio = gflop / base[2] if gflop and base[2] else None
      row = [name, config.training.batch_size, formulation, order, compile_s,
             None if med is None else med * 1e3, min(times) * 1e3 if times else None,
             t_ratio, temp / MiB, m_ratio, gflop, f_ratio]
      rows.append(row)
      spread = '' if not times else ' (' + ', '.join(f'{x * 1e3:.0f}' for x in times) + ' ms)'
      print(' | '.join(bc.fmt(c) for c in row) + spread, flush=True)

  notes = [
    'toy_*: the toy MLP (configs/toy/*_ve.py) at batch 1000 with exact Jacobians, one order-1 '
    'baseline; exact: M = the exact derivatives taken by method M (see the module docstring; '
    'ours = high_order.exact_derivatives: the MLP\'s Taylor pass; autodiff = JAX autodiff).',
    'value_and_grad wrt params of the loss (train=True: dropout on), jitted; time = median of '
    f'{args.repeats} calls after compile (block_until_ready), every step of a config timed '
    'round-robin so load changes hit all alike; temp = XLA temp_size_in_bytes.',
    'ratios are to order 1 of the same config and formulation, measured in this run; GFLOP = '
    "XLA cost_analysis()['flops'] of the compiled step (machine-independent).",
    'original = the original mle_score_ode loss re-created (benchmarks/train_step.py '
    'original_formulation); ours = losses.get_sde_loss_fn.',
    'configs: ' + (', '.join(f'{c} = {CONFIGS[c]}' for c, _ in runs if c in CONFIGS) or '-')
    + '; tiny configs pinned '
    'to nf 32, ch_mult (1, 2), 1 res block, 16x16x3, batch 16.',
  ]
  if any(a for _, a in runs):
    notes.append(f'full-size configs: compile only (no timing on CPU), batch {args.full_batch}, '
                 'abstract params.')
  bc.write_table(args.out, 'Train step: loss-and-gradient cost by order', header, rows,
                 notes)


if __name__ == '__main__':
  main()
