"""Layers of NCSN++ / DDPM++: Fourier time features, skip combiners, attention, FIR resampling
and the DDPM++ / BigGAN++ residual blocks (score_sde `models/layerspp.py`, same names and init).
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models import up_or_down_sampling

conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
NIN = layers.NIN
default_init = layers.default_init


def group_norm(x):
  """The GroupNorm of NCSN++: min(C // 4, 32) groups, eps 1e-6, params scale/bias of shape (C,)."""
  return nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32))(x)


def _skip(x, h, skip_rescale):
  return (x + h) / np.sqrt(2.) if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi x W), cos(2 pi x W)] of a (B,) input, W ~ N(0, scale^2)."""
  embedding_size: int = 256
  scale: float = 1.0
  trainable: bool = False

  @nn.compact
  def __call__(self, x):
    W = self.param('W', jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    if not self.trainable:
      W = jax.lax.stop_gradient(W)
    x_proj = x[:, None] * W[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class Combine(nn.Module):
  """Merge a skip input x into y: 1x1 conv of x to y's channels, then concat or sum."""
  method: str = 'cat'

  @nn.compact
  def __call__(self, x, y):
    h = conv1x1(x, y.shape[-1])
    if self.method == 'cat':
      return jnp.concatenate([h, y], axis=-1)
    if self.method == 'sum':
      return h + y
    raise ValueError(f"Unknown combine method '{self.method}': set "
                     "config.model.progressive_combine to 'cat' or 'sum'.")


class AttnBlockpp(nn.Module):
  """Channel-wise self-attention block (DDPM), with optional 1/sqrt(2) skip rescaling."""
  skip_rescale: bool = False
  init_scale: float = 0.

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    h = group_norm(x)
    q = NIN(C)(h)
    k = NIN(C)(h)
    v = NIN(C)(h)
    h = layers.spatial_attention(q, k, v)
    h = NIN(C, init_scale=self.init_scale)(h)
    return _skip(x, h, self.skip_rescale)


class Upsample(nn.Module):
  """2x upsampling: nearest (+3x3 conv) or FIR (fused with a 3x3 `Conv2d_0` when with_conv)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    out_ch = self.out_ch if self.out_ch else C
    if not self.fir:
      h = jax.image.resize(x, (B, H * 2, W * 2, C), 'nearest')
      if self.with_conv:
        h = conv3x3(h, out_ch)
    elif not self.with_conv:
      h = up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
    else:
      h = up_or_down_sampling.Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel,
                                     use_bias=True, kernel_init=default_init())(x)
    assert h.shape == (B, 2 * H, 2 * W, out_ch), (h.shape, out_ch)
    return h


class Downsample(nn.Module):
  """2x downsampling: stride-2 conv / average pool, or FIR (fused with a 3x3 `Conv2d_0`)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    out_ch = self.out_ch if self.out_ch else C
    if not self.fir:
      if self.with_conv:
        x = conv3x3(x, out_ch, stride=2)
      else:
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding='SAME')
    elif not self.with_conv:
      x = up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
    else:
      x = up_or_down_sampling.Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel,
                                     use_bias=True, kernel_init=default_init())(x)
    assert x.shape == (B, H // 2, W // 2, out_ch), (x.shape, out_ch)
    return x


class ResnetBlockDDPMpp(nn.Module):
  """DDPM ResBlock with GroupNorm, time bias, dropout, NIN/conv shortcut, optional rescaled skip."""
  act: Any
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.

  @nn.compact
  def __call__(self, x, temb=None, train=True):
    C = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else C
    h = self.act(group_norm(x))
    h = conv3x3(h, out_ch)
    if temb is not None:
      h += nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale)
    if C != out_ch:
      x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
    return _skip(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN ResBlock: resampling (FIR or naive) inside the block, 1x1 conv shortcut."""
  act: Any
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.

  @nn.compact
  def __call__(self, x, temb=None, train=True):
    C = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else C
    h = self.act(group_norm(x))
    if self.up:
      if self.fir:
        h = up_or_down_sampling.upsample_2d(h, self.fir_kernel, factor=2)
        x = up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = up_or_down_sampling.naive_upsample_2d(h, factor=2)
        x = up_or_down_sampling.naive_upsample_2d(x, factor=2)
    elif self.down:
      if self.fir:
        h = up_or_down_sampling.downsample_2d(h, self.fir_kernel, factor=2)
        x = up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = up_or_down_sampling.naive_downsample_2d(h, factor=2)
        x = up_or_down_sampling.naive_downsample_2d(x, factor=2)
    h = conv3x3(h, out_ch)
    if temb is not None:
      h += nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale)
    if C != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch)
    return _skip(x, h, self.skip_rescale)
