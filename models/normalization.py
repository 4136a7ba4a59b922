"""Normalisation layers of score_sde (`models/normalization.py`), NHWC.

GroupNorm is Flax's own (scale/bias of shape (C,); legacy checkpoints store (1, 1, 1, C), which the
checkpoint importer reshapes). The NCSN normalisations keep their (1, 1, 1, C) parameters as the
original code created them.
"""
import functools

import flax.linen as nn
import jax.nn.initializers as init
import jax.numpy as jnp

NORMALIZATIONS = ('GroupNorm', 'InstanceNorm', 'InstanceNorm++', 'VarianceNorm')


def get_normalization(config, conditional=False):
  """The normaliser class named by config.model.normalization (a noise-conditional one when
  `conditional`, which needs config.model.num_classes)."""
  norm = config.model.normalization
  if conditional:
    if norm == 'InstanceNorm++':
      return functools.partial(ConditionalInstanceNorm2dPlus, num_classes=config.model.num_classes)
    raise ValueError(f"No conditional version of normalization '{norm}': use "
                     "config.model.normalization = 'InstanceNorm++'.")
  if norm == 'InstanceNorm':
    return InstanceNorm2d
  if norm == 'InstanceNorm++':
    return InstanceNorm2dPlus
  if norm == 'VarianceNorm':
    return VarianceNorm2d
  if norm == 'GroupNorm':
    return nn.GroupNorm
  raise ValueError(f"Unknown normalization '{norm}': set config.model.normalization to one of "
                   f"{', '.join(NORMALIZATIONS)}.")


def _near_one(key, shape, dtype=jnp.float32):
  """N(1, 0.02^2) initialiser of NCSN's scales."""
  return init.normal(0.02)(key, shape, dtype) + 1.


def _instance_stats(x):
  """Per-example, per-channel spatial mean and variance, keepdims (B, 1, 1, C)."""
  return jnp.mean(x, axis=(1, 2), keepdims=True), jnp.var(x, axis=(1, 2), keepdims=True)


def _means_plus(x):
  """InstanceNorm++'s normalised channel means (B, C) (the mean information IN would drop)."""
  means = jnp.mean(x, axis=(1, 2))
  m = jnp.mean(means, axis=-1, keepdims=True)
  v = jnp.var(means, axis=-1, keepdims=True)
  return (means - m) / jnp.sqrt(v + 1e-5)


class VarianceNorm2d(nn.Module):
  """Divide each channel by its spatial std (no centring); learnable scale (and bias)."""
  bias: bool = False

  @nn.compact
  def __call__(self, x):
    _, variance = _instance_stats(x)
    h = x / jnp.sqrt(variance + 1e-5)
    h = h * self.param('scale', _near_one, (1, 1, 1, x.shape[-1]))
    if self.bias:
      h = h + self.param('bias', init.zeros, (1, 1, 1, x.shape[-1]))
    return h


class InstanceNorm2d(nn.Module):
  """Instance normalisation with learnable scale (and bias)."""
  bias: bool = True

  @nn.compact
  def __call__(self, x):
    mean, variance = _instance_stats(x)
    h = (x - mean) / jnp.sqrt(variance + 1e-5)
    h = h * self.param('scale', init.ones, (1, 1, 1, x.shape[-1]))
    if self.bias:
      h = h + self.param('bias', init.zeros, (1, 1, 1, x.shape[-1]))
    return h


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ of NCSN: instance norm plus alpha * normalised channel means."""
  bias: bool = True

  @nn.compact
  def __call__(self, x):
    mean, variance = _instance_stats(x)
    h = (x - mean) / jnp.sqrt(variance + 1e-5)
    alpha = self.param('alpha', _near_one, (1, 1, 1, x.shape[-1]))
    h = h + _means_plus(x)[:, None, None, :] * alpha
    h = h * self.param('gamma', _near_one, (1, 1, 1, x.shape[-1]))
    if self.bias:
      h = h + self.param('beta', init.zeros, (1, 1, 1, x.shape[-1]))
    return h


class ConditionalInstanceNorm2dPlus(nn.Module):
  """Noise-conditional InstanceNorm++ (NCSN): gamma, alpha (and beta) looked up per class y."""
  num_classes: int = 10
  bias: bool = True

  @nn.compact
  def __call__(self, x, y):
    C = x.shape[-1]
    mean, variance = _instance_stats(x)
    h = (x - mean) / jnp.sqrt(variance + 1e-5)
    means_plus = _means_plus(x)
    if self.bias:
      def init_embed(key, shape, dtype=jnp.float32):
        feature_size = shape[1] // 3
        return jnp.concatenate([_near_one(key, (shape[0], 2 * feature_size), dtype),
                                jnp.zeros((shape[0], feature_size), dtype)], axis=-1)
      embed = nn.Embed(num_embeddings=self.num_classes, features=C * 3, embedding_init=init_embed)
      gamma, alpha, beta = jnp.split(embed(y), 3, axis=-1)
    else:
      embed = nn.Embed(num_embeddings=self.num_classes, features=C * 2, embedding_init=_near_one)
      gamma, alpha = jnp.split(embed(y), 2, axis=-1)
    h = h + means_plus[:, None, None, :] * alpha[:, None, None, :]
    out = gamma[:, None, None, :] * h
    if self.bias:
      out = out + beta[:, None, None, :]
    return out
