"""Build and apply the Flow++ dequantizer from a config (score_flow models/utils.py parts).

Sign convention. `dequantizer(u, x)` returns (noise, sldj) with sldj = log |det d noise / d u|
per example (the flow's forward log-determinant), so that

  log q(noise | x) = log N(u; 0, I) - sldj.

score_flow's dequantizer returned instead (noise, sldj - log N(u)) = (noise, -log q(noise | x))
under the same name `sldj`; its loss was `-log p(y) - that` and its eval added
`-that / (D ln 2)` bits/dim. `neg_log_q(u, sldj)` gives that quantity from ours.
"""
import jax
import jax.numpy as jnp
import numpy as np

from .dequantization import AUTO, Dequantization, auto_variant, get_variant


def std_normal_logpdf(u):
  """Per-example log N(u; 0, I), summed over all but the batch axis."""
  lp = -0.5 * jnp.square(u) - 0.5 * np.log(2 * np.pi)
  return jnp.sum(lp.reshape((u.shape[0], -1)), axis=-1)


def log_q(u, sldj):
  """log q(noise | x) of the noise made from u, given the dequantizer's sldj."""
  return std_normal_logpdf(u) - sldj


def neg_log_q(u, sldj):
  """-log q(noise | x): the second output of score_flow's dequantizer."""
  return sldj - std_normal_logpdf(u)


def model_name(config):
  """config.deq.model, with 'auto' resolved from config.data as score_flow chose (auto_variant)."""
  name = config.deq.model
  if name == AUTO:
    return auto_variant(config.data.dataset, config.data.image_size)
  get_variant(name)  # unknown -> ValueError naming the field
  return name


def get_model(config):
  """The (uninitialised) Dequantization module of config.deq.model with config.deq.dropout."""
  return Dequantization(variant=get_variant(model_name(config)), dropout=float(config.deq.dropout))


def _check_batch(config, batch):
  shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  batch = jnp.asarray(batch, jnp.float32)
  if batch.ndim != 4 or tuple(batch.shape[1:]) != shape:
    raise ValueError(f'dequantizer init batch must have shape (B, {shape[0]}, {shape[1]}, '
                     f'{shape[2]}) from config.data; got {tuple(batch.shape)}.')
  return batch


def _rbg_key(rng):
  # Parameter draws from an 'rbg' key derived from rng: the same values for the same rng on one
  # platform, and XLA compiles the init several times faster than with threefry draws.
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')


def init_dequantizer(rng, config, batch=None, u=None, jit=False):
  """-> (model, params). Data-dependent init on `batch` (images in [0, 1], NHWC).

  u: the N(0, I) input of the init pass (batch's shape; drawn from rng when None).
  jit: compile the init pass as one program. Faster for small models; the full-size variants
  init in ~20 s op by op but take minutes to compile (imagenet32: ~4 min on CPU).
  Without a batch the init uses uniform random images (up to 64, from rng) so that the
  data-dependent scales stay finite; use that when params will be restored from a checkpoint.
  """
  if config.data.image_size % 2:
    raise ValueError(f'dequantizer needs an even config.data.image_size; got '
                     f'{config.data.image_size}.')
  model = get_model(config)
  data_rng, params_rng = jax.random.split(rng)
  if batch is None:
    n = min(int(config.training.batch_size), 64)
    batch = jax.random.uniform(data_rng, (n, config.data.image_size, config.data.image_size,
                                          config.data.num_channels))
  batch = _check_batch(config, batch)
  return model, init_params(params_rng, model, batch, u=u, jit=jit)


def init_params(rng, model, batch, u=None, jit=False):
  """Data-dependent init of a Dequantization module on images `batch` -> params."""
  batch = jnp.asarray(batch, jnp.float32)
  u_rng, params_rng, dropout_rng = jax.random.split(rng, 3)
  if u is None:
    u = jax.random.normal(u_rng, batch.shape, batch.dtype)
  elif tuple(jnp.shape(u)) != batch.shape:
    raise ValueError(f'init u must have the batch shape {batch.shape}; got {jnp.shape(u)}.')
  init = lambda rngs, u, x: model.init(rngs, u, x, inverse=False, train=False)['params']
  if jit:
    init = jax.jit(init)
  return init({'params': _rbg_key(params_rng), 'dropout': dropout_rng}, u, batch)


def get_dequantizer(model, params, train=False):
  """-> dequantizer(u, x, rng=None) -> (noise in (0, 1), sldj = log |det d noise / d u|).

  u ~ N(0, I) and x in [0, 1] share one NHWC shape. rng drives dropout when train is True.
  """

  def dequantizer(u, x, rng=None):
    if train and model.dropout > 0:
      if rng is None:
        raise ValueError('the training dequantizer with dropout needs rng; pass rng=key.')
      return model.apply({'params': params}, u, x, inverse=False, train=True,
                         rngs={'dropout': rng})
    return model.apply({'params': params}, u, x, inverse=False, train=False)

  return dequantizer


def get_inverse_dequantizer(model, params):
  """-> inverse(noise, x) -> (u, sldj): the u that makes noise, and the forward sldj at that u
  (so log q(noise | x) = log N(u) - sldj, as for the forward dequantizer). Evaluation mode;
  the mixture-CDF inverse is a bisection (used for tests and density evaluation)."""

  def inverse(noise, x):
    u, inv_sldj = model.apply({'params': params}, noise, x, inverse=True, train=False)
    return u, -inv_sldj

  return inverse
