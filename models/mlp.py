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
import functools

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
      out = out / _sigmas(config, labels)[:, None]
    return out

  def derivatives(self, x, labels, order):
    """(out, J, grad_x tr J or None) of __call__'s output wrt x by `taylor_derivatives`."""
    return taylor_derivatives(self.config, self.variables['params'], x, labels, order)


def _sigmas(config, labels):
  """The noise level sigma of each label (VE): the label itself, or the discrete sigmas'."""
  if config.training.get('continuous', True):
    return labels
  return utils.get_sigmas(config)[labels.astype(jnp.int32)]


def second_order_pairs(dim):
  """The pairs (i, j), i <= j, of the second-order streams: d^2 / dx_i dx_j."""
  return [(i, j) for i in range(dim) for j in range(i, dim)]


def _dense_streams(p, streams):
  """A Dense layer on a Taylor stack (a list of (B, in) streams): one matmul for every stream,
  the bias (constant in x) added to the value, stream 0, only."""
  return [streams[0] @ p['kernel'] + p['bias']] + [s @ p['kernel'] for s in streams[1:]]


def _silu_coefficients(h):
  """a(h) and SiLU's derivatives a', a'', a''' in closed form (sigma the logistic, p = sigma')."""
  sig = jax.nn.sigmoid(h)
  p = sig * (1. - sig)
  a1 = sig + h * p
  a2 = p * (2. + h * (1. - 2. * sig))
  a3 = p * (3. * (1. - 2. * sig) + h * (1. - 6. * p))
  return h * sig, a1, a2, a3


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _silu_streams(streams, dim):
  """SiLU on a Taylor stack [value, d_i (dim), d_ij (pairs)], in closed form:
  y = a(h), y_i = a'(h) d_i, y_ij = a'(h) d_ij + a''(h) d_i d_j. Its tangent rule is written
  out too, so that the parameter gradient is a few fused products rather than autodiff's chain
  through the logistic of every coefficient."""
  y, a1, a2, _ = _silu_coefficients(streams[0])
  first = streams[1:1 + dim]
  return ([y] + [a1 * d for d in first]
          + [a1 * d + a2 * first[i] * first[j]
             for d, (i, j) in zip(streams[1 + dim:], second_order_pairs(dim))])


@_silu_streams.defjvp
def _silu_streams_jvp(dim, primals, tangents):
  (streams,), (dots,) = primals, tangents
  dh = dots[0]
  y, a1, a2, a3 = _silu_coefficients(streams[0])
  first, dfirst = streams[1:1 + dim], dots[1:1 + dim]
  out, dout = [y], [a1 * dh]
  for d, dd in zip(first, dfirst):
    out.append(a1 * d)
    dout.append(a1 * dd + (a2 * d) * dh)
  for d, dd, (i, j) in zip(streams[1 + dim:], dots[1 + dim:], second_order_pairs(dim)):
    out.append(a1 * d + a2 * first[i] * first[j])
    dout.append(a1 * dd + a2 * (dfirst[i] * first[j] + first[i] * dfirst[j])
                + (a2 * d + a3 * first[i] * first[j]) * dh)
  return out, dout


def _mlp_streams(p, streams, dim):
  """MLP (Dense, SiLU between, none after the last) on a Taylor stack."""
  n = len(p)
  for i in range(n):
    streams = _dense_streams(p[f'Dense_{i}'], streams)
    if i < n - 1:
      streams = _silu_streams(streams, dim)
  return streams


def _output_streams(hidden, output, streams, dim, extra):
  """(out, J, grad_x tr J) of output(SiLU(hidden(streams) + extra)), the last hidden
  Dense layer, its SiLU and the output layer, from the Taylor stack at the hidden layer's input
  (`extra` is added to the value: the time embedding's share when the hidden layer is the first).

  The value and first-order streams go through the hidden kernel W; the second-order ones z_ij
  do not: d^2 out_m / dx_i dx_j = <a''(h) h_i h_j, K_m> + <z_ij, r_m> with r_m = (a'(h) K_m) W^T
  the adjoint of output m (K the output kernel), so grad_x tr J costs D matmuls through W where
  the pairs i <= j would cost D (D + 1) / 2.
  """
  h = _dense_streams(hidden, streams[:1 + dim])
  h[0] = h[0] + extra
  y, a1, a2, _ = _silu_coefficients(h[0])
  kernel = output['kernel']
  out = y @ kernel + output['bias']
  jac = jnp.stack([(a1 * d) @ kernel for d in h[1:]], -1)
  second = dict(zip(second_order_pairs(dim), streams[1 + dim:]))
  adjoints = [(a1 * kernel[:, m]) @ hidden['kernel'].T for m in range(dim)]
  along = a2 * sum(h[1 + i] * kernel[:, i] for i in range(dim))  # a'' sum_i h_i K_i
  grad_tr = jnp.stack([jnp.sum(along * h[1 + j], -1)
                       + jnp.sum(sum(second[(min(i, j), max(i, j))] * adjoints[i]
                                     for i in range(dim)), -1) for j in range(dim)], -1)
  return out, jac, grad_tr


def taylor_derivatives(config, params, x, labels, order):
  """(out, J, grad_x tr J or None) of ScoreMLP's output wrt x (B, D), exactly, in one pass.

  Taylor mode written for the MLP: the value, the first derivatives along each e_i and (order 3)
  the second derivatives d^2 / dx_i dx_j, i <= j, go through each Dense layer (one matmul per
  stream) and through SiLU by its closed-form derivatives. Where the pairs outnumber the
  dimensions (2-D), `_output_streams` contracts them with the outputs' adjoints at the last hidden
  layer instead. The time embedding is constant in x: it enters the value stream only.
  J[b, i, j] = d out_i / d x_j and (grad_x tr J)_j = sum_i d^2 out_i / dx_i dx_j; order 2 leaves
  grad_x tr J None.
  """
  m = config.model
  dim = x.shape[1]
  net = params['net']
  if len(net) < 2:
    raise ValueError('The MLP Taylor pass needs a hidden decoder layer: set '
                     'config.model.decoder_layers to at least one width.')
  t = label_to_time(config, labels.astype(jnp.float32))
  temb = layers.get_timestep_embedding(t, m.temb_dim)
  temb = _mlp_streams(params['t_encoder'], [temb], 0)[0]
  pairs = second_order_pairs(dim) if order == 3 else []
  eye = jnp.eye(dim, dtype=x.dtype)
  streams = ([x] + [jnp.broadcast_to(eye[i], x.shape) for i in range(dim)]
             + [jnp.zeros_like(x)] * len(pairs))
  xemb = _mlp_streams(params['x_encoder'], streams, dim)
  width = xemb[0].shape[-1]
  first = net['Dense_0']
  dense = ([{'kernel': first['kernel'][:width], 'bias': first['bias']}]
           + [net[f'Dense_{i}'] for i in range(1, len(net))])
  extra = temb @ first['kernel'][width:]  # the time's share of the first layer
  contract = len(pairs) > dim
  streams = xemb
  for i, p in enumerate(dense[:-2] if contract else dense):
    streams = _dense_streams(p, streams)
    if i == 0:
      streams[0] = streams[0] + extra
    if i < len(dense) - 1:
      streams = _silu_streams(streams, dim)
  if contract:
    out, jac, grad_tr = _output_streams(dense[-2], dense[-1], streams, dim,
                                        extra if len(dense) == 2 else 0.)
  else:
    out, jac = streams[0], jnp.stack(streams[1:1 + dim], -1)
    grad_tr = None if order == 2 else jnp.stack(
      [sum(streams[1 + dim + pairs.index((min(i, j), max(i, j)))][:, i] for i in range(dim))
       for j in range(dim)], -1)
  if config.model.get('scale_by_sigma', False):
    sigmas = _sigmas(config, labels)
    out, jac = out / sigmas[:, None], jac / sigmas[:, None, None]
    grad_tr = None if grad_tr is None else grad_tr / sigmas[:, None]
  return out, jac, grad_tr
