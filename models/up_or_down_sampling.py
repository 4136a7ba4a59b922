"""FIR up/downsampling (upfirdn2d) and convolutions fused with resampling, NHWC.

Numerics of StyleGAN2's ops as ported by score_sde (`models/up_or_down_sampling.py`): the FIR
kernel is normalised to sum 1 (times factor^2 when upsampling), pixels outside the image are zero,
and the fused conv+resample ops pad only once.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _setup_kernel(k):
  """2-D FIR kernel normalised to sum 1; a 1-D kernel means the separable outer(k, k)."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  k /= np.sum(k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f'FIR kernel must be 1-D or square 2-D, got shape {k.shape}.')
  return k


def upfirdn_2d(x, k, upx=1, upy=1, downx=1, downy=1, padx0=0, padx1=0, pady0=0, pady1=0):
  """Upsample (insert zeros), pad (crop when negative), convolve with the FIR `k`, downsample.

  x: (N, H, W, C); k: 2-D (kh, kw). Like scipy.signal.upfirdn along each spatial axis; the
  convolution is 'valid' so every output footprint lies inside the padded input.
  """
  k = jnp.asarray(k, dtype=x.dtype)
  N, H, W, C = x.shape
  kh, kw = k.shape
  for name, v in (('upx', upx), ('upy', upy), ('downx', downx), ('downy', downy),
                  ('padx0', padx0), ('padx1', padx1), ('pady0', pady0), ('pady1', pady1)):
    if not isinstance(v, (int, np.integer)):
      raise ValueError(f'{name} must be an int, got {v!r}.')
  # Upsample by inserting zeros after each pixel.
  x = x.reshape((N, H, 1, W, 1, C))
  x = jnp.pad(x, [[0, 0], [0, 0], [0, upy - 1], [0, 0], [0, upx - 1], [0, 0]])
  x = x.reshape((N, H * upy, W * upx, C))
  # Pad, or crop where a pad is negative.
  x = jnp.pad(x, [[0, 0], [max(pady0, 0), max(pady1, 0)], [max(padx0, 0), max(padx1, 0)], [0, 0]])
  x = x[:, max(-pady0, 0):x.shape[1] - max(-pady1, 0),
        max(-padx0, 0):x.shape[2] - max(-padx1, 0), :]
  # True convolution (flipped kernel), the same filter for every channel.
  w = jnp.tile(k[::-1, ::-1, None, None], (1, 1, 1, C))
  x = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding='VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=C)
  return x[:, ::downy, ::downx, :]


def _simple_upfirdn_2d(x, k, up=1, down=1, pad0=0, pad1=0):
  return upfirdn_2d(x, k, upx=up, upy=up, downx=down, downy=down,
                    padx0=pad0, padx1=pad1, pady0=pad0, pady1=pad1)


def upsample_2d(x, k=None, factor=2, gain=1):
  """Upsample NHWC images by `factor` with the FIR `k` (default [1]*factor: nearest neighbour).

  The kernel is scaled so that a constant image keeps its value (times `gain`).
  """
  if not (isinstance(factor, int) and factor >= 1):
    raise ValueError(f'factor must be a positive int, got {factor!r}.')
  k = _setup_kernel([1] * factor if k is None else k) * (gain * (factor ** 2))
  p = k.shape[0] - factor
  return _simple_upfirdn_2d(x, k, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x, k=None, factor=2, gain=1):
  """Downsample NHWC images by `factor` with the FIR `k` (default [1]*factor: average pooling)."""
  if not (isinstance(factor, int) and factor >= 1):
    raise ValueError(f'factor must be a positive int, got {factor!r}.')
  k = _setup_kernel([1] * factor if k is None else k) * gain
  p = k.shape[0] - factor
  return _simple_upfirdn_2d(x, k, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def upsample_conv_2d(x, w, k=None, factor=2, gain=1):
  """Fused `upsample_2d` followed by a 'SAME' conv with w (kh, kw, in, out) (StyleGAN2).

  A stride-`factor` transposed convolution, then one FIR pass that pads once.
  """
  if not (isinstance(factor, int) and factor >= 1):
    raise ValueError(f'factor must be a positive int, got {factor!r}.')
  convH, convW, inC, outC = w.shape
  if convH != convW:
    raise ValueError(f'conv kernel must be square, got {w.shape[:2]}.')
  k = _setup_kernel([1] * factor if k is None else k) * (gain * (factor ** 2))
  p = (k.shape[0] - factor) - (convW - 1)
  num_groups = x.shape[-1] // inC
  # Kernel of the adjoint (gradient) of a conv, as TF's conv2d_transpose expects it.
  w = jnp.reshape(w, (convH, convW, inC, num_groups, -1))
  w = jnp.transpose(w[::-1, ::-1], (0, 1, 4, 3, 2))
  w = jnp.reshape(w, (convH, convW, -1, num_groups * inC))
  x = jax.lax.conv_transpose(x, w, strides=(factor, factor), padding='VALID',
                             transpose_kernel=True, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return _simple_upfirdn_2d(x, k, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2 + 1)


def conv_downsample_2d(x, w, k=None, factor=2, gain=1):
  """Fused 'SAME' conv with w (kh, kw, in, out) followed by `downsample_2d` (StyleGAN2)."""
  if not (isinstance(factor, int) and factor >= 1):
    raise ValueError(f'factor must be a positive int, got {factor!r}.')
  convH, convW, _, _ = w.shape
  if convH != convW:
    raise ValueError(f'conv kernel must be square, got {w.shape[:2]}.')
  k = _setup_kernel([1] * factor if k is None else k) * gain
  p = (k.shape[0] - factor) + (convW - 1)
  x = _simple_upfirdn_2d(x, k, pad0=(p + 1) // 2, pad1=p // 2)
  return jax.lax.conv_general_dilated(x, w, window_strides=(factor, factor), padding='VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def naive_upsample_2d(x, factor=2):
  """Nearest-neighbour upsampling by pixel repetition."""
  N, H, W, C = x.shape
  x = jnp.tile(x.reshape((N, H, 1, W, 1, C)), (1, 1, factor, 1, factor, 1))
  return x.reshape((N, H * factor, W * factor, C))


def naive_downsample_2d(x, factor=2):
  """Average pooling over non-overlapping factor x factor blocks."""
  N, H, W, C = x.shape
  x = x.reshape((N, H // factor, factor, W // factor, factor, C))
  return jnp.mean(x, axis=(2, 4))


class Conv2d(nn.Module):
  """Conv layer with optional fused FIR up/downsampling; params `weight` (k, k, in, out), `bias`."""
  fmaps: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: Tuple[int, ...] = (1, 3, 3, 1)
  use_bias: bool = True
  weight_var: str = 'weight'
  kernel_init: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError('Conv2d: choose at most one of up and down.')
    if not (self.kernel >= 1 and self.kernel % 2 == 1):
      raise ValueError(f'Conv2d: kernel must be a positive odd int, got {self.kernel}.')
    kernel_init = self.kernel_init or nn.initializers.lecun_normal()
    shape = (self.kernel, self.kernel, x.shape[-1], self.fmaps)
    w = self.param(self.weight_var, kernel_init, shape)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding='SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      b = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
      x = x + b.reshape((1, 1, 1, -1))
    return x
