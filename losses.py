"""Training losses and the train/eval step (the optimizer: optim.py).

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
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import high_order
import parallel
from divergence import batch_mul
from high_order import MAX_EXACT_JACOBIAN_DIM, flat

ORDERS = (1, 2, 3)
NONFINITE_MODES = ('stop', 'skip')
# What the score network saves for the backward pass (jax.checkpoint policies); the rest is
# recomputed: 'convs' keeps convolution and matmul outputs and recomputes the elementwise work
# (normalisation, activations and their derivatives); 'nothing' recomputes the whole network.
REMAT_POLICIES = {
  'none': None,
  'convs': lambda prim, *_, **__: prim.name in ('conv_general_dilated', 'dot_general'),
  'nothing': jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """Every option of the DSM loss and of the train/eval step, validated on construction (the
  one place these options are checked: config_checks.validate_config builds one from the config).

  How every factory here is configured (score_sde's get_sde_loss_fn and get_step_fn build one
  from their keywords). Defaults are get_step_fn's (score_sde).
  """
  reduce_mean: bool = False
  continuous: bool = True
  likelihood_weighting: bool = False
  importance_weighting: bool = False
  smallest_time: float = 1e-5  # eps: times are drawn on [smallest_time, T]
  score_matching_order: int = 1
  loss_weights: tuple = (1., 1., 1.)
  exact_jacobian: bool = False
  ema_rate: float = 0.999
  ema_start: int = 0
  nonfinite: str = 'stop'
  n_microbatches: int = 1  # the batch's rows are split into this many for memory (same update)
  remat: str = 'none'  # a REMAT_POLICIES name: what the score network keeps for the backward pass

  def __post_init__(self):
    object.__setattr__(self, 'loss_weights', tuple(self.loss_weights))  # hashable, as configs
    order = self.score_matching_order
    if order not in ORDERS:
      raise ValueError(f'training.score_matching_order is {order!r}: set '
                       '--config.training.score_matching_order to 1, 2 or 3.')
    if order > 1 and not self.reduce_mean:
      raise ValueError(f'Order-{order} score matching needs training.reduce_mean=True (the losses '
                       'are normalised per dimension): add --config.training.reduce_mean=True.')
    if len(self.loss_weights) != 3:
      raise ValueError(f'training.loss_weights has {len(self.loss_weights)} entries: give three '
                       '(order 1, 2, 3), e.g. --config.training.loss_weights="(1.,1.,1.)".')
    if self.nonfinite not in NONFINITE_MODES:
      raise ValueError(f"training.nonfinite is '{self.nonfinite}': set it to 'stop' or 'skip'.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"training.remat is '{self.remat}': set --config.training.remat to one of "
                       f"{', '.join(REMAT_POLICIES)}.")
    if not isinstance(self.n_microbatches, int) or self.n_microbatches < 1:
      raise ValueError(f'training.n_microbatches is {self.n_microbatches!r}: set it to 1 (no '
                       'split) or a divisor of the per-device batch.')

  @classmethod
  def from_config(cls, config):
    """The options of config.training and config.model (ema_rate, ema_start) that training uses."""
    t = config.training
    return cls(reduce_mean=t.reduce_mean, continuous=t.continuous,
               likelihood_weighting=t.likelihood_weighting,
               importance_weighting=t.importance_weighting, smallest_time=t.smallest_time,
               score_matching_order=t.score_matching_order, loss_weights=tuple(t.loss_weights),
               exact_jacobian=t.exact_jacobian, ema_rate=config.model.ema_rate,
               ema_start=config.model.get('ema_start', 0), nonfinite=t.nonfinite,
               n_microbatches=t.get('n_microbatches', 1), remat=t.get('remat', 'none'))


def _first_order_losses(sde, data, t, z, std, score, options):
  """Per-example order-1 DSM loss of `score`, g(t)^2-weighted with likelihood weighting and
  uniform time (importance-sampled time carries the weight in its density instead)."""
  reduce_op = jnp.mean if options.reduce_mean else (lambda x, axis: 0.5 * jnp.sum(x, axis=axis))
  if options.likelihood_weighting and not options.importance_weighting:
    g2 = sde.sde(jnp.zeros_like(data), t)[1] ** 2
    return reduce_op(flat(jnp.square(score + batch_mul(z, 1. / std))), axis=-1) * g2
  return reduce_op(flat(jnp.square(batch_mul(score, std) + z)), axis=-1)


def score_matching_losses(sde, score_fn, data, t, z, v=None, rng=None, options=None):
  """Per-example DSM losses of orders 1..score_matching_order at given t, z and probe v.

  score_fn(x, t, rng=None) -> (score, new_model_state); one that carries derivatives(x, t, order,
  rng=None) (models.utils.get_score_fn of a model with its own pass) gives high_order the exact
  x-derivatives by that pass. `data` is the clean batch (B, ...), `t`
  (B,), `z` the DSM noise (shape of data), `v` the Rademacher probe (orders 2 and 3 without
  exact_jacobian). `options`: a LossOptions (default LossOptions()). Returns (losses1,
  losses2, losses3, new_model_state), each loss of shape (B,); unused orders are zeros. Orders 2
  and 3 return new_model_state = None (the caller keeps the incoming state, as the original).
  The loss formulas are in the module docstring.
  """
  options = options or LossOptions()
  order = options.score_matching_order
  dim = int(np.prod(data.shape[1:]))
  if options.exact_jacobian and dim > MAX_EXACT_JACOBIAN_DIM:
    raise ValueError(f'exact_jacobian needs data of at most {MAX_EXACT_JACOBIAN_DIM} dimensions, '
                     f'got {dim}: set config.training.exact_jacobian = False.')

  mean, std = sde.marginal_prob(data, t)
  perturbed = mean + batch_mul(std, z)
  zeros = jnp.zeros((data.shape[0],), perturbed.dtype)
  losses2 = losses3 = zeros
  new_model_state = None
  if order == 1:
    score, new_model_state = score_fn(perturbed, t, rng=rng)
  else:
    fn = lambda x: score_fn(x, t, rng=rng)[0]
    if hasattr(score_fn, 'derivatives'):
      fn = high_order.with_derivatives(fn, lambda x, o: score_fn.derivatives(x, t, o, rng=rng))
    if options.exact_jacobian:
      score, losses2, losses3 = high_order.exact_jacobian_losses(fn, perturbed, std, z, order, dim)
    else:
      score, losses2, losses3 = high_order.hutchinson_losses(fn, perturbed, std, z, v, order, dim)
    losses3 = zeros if losses3 is None else losses3
  losses1 = _first_order_losses(sde, data, t, z, std, score, options)
  return losses1, losses2, losses3, new_model_state


def _draw(rng, sde, data, options):
  """((t, z, v), model_rng): the times, DSM noise and Rademacher probe (None unless orders 2/3
  without exact_jacobian) of a whole batch, drawn before any split into microbatches."""
  t_rng, z_rng, v_rng, model_rng = jax.random.split(rng, 4)
  if options.likelihood_weighting and options.importance_weighting:
    t = sde.sample_importance_weighted_time_for_likelihood(t_rng, (data.shape[0],),
                                                           eps=options.smallest_time)
  else:
    t = jax.random.uniform(t_rng, (data.shape[0],), minval=options.smallest_time, maxval=sde.T)
  z = jax.random.normal(z_rng, data.shape, data.dtype)
  v = None
  if options.score_matching_order > 1 and not options.exact_jacobian:
    v = jax.random.rademacher(v_rng, data.shape, data.dtype)
  return (t, z, v), model_rng


def _summed_terms(sde, score_fn, data, draws, model_rng, options, batch_size):
  """(loss, (new_state or None, [loss1, loss2, loss3])) of `data`'s rows, each term summed and
  divided by batch_size (the whole batch's, so microbatch results add up to the batch means)."""
  t, z, v = draws
  terms = score_matching_losses(sde, score_fn, data, t, z, v, rng=model_rng, options=options)
  means = jnp.stack([jnp.sum(x) for x in terms[:3]]) / batch_size
  return jnp.dot(jnp.asarray(options.loss_weights, means.dtype), means), (terms[3], means)


def microbatches(x, n):
  """(n, B / n, ...) from (B, ...): microbatch m holds rows m, m + n, m + 2n, ..., so each
  device's contiguous block of rows splits into local microbatches (no data moves)."""
  return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)


def remat_score_fn(score_fn, remat):
  """score_fn(x, t, rng=None) (and its derivatives pass, if it carries one) under the
  jax.checkpoint policy REMAT_POLICIES[remat]."""
  if REMAT_POLICIES[remat] is None:
    return score_fn
  policy = REMAT_POLICIES[remat]
  checkpointed = jax.checkpoint(lambda x, t, rng: score_fn(x, t, rng=rng), policy=policy)
  remat_fn = lambda x, t, rng=None: checkpointed(x, t, rng)
  if hasattr(score_fn, 'derivatives'):
    derivatives = jax.checkpoint(lambda x, t, order, rng: score_fn.derivatives(x, t, order, rng),
                                 policy=policy, static_argnums=(2,))
    remat_fn.derivatives = lambda x, t, order, rng=None: derivatives(x, t, order, rng)
  return remat_fn


def get_loss_from_score_fn(sde, options=None):
  """loss_fn(rng, score_fn, states, batch) -> (loss, (new_model_state, loss1, loss2, loss3)).

  The body of get_sde_loss_fn for a given score_fn(x, t, rng=None) -> (score, new_state): draws
  t (uniform on [smallest_time, T], or importance-sampled with likelihood and importance
  weighting), the DSM noise z and the Rademacher probe v, and averages score_matching_losses over
  the batch. loss1..loss3 are unweighted batch means; loss = w1 loss1 + w2 loss2 + w3 loss3.
  `options`: a LossOptions (default LossOptions()).
  """
  options = options or LossOptions()

  def loss_fn(rng, score_fn, states, batch):
    data = batch['image']
    draws, model_rng = _draw(rng, sde, data, options)
    loss, (new_state, means) = _summed_terms(sde, score_fn, data, draws, model_rng, options,
                                             data.shape[0])
    return loss, (states if new_state is None else new_state, *means)

  return loss_fn


def get_loss_and_grad_fn(sde, model, train, options, grad=True):
  """fn(rng, params, states, batch) -> ((loss, (new_state, loss1, loss2, loss3)), grads).

  The loss of get_sde_loss_fn and its gradient wrt params (None unless grad), accumulated over
  options.n_microbatches slices of the batch (see `microbatches`; a lax.scan, unrolled where
  parallel.loops_unrolled()): t, z and v are drawn for the whole batch first, so any split gives the
  unsplit step's loss and gradient up to float rounding (dropout masks are drawn per
  microbatch). The model state passes from one microbatch to the next. The network runs under
  the options.remat policy.
  """
  from models import utils as mutils  # here, so that importing losses does not import models
  n = options.n_microbatches

  def part(params, states, data, draws, model_rng, batch_size):
    score_fn = remat_score_fn(mutils.get_score_fn(sde, model, params, states, train=train,
                                                  continuous=options.continuous,
                                                  return_state=True), options.remat)
    loss, (new_state, means) = _summed_terms(sde, score_fn, data, draws, model_rng, options,
                                             batch_size)
    # Same container types as the incoming state (a scan carry must keep its pytree structure).
    new_state = states if new_state is None else jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(states), jax.tree_util.tree_leaves(new_state))
    return loss, (new_state, means)

  value_fn = (jax.value_and_grad(part, has_aux=True) if grad
              else lambda *args: (part(*args), None))

  def fn(rng, params, states, batch):
    data = batch['image']
    b = data.shape[0]
    if b % n:
      raise ValueError(f'A batch of {b} cannot be split into training.n_microbatches={n}: set '
                       'it to a divisor of the per-device batch.')
    draws, model_rng = _draw(rng, sde, data, options)
    if n == 1:
      (loss, (states, means)), grads = value_fn(params, states, data, draws, model_rng, b)
      return (loss, (states, *means)), grads

    def body(carry, xs):
      loss, means, grads, states = carry
      (part_loss, (states, part_means)), part_grads = value_fn(params, states, *xs, b)
      if grad:
        grads = jax.tree_util.tree_map(jnp.add, grads, part_grads)
      return (loss + part_loss, means + part_means, grads, states), None
    xs = (microbatches(data, n), jax.tree_util.tree_map(lambda a: microbatches(a, n), draws),
          jax.random.split(model_rng, n))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params) if grad else None
    carry = (jnp.zeros((), data.dtype), jnp.zeros((3,), data.dtype), zeros, states)
    if parallel.loops_unrolled():
      for m in range(n):
        carry = body(carry, jax.tree_util.tree_map(lambda a, m=m: a[m], xs))[0]
    else:
      carry = jax.lax.scan(body, carry, xs)[0]
    loss, means, grads, states = carry
    return (loss, (states, *means)), grads

  return fn


def get_loss_fn(sde, model, train, options):
  """loss_fn(rng, params, states, batch) -> (loss, (new_model_state, loss1, loss2, loss3)).

  The score of `model` comes from models.utils.get_score_fn (score_sde conventions); batch['image']
  is (B, ...) (images or flat vectors). `options`: a LossOptions (its n_microbatches and remat
  apply). Orders 2 and 3 need reduce_mean; exact_jacobian needs dim <= 2 (checked when the batch
  is seen). See the module docstring for the formulas.
  """
  fn = get_loss_and_grad_fn(sde, model, train, options, grad=False)
  return lambda rng, params, states, batch: fn(rng, params, states, batch)[0]


def get_sde_loss_fn(sde, model, train, reduce_mean=True, continuous=True, likelihood_weighting=True,
                    importance_weighting=True, eps=1e-5, score_matching_order=1,
                    loss_weights=(1., 1., 1.), exact_jacobian=False):
  """score_sde's (and score_flow's) entry point, with their defaults: get_loss_fn with the
  LossOptions of these keywords (eps is smallest_time)."""
  return get_loss_fn(sde, model, train, LossOptions(
    reduce_mean=reduce_mean, continuous=continuous, likelihood_weighting=likelihood_weighting,
    importance_weighting=importance_weighting, smallest_time=eps,
    score_matching_order=score_matching_order, loss_weights=loss_weights,
    exact_jacobian=exact_jacobian))


def all_finite(tree):
  """Whether every array of a pytree is finite (a traced bool; True for an empty tree)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def get_step_fn(sde, model, train, optimize_fn=None, reduce_mean=False, continuous=True,
                likelihood_weighting=False, importance_weighting=False, smallest_time=1e-5,
                score_matching_order=1, loss_weights=(1., 1., 1.), exact_jacobian=False,
                ema_rate=0.999, ema_start=0, nonfinite='stop'):
  """score_sde's entry point, with its defaults: get_train_step_fn with the LossOptions of these
  keywords."""
  return get_train_step_fn(sde, model, train, optimize_fn, LossOptions(
    reduce_mean=reduce_mean, continuous=continuous, likelihood_weighting=likelihood_weighting,
    importance_weighting=importance_weighting, smallest_time=smallest_time,
    score_matching_order=score_matching_order, loss_weights=loss_weights,
    exact_jacobian=exact_jacobian, ema_rate=ema_rate, ema_start=ema_start, nonfinite=nonfinite))


def get_train_step_fn(sde, model, train, optimize_fn, options):
  """step_fn(state, batch) -> (new_state, metrics) for one training or evaluation step.

  The training loop runs config.training.n_jitted_steps of them per call (parallel.py); data
  parallelism comes from the jit shardings of the batch (the loss and gradient are over the
  global batch; no pmap or pmean here). `options`: a LossOptions (LossOptions.from_config).

  Train: value_and_grad of the loss on state.params, the optax update `optimize_fn` (from
  optim.get_optimizer), the EMA params_ema <- ema_rate params_ema + (1 - ema_rate) params (a copy of the
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
  if not options.continuous:  # the loss alone takes discrete labels (score_sde); the step does not
    raise ValueError(f'Discrete-time training of {sde.__class__.__name__} is not supported: set '
                     'config.training.continuous = True.')
  if train and optimize_fn is None:
    raise ValueError('A training step needs optimize_fn: pass optim.get_optimizer(config).')
  loss_fn = get_loss_and_grad_fn(sde, model, train, options, grad=train)

  def step_fn(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    if train:
      (loss, (new_model_state, loss1, loss2, loss3)), grads = loss_fn(
        step_rng, state.params, state.model_state, batch)
      finite = jnp.logical_and(jnp.isfinite(loss), all_finite(grads))
      updates, new_opt_state = optimize_fn.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
      copy = state.step < options.ema_start
      new_params_ema = jax.tree_util.tree_map(
        lambda e, p: jnp.where(copy, p, e * options.ema_rate + p * (1. - options.ema_rate)),
        state.params_ema, new_params)
      updated = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                              model_state=new_model_state, params_ema=new_params_ema, rng=rng)
      if options.nonfinite == 'skip':
        failed = state.replace(step=state.step + 1, rng=rng,
                               nonfinite_count=state.nonfinite_count + 1)
      else:
        failed = state
      new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), updated, failed)
    else:
      (loss, (_, loss1, loss2, loss3)), _ = loss_fn(step_rng, state.params_ema,
                                                    state.model_state, batch)
      finite = jnp.isfinite(loss)
      new_state = state.replace(rng=rng)
    metrics = {'loss': loss, 'loss1': loss1, 'loss2': loss2, 'loss3': loss3, 'finite': finite}
    return new_state, metrics

  return step_fn


# ----------------------------------------------------------------------------------------------
# Variational dequantization (score_flow)
# ----------------------------------------------------------------------------------------------


def dequantization_losses(rng, score_fn, dequantizer, data, sde, scaler, inverse_scaler,
                          importance_weighting=True, eps=1e-5, offset=True, bits=8):
  """Per-example (losses in nats, bits/dim) of score_flow's dequantizer objective (b-bit data).

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
  import bound_likelihood
  from likelihood import dequantize, nll_to_bpd
  from models.flowpp import log_q
  u_rng, deq_rng, bound_rng = jax.random.split(rng, 3)
  x = inverse_scaler(data)
  u = jax.random.normal(u_rng, data.shape, data.dtype)
  noise, sldj = dequantizer(u, x, rng=deq_rng)
  y = scaler(dequantize(x, noise, bits))
  nll = bound_likelihood.likelihood_bound(bound_rng, score_fn, y, sde, dsm=True, eps=eps,
                                          importance_weighting=importance_weighting,
                                          offset=offset, N=1)
  losses = nll + log_q(u, sldj)
  return losses, nll_to_bpd(losses, data.shape, inverse_scaler, bits=bits)


def get_dequantization_loss_fn(sde, score_model, deq_model, scaler, inverse_scaler, train=True,
                               importance_weighting=True, eps=1e-5, offset=True, bits=8):
  """loss_fn(rng, deq_params, score_params, score_state, batch) -> (loss, bpd).

  score_flow's get_dequantization_loss_fn: the mean over the batch of dequantization_losses
  (nats per example, the quantity differentiated) and its mean bits/dim. The score model
  (score_model with score_params / score_state, eval mode, continuous time) is held fixed; the
  caller differentiates with respect to deq_params (argnums=1) only. Dropout of the dequantizer
  (config.deq.dropout) acts when train is True.
  """
  from models import flowpp
  from models import utils as mutils

  def loss_fn(rng, deq_params, score_params, score_state, batch):
    score_fn = mutils.get_score_fn(sde, score_model, score_params, score_state, train=False,
                                   continuous=True)
    dequantizer = flowpp.get_dequantizer(deq_model, deq_params, train=train)
    losses, bpd = dequantization_losses(
      rng, score_fn, dequantizer, batch['image'], sde, scaler, inverse_scaler,
      importance_weighting=importance_weighting, eps=eps, offset=offset, bits=bits)
    return jnp.mean(losses), jnp.mean(bpd)

  return loss_fn
