"""Logistic and mixture-of-logistics densities, CDFs and inverse CDFs (elementwise).

Follows the Flow++ code (Ho et al. 2019) that score_flow ported. The mixture CDF is also offered
in logit space (`mixlogistic_logit_cdf`), computed from log F and log(1 - F) so that it stays
exact where F rounds to 0 or 1 in float32; the coupling layers use it.
Mixture parameters carry one trailing axis of K components over the shape of `x`.
"""
import jax
import jax.numpy as jnp


def logistic_logpdf(*, x, mean, logscale):
  """log density of Logistic(mean, exp(logscale))."""
  z = (x - mean) * jnp.exp(-logscale)
  return z - logscale - 2. * jax.nn.softplus(z)


def logistic_logcdf(*, x, mean, logscale):
  """log CDF of Logistic(mean, exp(logscale))."""
  z = (x - mean) * jnp.exp(-logscale)
  return jax.nn.log_sigmoid(z)


def logistic_logsf(*, x, mean, logscale):
  """log survival function log(1 - CDF) of Logistic(mean, exp(logscale))."""
  z = (x - mean) * jnp.exp(-logscale)
  return jax.nn.log_sigmoid(-z)


def _check(x, prior_logits, means, logscales):
  if not (x.ndim + 1 == prior_logits.ndim == means.ndim == logscales.ndim):
    raise ValueError('mixture parameters need one more (component) axis than x; '
                     f'got x {x.shape}, logits {prior_logits.shape}.')


def _mix(fn, x, prior_logits, means, logscales):
  _check(x, prior_logits, means, logscales)
  return jax.nn.logsumexp(
    jax.nn.log_softmax(prior_logits, axis=-1)
    + fn(x=jnp.expand_dims(x, -1), mean=means, logscale=logscales), axis=-1)


def mixlogistic_logpdf(*, x, prior_logits, means, logscales):
  """log density of a mixture of logistics."""
  return _mix(logistic_logpdf, x, prior_logits, means, logscales)


def mixlogistic_logcdf(*, x, prior_logits, means, logscales):
  """log CDF of a mixture of logistics."""
  return _mix(logistic_logcdf, x, prior_logits, means, logscales)


def mixlogistic_logsf(*, x, prior_logits, means, logscales):
  """log(1 - CDF) of a mixture of logistics."""
  return _mix(logistic_logsf, x, prior_logits, means, logscales)


def mixlogistic_logit_cdf(*, x, prior_logits, means, logscales):
  """logit(F(x)) = log F - log(1 - F) of the mixture CDF F, and log F, log(1 - F)."""
  kw = dict(prior_logits=prior_logits, means=means, logscales=logscales)
  logcdf = mixlogistic_logcdf(x=x, **kw)
  logsf = mixlogistic_logsf(x=x, **kw)
  return logcdf - logsf, logcdf, logsf


def mixlogistic_sample(rng, *, prior_logits, means, logscales):
  """Draw one sample per element from a mixture of logistics."""
  rng_c, rng_u = jax.random.split(rng)
  inds = jax.random.categorical(rng_c, prior_logits, axis=-1)
  onehot = jax.nn.one_hot(inds, prior_logits.shape[-1], dtype=means.dtype)
  mean = jnp.sum(means * onehot, axis=-1)
  logscale = jnp.sum(logscales * onehot, axis=-1)
  u = jax.random.uniform(rng_u, mean.shape, minval=1e-5, maxval=1. - 1e-5)
  return mean + jnp.exp(logscale) * (jnp.log(u) - jnp.log1p(-u))


def _bisect(fn, target, lb, ub, iters):
  """Solve fn(x) = target for elementwise increasing fn by bisection on [lb, ub]."""

  def body(carry, _):
    lb, ub = carry
    mid = 0.5 * (lb + ub)
    above = fn(mid) > target
    return (jnp.where(above, lb, mid), jnp.where(above, mid, ub)), None

  (lb, ub), _ = jax.lax.scan(body, (lb, ub), None, length=iters)
  return 0.5 * (lb + ub)


def _bounds(means, logscales, init_bounds_scale):
  # Every component's CDF is within exp(-init_bounds_scale) of 0 / 1 outside these bounds.
  maxscales = jnp.sum(jnp.exp(logscales), axis=-1, keepdims=True)
  lb = jnp.min(means - init_bounds_scale * maxscales, axis=-1)
  ub = jnp.max(means + init_bounds_scale * maxscales, axis=-1)
  return lb, ub


def mixlogistic_invcdf(*, y, prior_logits, means, logscales, iters=100, init_bounds_scale=200.):
  """Inverse of the mixture CDF at probabilities y in (0, 1), by bisection (as Flow++)."""
  _check(y, prior_logits, means, logscales)
  kw = dict(prior_logits=prior_logits, means=means, logscales=logscales)
  lb, ub = _bounds(means, logscales, init_bounds_scale)
  return _bisect(lambda x: mixlogistic_logcdf(x=x, **kw), jnp.log(y), lb, ub, iters)


def mixlogistic_inv_logit_cdf(*, y, prior_logits, means, logscales, iters=100,
                              init_bounds_scale=200.):
  """Inverse of x -> logit(F(x)) at real y, by bisection in logit space."""
  _check(y, prior_logits, means, logscales)
  kw = dict(prior_logits=prior_logits, means=means, logscales=logscales)
  lb, ub = _bounds(means, logscales, init_bounds_scale)
  return _bisect(lambda x: mixlogistic_logit_cdf(x=x, **kw)[0], y, lb, ub, iters)
