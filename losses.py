"""Training losses, the optimizer and the train/eval step.

First-order denoising score matching (score_sde) with score_flow's likelihood weighting and
importance-sampled time, and the second- and third-order denoising score matching of
mle_score_ode (Lu et al., ICML 2022). Per example, with `dim` the data size, `sigma` the marginal
std at t, `z` the DSM noise, `v` a Rademacher probe, `s` the score model and
`c = z + sigma * stop_grad(s)`:

  order 1: |sigma s + z|^2 / dim (reduce_mean) or 0.5 |sigma s + z|^2; with likelihood weighting
    and uniform time g(t)^2 |s + z / sigma|^2 instead (importance-sampled time keeps the first
    form: the weight g^2 / sigma^2 is then the sampling density, up to Z = cum_weight(T)).
  order 2: |sigma^2 J v + v - <c, v> c|^2 / dim^2 + ((sigma^2 <v, J v> + |v|^2 - <c, v>^2) / dim)^2
  order 3: |sigma^3 grad_x <v, J v> + <c, v>^2 c - (sigma^2 <v, Jv> + |v|^2) c
            - 2 <v, c> (sigma^2 J v + v)|^2 / dim^3,  with <v, Jv> and J v held fixed.

With exact_jacobian (dim <= 2) the Rademacher estimators give way to the exact Jacobian as in
mle_score_ode's toy.py ('score_eps_second_jac' / 'score_eps_third'):
  order 2: |sigma^2 J + I - c c^T|_F^2 / dim^2 (the Frobenius term only, as toy.py)
  order 3: |sigma^3 grad tr J + |c|^2 c - (sigma^2 tr J + dim) c - 2 (sigma^2 J + I) c|^2 / dim
The Frobenius term equals the expectation over v of the JVP one; the JVP trace term and the
squared norm of the order-3 residual carry the probe's variance on top of the exact values
(losses_test.py checks both identities). The total is w1 loss1 + w2 loss2 + w3 loss3 with
w = loss_weights ((1, 1, 1) reproduces the image code, (1, 0.5, 0.1) with exact_jacobian toy.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from utils import batch_mul

ORDERS = (1, 2, 3)
NONFINITE_MODES = ('stop', 'skip')
MAX_EXACT_JACOBIAN_DIM = 2


LR_SCHEDULES = ('constant', 'cosine')


def get_lr_schedule(config):
  """lr * min(step / warmup, 1) as score_sde ('constant'); 'cosine' then decays it to 0 by
  training.n_iters (half a cosine over the steps after the warm-up)."""
  optim = config.optim
  kind = optim.get('schedule', 'constant')
  if kind not in LR_SCHEDULES:
    raise ValueError(f"Unknown learning-rate schedule {kind!r}: set config.optim.schedule to "
                     "'constant' or 'cosine'.")
  warmup = max(int(optim.warmup), 0)
  if kind == 'constant':
    return optax.linear_schedule(0., optim.lr, warmup) if warmup else optim.lr
  return optax.warmup_cosine_decay_schedule(0., optim.lr, warmup,
                                            max(int(config.training.n_iters), warmup + 1))


def get_optimizer(config):
  """Adam as score_sde's flax.optim.Adam + optimization_manager, in optax.

  - the learning rate of get_lr_schedule: lr * min(step / warmup, 1) (step = updates applied so
    far, so the first update has lr 0, as the original), constant after it or cosine-decayed.
  - beta1 = config.optim.beta1, beta2 = 0.999, eps added to sqrt of the corrected second moment.
  - decoupled weight decay as flax.optim.Adam: p <- p - lr * (adam_update + weight_decay * p),
    i.e. optax.adamw with the same (warmed-up) lr.
  - the gradient is first clipped to global norm config.optim.grad_clip (disabled if < 0).
  """
  optim = config.optim
  if optim.optimizer != 'Adam':
    raise ValueError(f"Optimizer '{optim.optimizer}' is not supported: set "
                     "config.optim.optimizer = 'Adam'.")
  schedule = get_lr_schedule(config)
  tx = optax.adamw(schedule, b1=optim.beta1, b2=0.999, eps=optim.eps,
                   weight_decay=optim.weight_decay)
  if optim.grad_clip >= 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def _check_loss_options(score_matching_order, reduce_mean, loss_weights):
  if score_matching_order not in ORDERS:
    raise ValueError(f'Unsupported score_matching_order {score_matching_order!r}: set '
                     'config.training.score_matching_order to 1, 2 or 3.')
  if score_matching_order > 1 and not reduce_mean:
    raise ValueError(f'score_matching_order {score_matching_order} needs reduce_mean (its '
                     'losses are normalised per dimension): set config.training.reduce_mean = True.')
  if len(tuple(loss_weights)) != 3:
    raise ValueError(f'loss_weights must hold 3 numbers (orders 1, 2, 3), got {loss_weights!r}: '
                     'set config.training.loss_weights = (1., 1., 1.).')


def _flat(x):
  return x.reshape((x.shape[0], -1))


def _inner(x, y):
  """Per-example inner product of flat (B, D) arrays, kept as (B, 1)."""
  return jnp.sum(x * y, axis=-1, keepdims=True)


def _basis(x):
  eye = jnp.eye(x.shape[1], dtype=x.dtype)
  return [jnp.broadcast_to(eye[i], x.shape) for i in range(x.shape[1])]


def _jacobian(fn, x):
  """fn(x) and its per-example Jacobian J[b, i, j] = d fn_i / d x_j: one primal pass (linearize),
  one unrolled tangent per dimension (vmapped tangents compile to much slower XLA:CPU dots)."""
  value, fn_jvp = jax.linearize(fn, x)
  return value, jnp.stack([fn_jvp(e) for e in _basis(x)], axis=-1)


def exact_derivatives(fn, x, order):
  """(s, J, grad_x tr J) of a per-example map fn on flat (B, D) data, D <= 2, exactly.

  Order 2 needs s and J (grad_x tr J is None). Order 3 takes grad_x tr J by forward-over-forward
  mode in 1-D (s'' from one nested jvp: 3 streams) and by reverse mode over the linearized
  Jacobian in 2-D (the cheapest of the options in benchmarks/train_step.py --toy).
  """
  if order == 2:
    return _jacobian(fn, x) + (None,)
  if x.shape[1] == 1:
    one = jnp.ones_like(x)
    (s, d1), (_, d2) = jax.jvp(lambda y: jax.jvp(fn, (y,), (one,)), (x,), (one,))
    return s, d1[:, :, None], d2

  def trace_fn(y):
    s, jac = _jacobian(fn, y)
    return jnp.sum(jnp.trace(jac, axis1=1, axis2=2)), (s, jac)
  grad_tr, (s, jac) = jax.grad(trace_fn, has_aux=True)(x)
  return s, jac, grad_tr


def score_matching_losses(sde, score_fn, data, t, z, v=None, rng=None, score_matching_order=1,
                          reduce_mean=True, likelihood_weighting=False, importance_weighting=False,
                          exact_jacobian=False):
  """Per-example DSM losses of orders 1..score_matching_order at given t, z and probe v.

  score_fn(x, t, rng=None) -> (score, new_model_state). `data` is the clean batch (B, ...), `t`
  (B,), `z` the DSM noise (shape of data), `v` the Rademacher probe (orders 2 and 3 without
  exact_jacobian). Returns (losses1, losses2, losses3, new_model_state), each loss of shape (B,);
  unused orders are zeros. Orders 2 and 3 return new_model_state = None (the caller keeps the
  incoming state, as the original). The loss formulas are in the module docstring.
  """
  _check_loss_options(score_matching_order, reduce_mean, (1., 1., 1.))
  batch_size = data.shape[0]
  dim = int(np.prod(data.shape[1:]))
  if exact_jacobian and dim > MAX_EXACT_JACOBIAN_DIM:
    raise ValueError(f'exact_jacobian needs data of at most {MAX_EXACT_JACOBIAN_DIM} dimensions, '
                     f'got {dim}: set config.training.exact_jacobian = False.')
  reduce_op = jnp.mean if reduce_mean else (lambda x, axis: 0.5 * jnp.sum(x, axis=axis))

  mean, std = sde.marginal_prob(data, t)
  perturbed = mean + batch_mul(std, z)
  fn = lambda x: score_fn(x, t, rng=rng)[0]
  zeros = jnp.zeros((batch_size,), perturbed.dtype)
  losses2 = losses3 = zeros
  new_model_state = None

  if score_matching_order == 1:
    score, new_model_state = score_fn(perturbed, t, rng=rng)
  elif not exact_jacobian:
    if score_matching_order == 2:
      score, jv = jax.jvp(fn, (perturbed,), (v,))  # one pass gives the score and J v
    else:
      def vjv_fn(x):
        s, jv = jax.jvp(fn, (x,), (v,))
        return jnp.sum(v * jv), (s, jv)
      # Reverse mode over the JVP: grad_x <v, J v> with the score and J v as by-products.
      grad_vjv, (score, jv) = jax.grad(vjv_fn, has_aux=True)(perturbed)
    std_ = std.reshape((batch_size, 1))
    std2 = jnp.square(std_)
    vf, jvf = _flat(v), _flat(jv)
    c = _flat(z) + _flat(jax.lax.stop_gradient(score)) * std_
    cv = _inner(c, vf)
    vv = _inner(vf, vf)
    vjv = _inner(vf, jvf)
    frob = jnp.mean(jnp.square(std2 * jvf + vf - cv * c) / dim, axis=-1)
    trace = jnp.square((std2 * vjv + vv - jnp.square(cv)) / dim)[:, 0]
    losses2 = frob + trace
    if score_matching_order == 3:
      vjv = jax.lax.stop_gradient(vjv)
      jvf = jax.lax.stop_gradient(jvf)
      resid = (std2 * std_ * _flat(grad_vjv) + jnp.square(cv) * c - (std2 * vjv + vv) * c
               - 2 * cv * (std2 * jvf + vf))
      losses3 = jnp.mean(jnp.square(resid / dim), axis=-1)
  else:
    flat_fn = lambda y: _flat(fn(y.reshape(perturbed.shape)))
    score, jac, grad_tr = exact_derivatives(flat_fn, _flat(perturbed), score_matching_order)
    eye = jnp.eye(dim, dtype=perturbed.dtype)
    std_ = std.reshape((batch_size, 1))
    std2 = jnp.square(std_)
    c = _flat(z) + _flat(jax.lax.stop_gradient(score)) * std_
    a = std2[:, :, None] * jac + eye - c[:, :, None] * c[:, None, :]
    losses2 = jnp.mean(jnp.square(a).reshape((batch_size, -1)), axis=-1)
    if score_matching_order == 3:
      jac = jax.lax.stop_gradient(jac)
      tr = jnp.trace(jac, axis1=1, axis2=2)[:, None]
      resid = (std2 * std_ * _flat(grad_tr) + _inner(c, c) * c - (std2 * tr + dim) * c
               - 2 * jnp.einsum('bij,bj->bi', std2[:, :, None] * jac + eye, c))
      losses3 = jnp.mean(jnp.square(resid), axis=-1)

  if likelihood_weighting and not importance_weighting:
    g2 = sde.sde(jnp.zeros_like(data), t)[1] ** 2
    losses1 = reduce_op(_flat(jnp.square(score + batch_mul(z, 1. / std))), axis=-1) * g2
  else:
    losses1 = reduce_op(_flat(jnp.square(batch_mul(score, std) + z)), axis=-1)
  return losses1, losses2, losses3, new_model_state


def get_loss_from_score_fn(sde, reduce_mean=True, likelihood_weighting=True,
                           importance_weighting=True, eps=1e-5, score_matching_order=1,
                           loss_weights=(1., 1., 1.), exact_jacobian=False):
  """loss_fn(rng, score_fn, states, batch) -> (loss, (new_model_state, loss1, loss2, loss3)).

  The body of get_sde_loss_fn for a given score_fn(x, t, rng=None) -> (score, new_state): draws
  t (uniform on [eps, T], or importance-sampled with likelihood and importance weighting), the
  DSM noise z and the Rademacher probe v, and averages score_matching_losses over the batch.
  loss1..loss3 are unweighted batch means; loss = w1 loss1 + w2 loss2 + w3 loss3.
  """
  _check_loss_options(score_matching_order, reduce_mean, loss_weights)
  w1, w2, w3 = (float(w) for w in loss_weights)

  def loss_fn(rng, score_fn, states, batch):
    data = batch['image']
    t_rng, z_rng, v_rng, model_rng = jax.random.split(rng, 4)
    if likelihood_weighting and importance_weighting:
      t = sde.sample_importance_weighted_time_for_likelihood(t_rng, (data.shape[0],), eps=eps)
    else:
      t = jax.random.uniform(t_rng, (data.shape[0],), minval=eps, maxval=sde.T)
    z = jax.random.normal(z_rng, data.shape, data.dtype)
    v = None
    if score_matching_order > 1 and not exact_jacobian:
      v = jax.random.rademacher(v_rng, data.shape, data.dtype)
    losses1, losses2, losses3, new_state = score_matching_losses(
      sde, score_fn, data, t, z, v, rng=model_rng, score_matching_order=score_matching_order,
      reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting,
      importance_weighting=importance_weighting, exact_jacobian=exact_jacobian)
    if new_state is None:
      new_state = states
    loss1, loss2, loss3 = jnp.mean(losses1), jnp.mean(losses2), jnp.mean(losses3)
    loss = w1 * loss1 + w2 * loss2 + w3 * loss3
    return loss, (new_state, loss1, loss2, loss3)

  return loss_fn


def get_sde_loss_fn(sde, model, train, reduce_mean=True, continuous=True, likelihood_weighting=True,
                    importance_weighting=True, eps=1e-5, score_matching_order=1,
                    loss_weights=(1., 1., 1.), exact_jacobian=False):
  """loss_fn(rng, params, states, batch) -> (loss, (new_model_state, loss1, loss2, loss3)).

  The score of `model` comes from models.utils.get_score_fn (score_sde conventions); batch['image']
  is (B, ...) (images or flat vectors). Orders 2 and 3 need reduce_mean; exact_jacobian needs
  dim <= 2 (checked when the batch is seen). See the module docstring for the formulas.
  """
  from models import utils as mutils  # here, so that importing losses does not import models
  score_loss_fn = get_loss_from_score_fn(
    sde, reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting,
    importance_weighting=importance_weighting, eps=eps, score_matching_order=score_matching_order,
    loss_weights=loss_weights, exact_jacobian=exact_jacobian)

  def loss_fn(rng, params, states, batch):
    score_fn = mutils.get_score_fn(sde, model, params, states, train=train, continuous=continuous,
                                   return_state=True)
    return score_loss_fn(rng, score_fn, states, batch)

  return loss_fn


def _all_finite(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def get_step_fn(sde, model, train, optimize_fn=None, reduce_mean=False, continuous=True,
                likelihood_weighting=False, importance_weighting=False, smallest_time=1e-5,
                score_matching_order=1, loss_weights=(1., 1., 1.), exact_jacobian=False,
                ema_rate=0.999, ema_start=0, nonfinite='stop'):
  """step_fn(state, batch) -> (new_state, metrics) for one training or evaluation step.

  The training loop scans step_fn with jax.lax.scan over config.training.n_jitted_steps batches
  inside one jax.jit; data parallelism comes from the jit shardings of the batch (the loss and
  gradient are over the global batch; no pmap or pmean here).

  Train: value_and_grad of the loss on state.params, the optax update `optimize_fn` (from
  get_optimizer), the EMA params_ema <- ema_rate params_ema + (1 - ema_rate) params (a copy of the
  params while state.step < ema_start; toy.py's "EMA after 500 iterations" is ema_start = 501),
  a fresh rng split from state.rng, step + 1. When the loss or a gradient is not finite:
  'skip' keeps params, opt_state, model_state and params_ema, and advances step, rng and
  nonfinite_count; 'stop' returns the incoming state untouched (the loop then stops; the other
  steps of a scan still run from that state). The lr schedule counts applied updates, so skipped
  steps do not advance it.
  Eval (train=False): the loss of params_ema; the state is returned unchanged except its rng,
  which advances so that successive eval batches draw fresh t, z and v.
  metrics: 'loss', 'loss1', 'loss2', 'loss3' (unweighted terms) and 'finite' (bool).
  """
  if not continuous:
    raise ValueError(f'Discrete-time training of {sde.__class__.__name__} is not supported: set '
                     'config.training.continuous = True.')
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f"Unknown nonfinite mode {nonfinite!r}: set config.training.nonfinite to "
                     "'stop' or 'skip'.")
  if train and optimize_fn is None:
    raise ValueError('A training step needs optimize_fn: pass losses.get_optimizer(config).')
  loss_fn = get_sde_loss_fn(sde, model, train, reduce_mean=reduce_mean, continuous=True,
                            likelihood_weighting=likelihood_weighting,
                            importance_weighting=importance_weighting, eps=smallest_time,
                            score_matching_order=score_matching_order, loss_weights=loss_weights,
                            exact_jacobian=exact_jacobian)

  def step_fn(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    if train:
      grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
      (loss, (new_model_state, loss1, loss2, loss3)), grads = grad_fn(
        step_rng, state.params, state.model_state, batch)
      finite = jnp.logical_and(jnp.isfinite(loss), _all_finite(grads))
      # Same container types as the incoming state (a scan carry must keep its pytree structure).
      new_model_state = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(state.model_state), jax.tree_util.tree_leaves(new_model_state))
      updates, new_opt_state = optimize_fn.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
      copy = state.step < ema_start
      new_params_ema = jax.tree_util.tree_map(
        lambda e, p: jnp.where(copy, p, e * ema_rate + p * (1. - ema_rate)),
        state.params_ema, new_params)
      updated = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                              model_state=new_model_state, params_ema=new_params_ema, rng=rng)
      if nonfinite == 'skip':
        failed = state.replace(step=state.step + 1, rng=rng,
                               nonfinite_count=state.nonfinite_count + 1)
      else:
        failed = state
      new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), updated, failed)
    else:
      loss, (_, loss1, loss2, loss3) = loss_fn(step_rng, state.params_ema, state.model_state,
                                               batch)
      finite = jnp.isfinite(loss)
      new_state = state.replace(rng=rng)
    metrics = {'loss': loss, 'loss1': loss1, 'loss2': loss2, 'loss3': loss3, 'finite': finite}
    return new_state, metrics

  return step_fn


# ----------------------------------------------------------------------------------------------
# Variational dequantization (score_flow): get_dequantization_loss_fn goes here (another task).
# ----------------------------------------------------------------------------------------------


def dequantization_losses(rng, score_fn, dequantizer, data, sde, scaler, inverse_scaler,
                          importance_weighting=True, eps=1e-5, offset=True):
  """Per-example (losses in nats, bits/dim) of score_flow's dequantizer objective.

  data: the scaled 8-bit batch (B, ...). dequantizer(u, x, rng) -> (noise in (0, 1), sldj) as
  models.flowpp.get_dequantizer (log q(noise | x) = log N(u) - sldj). With x = inverse_scaler(data)
  = k / 255 and y = scaler((255 x + noise) / 256) (noise inside bin k),

    loss = bound(y) + log q(noise | x),

  bound = bound_likelihood.likelihood_bound with one time sample (prior term, importance-weighted
  DSM integrand minus the drift divergence, eps offset), an upper bound on -log p(y). Its
  expectation over q bounds -log P(x) - D log(256 / scale), so
  bits/dim = loss / (D ln 2) + log2(d inverse_scaler / dx) + 8 (as the original).
  score_flow drew the drift-divergence time uniformly and apart from the DSM time; here one
  (importance-sampled) time serves both: the same expectation.
  """
  import bound_likelihood  # pylint: disable=import-outside-toplevel
  from likelihood import nll_to_bpd  # pylint: disable=import-outside-toplevel
  from models.flowpp import log_q  # pylint: disable=import-outside-toplevel
  u_rng, deq_rng, bound_rng = jax.random.split(rng, 3)
  x = inverse_scaler(data)
  u = jax.random.normal(u_rng, data.shape, data.dtype)
  noise, sldj = dequantizer(u, x, rng=deq_rng)
  y = scaler((x * 255. + noise) / 256.)
  nll = bound_likelihood.likelihood_bound(bound_rng, score_fn, y, sde, dsm=True, eps=eps,
                                          importance_weighting=importance_weighting,
                                          offset=offset, N=1)
  losses = nll + log_q(u, sldj)
  return losses, nll_to_bpd(losses, data.shape, inverse_scaler)


def get_dequantization_loss_fn(sde, score_model, deq_model, scaler, inverse_scaler, train=True,
                               importance_weighting=True, eps=1e-5, offset=True):
  """loss_fn(rng, deq_params, score_params, score_state, batch) -> (loss, bpd).

  score_flow's get_dequantization_loss_fn: the mean over the batch of dequantization_losses
  (nats per example, the quantity differentiated) and its mean bits/dim. The score model
  (score_model with score_params / score_state, eval mode, continuous time) is held fixed; the
  caller differentiates with respect to deq_params (argnums=1) only. Dropout of the dequantizer
  (config.deq.dropout) acts when train is True.
  """
  from models import flowpp  # pylint: disable=import-outside-toplevel
  from models import utils as mutils  # pylint: disable=import-outside-toplevel

  def loss_fn(rng, deq_params, score_params, score_state, batch):
    score_fn = mutils.get_score_fn(sde, score_model, score_params, score_state, train=False,
                                   continuous=True)
    dequantizer = flowpp.get_dequantizer(deq_model, deq_params, train=train)
    losses, bpd = dequantization_losses(
      rng, score_fn, dequantizer, batch['image'], sde, scaler, inverse_scaler,
      importance_weighting=importance_weighting, eps=eps, offset=offset)
    return jnp.mean(losses), jnp.mean(bpd)

  return loss_fn
