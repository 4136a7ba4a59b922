"""FIR resampling against hand-derived references (numpy / scipy), not against itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from models import up_or_down_sampling as ud

K1 = np.array([1., 3., 3., 1.])
K2 = np.outer(K1, K1) / 64.  # the normalised 2-D FIR kernel


def _along(x, axis, fn):
  """Apply a 1-D map `fn` (array -> array) along `axis` of a 4-D array."""
  return np.apply_along_axis(fn, axis, x)


def _up1d(v):
  """[1,3,3,1] upsampling = bilinear interpolation at quarter offsets, zero outside."""
  p = np.concatenate([[0.], v, [0.]])
  out = np.empty(2 * len(v))
  out[0::2] = 0.75 * p[1:-1] + 0.25 * p[:-2]
  out[1::2] = 0.75 * p[1:-1] + 0.25 * p[2:]
  return out


def _down1d(v):
  """[1,3,3,1] downsampling: y_i = (x_{2i-1} + 3 x_{2i} + 3 x_{2i+1} + x_{2i+2}) / 8."""
  p = np.concatenate([[0.], v, [0.]])
  i = np.arange(len(v) // 2)
  return (p[2 * i] + 3 * p[2 * i + 1] + 3 * p[2 * i + 2] + p[2 * i + 3]) / 8.


@pytest.fixture(scope='module')
def x():
  return np.random.RandomState(0).randn(2, 6, 8, 3)


def test_fir_upsample_is_separable_bilinear(x):
  ref = _along(_along(x, 1, _up1d), 2, _up1d)
  out = ud.upsample_2d(jnp.asarray(x, jnp.float32), (1, 3, 3, 1), factor=2)
  assert out.shape == (2, 12, 16, 3)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fir_downsample_matches_formula(x):
  ref = _along(_along(x, 1, _down1d), 2, _down1d)
  out = ud.downsample_2d(jnp.asarray(x, jnp.float32), (1, 3, 3, 1), factor=2)
  assert out.shape == (2, 3, 4, 3)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_box_kernel_is_nearest_and_average_pool(x):
  xj = jnp.asarray(x, jnp.float32)
  nearest = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(ud.upsample_2d(xj, None, factor=2), nearest, atol=1e-6)
  np.testing.assert_allclose(ud.naive_upsample_2d(xj, factor=2), nearest, atol=1e-6)
  pooled = x.reshape(2, 3, 2, 4, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(ud.downsample_2d(xj, None, factor=2), pooled, atol=1e-6)
  np.testing.assert_allclose(ud.naive_downsample_2d(xj, factor=2), pooled, atol=1e-6)


def test_upfirdn_matches_scipy_upfirdn():
  """1-D upfirdn with up 3, down 2 and an asymmetric kernel against scipy.signal.upfirdn."""
  v = np.random.RandomState(1).randn(7)
  h = np.array([1., 2., -1., 0.5, 3.])
  ref = signal.upfirdn(h, v, up=3, down=2)  # full convolution
  x = jnp.asarray(v[None, :, None, None], jnp.float32)
  out = ud.upfirdn_2d(x, jnp.asarray(h[:, None], jnp.float32), upy=3, downy=2,
                      pady0=len(h) - 1, pady1=len(h) - 1 - 2)  # drop up-1 trailing zeros
  np.testing.assert_allclose(np.asarray(out)[0, :, 0, 0], ref[:out.shape[1]], atol=1e-5)
  assert out.shape[1] == len(ref)


def _full_conv_per_channel(img, k):
  return np.stack([signal.convolve2d(img[..., c], k, mode='full') for c in range(img.shape[-1])],
                  axis=-1)


def _correlate_valid(img, w):
  """Cross-correlation of (H, W, Cin) with w (kh, kw, Cin, Cout), 'valid'."""
  kh, kw = w.shape[:2]
  H, W = img.shape[0] - kh + 1, img.shape[1] - kw + 1
  out = np.zeros((H, W, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += img[i:i + H, j:j + W] @ w[i, j]
  return out


def test_fused_upsample_conv_is_fir_then_conv_without_truncation(x):
  w = np.random.RandomState(2).randn(3, 3, 3, 4)
  out = ud.upsample_conv_2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                            k=(1, 3, 3, 1))
  for b in range(2):
    u = np.zeros((12, 16, 3))
    u[::2, ::2] = x[b]
    ref = _correlate_valid(_full_conv_per_channel(u, 4 * K2), w)[:12, :16]
    np.testing.assert_allclose(out[b], ref, atol=1e-4)


def test_fused_conv_downsample_is_conv_then_fir_without_truncation(x):
  w = np.random.RandomState(3).randn(3, 3, 3, 4)
  out = ud.conv_downsample_2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                              k=(1, 3, 3, 1))
  assert out.shape == (2, 3, 4, 4)
  for b in range(2):
    ref = _correlate_valid(_full_conv_per_channel(x[b], K2), w)[1::2, 1::2]
    np.testing.assert_allclose(out[b], ref, atol=1e-4)


def test_conv2d_module_params_and_modes(x):
  xj = jnp.asarray(x, jnp.float32)
  for kw, shape in (({}, (2, 6, 8, 5)), ({'up': True}, (2, 12, 16, 5)),
                    ({'down': True}, (2, 3, 4, 5))):
    mod = ud.Conv2d(5, kernel=3, **kw)
    params = mod.init(jax.random.PRNGKey(0), xj)['params']
    assert {k: v.shape for k, v in params.items()} == {'weight': (3, 3, 3, 5), 'bias': (5,)}
    assert mod.apply({'params': params}, xj).shape == shape
  with pytest.raises(ValueError):
    ud.Conv2d(5, kernel=3, up=True, down=True).init(jax.random.PRNGKey(0), xj)
