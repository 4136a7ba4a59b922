"""Dequantization of 8-bit images for bits/dim (eval.dequantizer): uniform noise, the Flow++
dequantizer of --mode train_deq, or i-DODE's training-free truncated normal."""
import jax
import jax.numpy as jnp
import numpy as np

import likelihood
import names


def get_dequantize_fn(config, workdir, deq_folder, sde=None, inverse_scaler=None):
  """dequantize_fn(rng, images in [0, 1]) -> (dequantized images in [0, 1], bpd correction (B,)).

  eval.dequantizer 'uniform' (score_flow's evaluation): (x * 255 + u) / 256, u ~ U[0, 1), no
  correction; 'flowpp': the Flow++ dequantizer of --mode train_deq (deq_lib.py);
  'truncated_normal' (needs sde and inverse_scaler): truncated_normal_dequantize_fn. Flat toy
  data are used as they are.
  """
  name = names.dequantizer_name(config.eval.dequantizer)
  if name == 'flowpp':
    import deq_lib
    return deq_lib.get_dequantize_fn(config, workdir, deq_folder)
  if names.is_toy(config):
    return lambda rng, x: (x, jnp.zeros(x.shape[:1], x.dtype))
  bits = likelihood.num_bits(config)
  if name == 'truncated_normal':
    return truncated_normal_dequantize_fn(sde, inverse_scaler, config.training.smallest_time, bits)

  @jax.jit
  def uniform(rng, images):
    u = jax.random.uniform(rng, images.shape, images.dtype)
    return likelihood.dequantize(images, u, bits), jnp.zeros(images.shape[:1], images.dtype)

  return uniform


def truncated_normal_dequantize_fn(sde, inverse_scaler, eps, bits=8):
  """i-DODE's training-free dequantizer (Zheng et al. 2023), as a get_dequantize_fn function.

  Noise in bin k of x = k / (2^b - 1) (position f in [0, 1) of likelihood.dequantize) is drawn
  from N(x, s^2) truncated to [0, 1], s = 2^b sigma_eps / (alpha_eps scale): the model's own
  perturbation at t = eps in pixel units (scale = d scaler / dx). i-DODE centred it on the bin
  centre, where its training data lay; ours lie at x (fraction x of the bin). The correction is
  log q(f) / (D ln 2), as Flow++'s: log q = log phi(z) - log s - log(Phi(b) - Phi(a)).
  """
  ones = jnp.ones((1,))
  mean, std = sde.marginal_prob(ones, jnp.full((1,), eps))
  slope = jax.grad(lambda x: jnp.sum(inverse_scaler(x)))(0.)
  s = float(2. ** bits * std[0] * slope / mean[0])

  @jax.jit
  def dequantize(rng, images):
    lower, upper = -images / s, (1. - images) / s
    z = jax.random.truncated_normal(rng, lower, upper, images.shape, images.dtype)
    f = jnp.clip(images + s * z, 0., 1. - 1e-6)
    log_z = jnp.log(jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower))
    log_q = jax.scipy.stats.norm.logpdf(z) - np.log(s) - log_z
    dim = int(np.prod(images.shape[1:]))
    correction = jnp.sum(log_q.reshape(images.shape[0], -1), axis=1) / (dim * np.log(2.))
    return likelihood.dequantize(images, f, bits), correction

  return dequantize
