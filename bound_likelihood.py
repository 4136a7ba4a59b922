"""score_flow's variational upper bound on -log p (bits/dim), for any score function.

For x_t ~ p_0t(. | x) (the Gaussian perturbation kernel of the forward SDE dx = f dt + g dw):

  -log p(x) <= E[-log pi(x_T)] + 1/2 int_eps^T E[integrand(t)] dt  (+ offset(x)),

  DSM form: integrand = g^2 (|s(x_t) - grad log p_0t(x_t | x)|^2 - |grad log p_0t(x_t | x)|^2)
                        - 2 div f(x_t)
  SSM form: integrand = g^2 (2 div s(x_t) + |s(x_t)|^2) - 2 div f(x_t)   (Hutchinson div)

(the two have the same expectation by Stein's identity). The time integral is a Monte Carlo
average over N times, uniform on [eps, T] or, with importance weighting, drawn with density
g^2 / sigma^2 / Z (integrand times Z sigma^2 / g^2). The prior term uses one sample x_T.
Deviation from score_flow: the uniform-time average is multiplied by the interval length T - eps
(the original omitted it: a relative bias of eps, invisible at eps = 1e-5, 5% at eps = 0.05).

The eps offset (get_likelihood_offset_fn) closes the gap between t = eps and t = 0 with a
Gaussian decoder q(x | x_eps) = N((x_eps + sigma_eps^2 s(x_eps)) / alpha_eps,
(sigma_eps / alpha_eps)^2 I) (Tweedie's mean): offset = E[-log q(x | x_eps)] - H[p_0eps(. | x)].
With the exact score and prior pi = p_T the expectation of the bound is exactly -log p(x).

Shape-agnostic: data (B, ...) images or flat vectors.
"""
import jax
import jax.numpy as jnp
import numpy as np

import divergence
from divergence import batch_mul, batch_sum
from likelihood import nll_to_bpd
from models import utils as mutils


def _alpha(sde, data, t):
  """Per-example mean coefficient a_t of the kernel p_0t(x_t | x) = N(a_t x, sigma_t^2 I)."""
  ones = jnp.ones_like(data)
  return batch_sum(sde.marginal_prob(ones, t)[0]) / np.prod(data.shape[1:])


def get_likelihood_offset_fn(sde, score_fn, eps=1e-5):
  """offset_fn(rng, data) -> (B,) nats: one-sample estimate of E[-log q(x | x_eps)] - H[p_0eps]."""

  def likelihood_offset_fn(rng, data):
    dim = np.prod(data.shape[1:])
    eps_vec = jnp.full((data.shape[0],), eps, data.dtype)
    p_mean, p_std = sde.marginal_prob(data, eps_vec)
    noisy = p_mean + batch_mul(p_std, jax.random.normal(rng, data.shape, data.dtype))
    score = score_fn(noisy, eps_vec)
    alpha = _alpha(sde, data, eps_vec)
    q_mean = batch_mul(1. / alpha, noisy + batch_mul(p_std ** 2, score))
    q_std = p_std / alpha
    p_entropy = dim / 2. * (np.log(2 * np.pi) + 2 * jnp.log(p_std) + 1.)
    q_recon = (dim / 2. * (np.log(2 * np.pi) + 2 * jnp.log(q_std))
               + 0.5 / q_std ** 2 * batch_sum(jnp.square(data - q_mean)))
    return q_recon - p_entropy

  return likelihood_offset_fn


def likelihood_bound(rng, score_fn, data, sde, dsm=True, eps=1e-5, importance_weighting=True,
                     offset=True, N=1000, hutchinson_type='Rademacher'):
  """Unbiased estimate of score_flow's upper bound on -log p(data), per example, in nats.

  Args:
    rng: key (times, perturbations, probes, prior and offset samples).
    score_fn: score_fn(x, t) with t of shape (B,).
    data: (B, ...) in the model's data space.
    sde: the forward SDE (sde_lib).
    dsm: denoising (True) or sliced (False, Hutchinson divergence of the score) form.
    eps: smallest time; offset: add the eps offset term (else the bound is on x_eps's density).
    importance_weighting: draw t with density prop. to g^2 / sigma^2 (variance reduction).
    N: number of time samples per example.
    hutchinson_type: probe of the divergences ('Rademacher' or 'Gaussian').

  Returns:
    nll bound (B,) in nats.
  """
  shape = data.shape
  rng, step_rng = jax.random.split(rng)
  if importance_weighting:
    times = sde.sample_importance_weighted_time_for_likelihood(step_rng, (N, shape[0]), eps=eps)
    Z = sde.likelihood_importance_cum_weight(sde.T, eps=eps)
  else:
    times = jax.random.uniform(step_rng, (N, shape[0]), minval=eps, maxval=sde.T)
    Z = sde.T - eps  # the original used 1: biased by the factor (T - eps), ~1e-5 at eps = 1e-5
  times = times.astype(data.dtype)
  drift_div_fn = divergence.get_div_fn(lambda x, t: sde.sde(x, t)[0])
  score_value_div_fn = divergence.get_value_div_fn(score_fn)

  def scan_fn(carry, vec_t):
    rng, value = carry
    rng, probe_rng, noise_rng = jax.random.split(rng, 3)
    probe = divergence.get_hutchinson_noise(probe_rng, shape, hutchinson_type).astype(data.dtype)
    noise = jax.random.normal(noise_rng, shape, data.dtype)
    mean, std = sde.marginal_prob(data, vec_t)
    noisy = mean + batch_mul(std, noise)
    drift_div = drift_div_fn(noisy, vec_t, probe)
    g = sde.sde(noisy, vec_t)[1]
    if dsm:
      score = score_fn(noisy, vec_t)
      kernel_score = batch_mul(-1. / std ** 2, noisy - mean)
      term = batch_sum(jnp.square(score - kernel_score)) - batch_sum(jnp.square(kernel_score))
    else:
      score, score_div = score_value_div_fn(noisy, vec_t, probe)
      term = 2 * score_div + batch_sum(jnp.square(score))
    integrand = g ** 2 * term - 2 * drift_div
    integrand = (std ** 2 / g ** 2 * Z if importance_weighting else Z) * integrand
    return (rng, value + integrand), None

  (rng, integral), _ = jax.lax.scan(scan_fn, (rng, jnp.zeros((shape[0],), data.dtype)), times)
  integral = integral / N
  mean, std = sde.marginal_prob(data, jnp.full((shape[0],), sde.T, data.dtype))
  rng, step_rng = jax.random.split(rng)
  x_T = mean + batch_mul(std, jax.random.normal(step_rng, shape, data.dtype))
  nll = -sde.prior_logp(x_T) + 0.5 * integral
  if offset:
    rng, step_rng = jax.random.split(rng)
    nll = nll + get_likelihood_offset_fn(sde, score_fn, eps)(step_rng, data)
  return nll


def get_bound_fn(sde, model, inverse_scaler, dsm=True, eps=1e-5, importance_weighting=True,
                 offset=True, N=1000, hutchinson_type='Rademacher', data_is_images=True,
                 return_nll=False, bits=8):
  """score_flow's get_likelihood_bound_fn for a flax model (score by models.utils.get_score_fn,
  train=False, continuous=True). Returns the jitted
  bound_fn(rng, params, model_state, data) -> bpd (B,) (and nll (B,) nats if return_nll);
  bits/dim with the b-bit image offset as likelihood.nll_to_bpd."""
  if data_is_images and inverse_scaler is None:
    raise ValueError('bits/dim of images need the inverse data scaler: pass inverse_scaler, or '
                     'data_is_images=False for flat (non-image) data.')

  @jax.jit
  def bound_fn(rng, params, model_state, data):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False, continuous=True)
    nll = likelihood_bound(rng, score_fn, data, sde, dsm=dsm, eps=eps,
                           importance_weighting=importance_weighting, offset=offset, N=N,
                           hutchinson_type=hutchinson_type)
    bpd = nll_to_bpd(nll, data.shape, inverse_scaler, data_is_images, bits)
    return (bpd, nll) if return_nll else bpd

  return bound_fn
