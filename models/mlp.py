"""The toy score network of mle_score_ode (toy.py `ScoreNetwork`) for flat data (B, D).

Architecture (toy.py, sizes from config.model): a sinusoidal embedding of the time t (temb_dim,
max period 10000) goes through t_encoder = MLP(encoder_layers + [2 temb_dim]); x goes through
x_encoder = MLP(encoder_layers + [2 temb_dim]); the concatenation goes through
net = MLP(decoder_layers + [D]). Each MLP is Dense layers with SiLU between them (none after the
last). Dense layers use PyTorch's nn.Linear initialisation, as toy.py did.

Label conventions (those of models.utils.get_score_fn, so the MLP is a drop-in score model):
- VE (training.sde 'vesde'), continuous: the label is sigma(t). The network embeds the toy time
  t = log(sigma / sigma_min) / log(sigma_max / sigma_min) (toy.py embedded t itself) and, with
  model.scale_by_sigma, returns net / sigma, i.e. the score (net is then minus the noise).
- VE, discrete: the label is an index i into the sigmas largest-first; t = 1 - i / (N - 1).
- VP / sub-VP / linear VE, continuous: the label is 999 t, so t = label / 999; the output
  predicts the noise and get_score_fn returns -output / std.
- VP, discrete: the label is t (N - 1).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import layers, utils


def _torch_linear_init(fan_in):
  """nn.Linear's default: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1. / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class MLP(nn.Module):
  """Dense layers of the given widths with `act` between them (not after the last)."""
  widths: tuple
  act: callable = nn.silu

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.widths):
      init = _torch_linear_init(x.shape[-1])
      x = nn.Dense(width, kernel_init=init, bias_init=init)(x)
      if i < len(self.widths) - 1:
        x = self.act(x)
    return x


def label_to_time(config, labels):
  """The toy time t in [0, 1] that a label of get_score_fn's convention encodes."""
  m = config.model
  sde = config.training.sde.lower()
  continuous = config.training.get('continuous', True)
  if sde == 'vesde':
    if continuous:
      return jnp.log(labels / m.sigma_min) / np.log(m.sigma_max / m.sigma_min)
    return 1. - labels / (m.num_scales - 1)
  if continuous:
    return labels / 999.
  return labels / (m.num_scales - 1)


@utils.register_model(name='mlp')
class ScoreMLP(nn.Module):
  """Toy score MLP: x (B, D), labels (B,) -> (B, D)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, labels, train=False):
    del train  # no dropout or normalisation
    config = self.config
    m = config.model
    if x.ndim != 2:
      raise ValueError(f"The 'mlp' model takes flat data (B, D), got shape {x.shape}: set "
                       'config.data.image_size = 0 and config.data.dim = D.')
    is_ve = config.training.sde.lower() == 'vesde'
    scale_by_sigma = m.get('scale_by_sigma', False)
    if scale_by_sigma and not is_ve:
      raise ValueError("config.model.scale_by_sigma needs training.sde = 'vesde' (the score "
                       'function rescales other SDEs): set config.model.scale_by_sigma = False.')
    temb_dim = m.temb_dim
    encoder = tuple(m.encoder_layers)
    t = label_to_time(config, labels.astype(jnp.float32))
    temb = layers.get_timestep_embedding(t, temb_dim)
    temb = MLP(encoder + (2 * temb_dim,), name='t_encoder')(temb)
    xemb = MLP(encoder + (2 * temb_dim,), name='x_encoder')(x)
    h = jnp.concatenate([xemb, temb], axis=-1)
    out = MLP(tuple(m.decoder_layers) + (x.shape[-1],), name='net')(h)
    if scale_by_sigma:
      if config.training.get('continuous', True):
        sigmas = labels
      else:
        sigmas = utils.get_sigmas(config)[labels.astype(jnp.int32)]
      out = out / sigmas[:, None]
    return out
