"""Common layers of the score networks: DDPM-style convolutions, NIN, attention, ResNet blocks,
timestep embeddings and activations.

Wiring, initialisers and parameter names follow score_sde's `models/layers.py` (so that released
checkpoints load name-for-name); only the idioms are current Flax.
"""
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def get_act(config):
  """The activation named by config.model.nonlinearity."""
  name = config.model.nonlinearity.lower()
  if name == 'elu':
    return nn.elu
  if name == 'relu':
    return nn.relu
  if name == 'lrelu':
    return functools.partial(nn.leaky_relu, negative_slope=0.2)
  if name == 'swish':
    return nn.swish
  raise ValueError(f"Unknown activation '{config.model.nonlinearity}': set "
                   "config.model.nonlinearity to one of elu, relu, lrelu, swish.")


def default_init(scale=1.):
  """DDPM initialisation: variance scaling, fan_avg, uniform; scale 0 becomes 1e-10."""
  scale = 1e-10 if scale == 0 else scale
  return jax.nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def _ncsn_init(init_scale, kernel_shape):
  """PyTorch-style (NCSNv1/v2) kernel initialiser and a bias drawn the same way."""
  init_scale = 1e-10 if init_scale == 0 else init_scale
  kernel_init = jax.nn.initializers.variance_scaling(init_scale / 3, 'fan_in', 'uniform')
  bias_init = lambda key, shape, dtype=jnp.float32: kernel_init(key, kernel_shape, dtype)[0, 0, 0]
  return kernel_init, bias_init


def ncsn_conv1x1(x, out_planes, stride=1, bias=True, dilation=1, init_scale=1.):
  """1x1 convolution with PyTorch initialisation (NCSNv1/v2)."""
  kernel_init, bias_init = _ncsn_init(init_scale, (1, 1, x.shape[-1], out_planes))
  return nn.Conv(out_planes, kernel_size=(1, 1), strides=(stride, stride), padding='SAME',
                 use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=kernel_init,
                 bias_init=bias_init)(x)


def ncsn_conv3x3(x, out_planes, stride=1, bias=True, dilation=1, init_scale=1.):
  """3x3 convolution with PyTorch initialisation (NCSNv1/v2)."""
  kernel_init, bias_init = _ncsn_init(init_scale, (3, 3, x.shape[-1], out_planes))
  return nn.Conv(out_planes, kernel_size=(3, 3), strides=(stride, stride), padding='SAME',
                 use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=kernel_init,
                 bias_init=bias_init)(x)


def ddpm_conv1x1(x, out_planes, stride=1, bias=True, dilation=1, init_scale=1.):
  """1x1 convolution with DDPM initialisation (creates `Conv_i` in the calling module)."""
  return nn.Conv(out_planes, kernel_size=(1, 1), strides=(stride, stride), padding='SAME',
                 use_bias=bias, kernel_dilation=(dilation, dilation),
                 kernel_init=default_init(init_scale), bias_init=jax.nn.initializers.zeros)(x)


def ddpm_conv3x3(x, out_planes, stride=1, bias=True, dilation=1, init_scale=1.):
  """3x3 convolution with DDPM initialisation (creates `Conv_i` in the calling module)."""
  return nn.Conv(out_planes, kernel_size=(3, 3), strides=(stride, stride), padding='SAME',
                 use_bias=bias, kernel_dilation=(dilation, dilation),
                 kernel_init=default_init(init_scale), bias_init=jax.nn.initializers.zeros)(x)


def get_timestep_embedding(timesteps, embedding_dim, max_positions=10000):
  """Sinusoidal embedding of (B,) float timesteps: [sin(t w_k), cos(t w_k)], w_k geometric
  from 1 to 1/max_positions (DDPM / transformers); zero-padded when embedding_dim is odd."""
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must be a (B,) array, got shape {timesteps.shape}.')
  half_dim = embedding_dim // 2
  freq = math.log(max_positions) / (half_dim - 1)
  freq = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -freq)
  emb = timesteps.astype(jnp.float32)[:, None] * freq[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


def contract_inner(x, y):
  """tensordot(x, y, 1): contract the last axis of x with the first axis of y."""
  return jnp.tensordot(x, y, axes=1)


class NIN(nn.Module):
  """Network-in-network: a per-pixel dense layer with params `W` (in, out) and `b` (out,)."""
  num_units: int
  init_scale: float = 0.1

  @nn.compact
  def __call__(self, x):
    in_dim = int(x.shape[-1])
    W = self.param('W', default_init(scale=self.init_scale), (in_dim, self.num_units))
    b = self.param('b', jax.nn.initializers.zeros, (self.num_units,))
    return contract_inner(x, W) + b


def spatial_attention(q, k, v):
  """Softmax attention over all H*W positions of NHWC maps, logits scaled by C^-1/2."""
  B, H, W, C = q.shape
  w = jnp.einsum('bhwc,bHWc->bhwHW', q, k) * (int(C) ** (-0.5))
  w = jax.nn.softmax(w.reshape((B, H, W, H * W)), axis=-1).reshape((B, H, W, H, W))
  return jnp.einsum('bhwHW,bHWc->bhwc', w, v)


class AttnBlock(nn.Module):
  """Channel-wise self-attention block of DDPM (normaliser given by the model)."""
  normalize: Any

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    h = self.normalize()(x)
    q = NIN(C)(h)
    k = NIN(C)(h)
    v = NIN(C)(h)
    h = spatial_attention(q, k, v)
    h = NIN(C, init_scale=0.)(h)
    return x + h


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""
  with_conv: bool = False

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    h = jax.image.resize(x, (B, H * 2, W * 2, C), 'nearest')
    if self.with_conv:
      h = ddpm_conv3x3(h, C)
    return h


class Downsample(nn.Module):
  """2x downsampling by a stride-2 3x3 conv or 2x2 average pooling."""
  with_conv: bool = False

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return ddpm_conv3x3(x, x.shape[-1], stride=2)
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding='SAME')


class ResnetBlockDDPM(nn.Module):
  """The ResNet block of DDPM: norm-act-conv, + Dense(act(temb)), norm-act-dropout-conv, skip."""
  act: Any
  normalize: Any
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, temb=None, train=True):
    C = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else C
    h = self.act(self.normalize()(x))
    h = ddpm_conv3x3(h, out_ch)
    if temb is not None:
      h += nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(self.normalize()(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv3x3(h, out_ch, init_scale=0.)
    if C != out_ch:
      if self.conv_shortcut:
        x = ddpm_conv3x3(x, out_ch)
      else:
        x = NIN(out_ch)(x)
    return x + h
