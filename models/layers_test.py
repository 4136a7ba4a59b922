"""Layers against numpy re-derivations of score_sde's formulas, with random (non-init) params."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from models import layers, layerspp, normalization


def _random_params(mod, *args, seed=0):
  """The module's parameter tree (shapes by eval_shape, no initialiser is run) filled with
  N(0, 0.5^2) noise, so that zero-initialised paths are exercised too."""
  shapes = jax.eval_shape(lambda k: mod.init(k, *args), jax.random.PRNGKey(0))['params']
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
    treedef, [jnp.asarray(0.5 * rng.randn(*leaf.shape), jnp.float32) for leaf in leaves])


def _key(seed=0):
  """A cheap-to-compile key for tests that need the real initialisers."""
  return jax.random.key(seed, impl='rbg')


def np_group_norm(x, groups, scale, bias, eps=1e-6):
  B, H, W, C = x.shape
  g = x.reshape(B, H, W, groups, C // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_swish(x):
  return x / (1. + np.exp(-x))


def np_conv_same(x, kernel, bias):
  """Stride-1 'SAME' cross-correlation, NHWC / HWIO."""
  kh, kw = kernel.shape[:2]
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = np.pad(x, [(0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)])
  H, W = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(kh):
    for j in range(kw):
      out += xp[:, i:i + H, j:j + W] @ kernel[i, j]
  return out + bias


def np_conv(p, x):
  return np_conv_same(x, np.asarray(p['kernel']), np.asarray(p['bias']))


def np_gn(p, x):
  return np_group_norm(x, min(x.shape[-1] // 4, 32), np.asarray(p['scale']), np.asarray(p['bias']))


def np_nin(p, x):
  return x @ np.asarray(p['W']) + np.asarray(p['b'])


def np_down_fir(x):
  """[1,3,3,1] FIR downsampling, separable, zero outside."""
  def d1(v):
    p = np.concatenate([[0.], v, [0.]])
    i = np.arange(len(v) // 2)
    return (p[2 * i] + 3 * p[2 * i + 1] + 3 * p[2 * i + 2] + p[2 * i + 3]) / 8.
  return np.apply_along_axis(d1, 2, np.apply_along_axis(d1, 1, x))


@pytest.fixture(scope='module')
def x():
  return np.random.RandomState(1).randn(2, 4, 4, 8).astype(np.float32)


def test_group_norm_matches_formula(x):
  params = _random_params(layerspp.AttnBlockpp(), x)
  gn = params['GroupNorm_0']
  assert gn['scale'].shape == (8,) and gn['bias'].shape == (8,)

  class GN(layerspp.nn.Module):
    @layerspp.nn.compact
    def __call__(self, h):
      return layerspp.group_norm(h)

  out = GN().apply({'params': {'GroupNorm_0': gn}}, x)
  # min(8 // 4, 32) = 2 groups of 4 channels.
  np.testing.assert_allclose(out, np_group_norm(x, 2, gn['scale'], gn['bias']), atol=1e-5)
  assert not np.allclose(out, np_group_norm(x, 1, gn['scale'], gn['bias']), atol=1e-3)


@pytest.mark.parametrize('skip_rescale', [False, True])
def test_attention_block_matches_softmax_attention(x, skip_rescale):
  mod = layerspp.AttnBlockpp(skip_rescale=skip_rescale)
  p = _random_params(mod, x, seed=2)
  out = mod.apply({'params': p}, x)
  B, H, W, C = x.shape
  h = np_gn(p['GroupNorm_0'], x).reshape(B, H * W, C)
  q, k, v = (np_nin(p[f'NIN_{i}'], h) for i in range(3))
  logits = np.einsum('bic,bjc->bij', q, k) / math.sqrt(C)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  h = np_nin(p['NIN_3'], a @ v).reshape(x.shape)
  ref = (x + h) / np.sqrt(2.) if skip_rescale else x + h
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_ddpm_attention_block_uses_given_normaliser(x):
  mod = layers.AttnBlock(normalize=lambda: layers.nn.GroupNorm(num_groups=4))
  p = _random_params(mod, x, seed=3)
  B, H, W, C = x.shape
  h = np_group_norm(x, 4, p['GroupNorm_0']['scale'], p['GroupNorm_0']['bias']).reshape(B, -1, C)
  q, k, v = (np_nin(p[f'NIN_{i}'], h) for i in range(3))
  logits = np.einsum('bic,bjc->bij', q, k) / math.sqrt(C)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  ref = x + np_nin(p['NIN_3'], a @ v).reshape(x.shape)
  np.testing.assert_allclose(mod.apply({'params': p}, x), ref, atol=1e-4)


def test_resnet_block_ddpmpp_matches_numpy(x):
  temb = np.random.RandomState(4).randn(2, 12).astype(np.float32)
  mod = layerspp.ResnetBlockDDPMpp(act=jax.nn.swish, out_ch=16, dropout=0.,
                                   skip_rescale=True)
  p = _random_params(mod, x, temb, False, seed=5)
  assert set(p) == {'GroupNorm_0', 'Conv_0', 'Dense_0', 'GroupNorm_1', 'Conv_1', 'NIN_0'}
  out = mod.apply({'params': p}, x, temb, False)
  h = np_conv(p['Conv_0'], np_swish(np_gn(p['GroupNorm_0'], x)))
  d = p['Dense_0']
  h = h + (np_swish(temb) @ np.asarray(d['kernel']) + np.asarray(d['bias']))[:, None, None, :]
  h = np_conv(p['Conv_1'], np_swish(np_gn(p['GroupNorm_1'], h)))
  ref = (np_nin(p['NIN_0'], x) + h) / np.sqrt(2.)
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_resnet_block_biggan_fir_down_matches_numpy(x):
  temb = np.random.RandomState(6).randn(2, 12).astype(np.float32)
  mod = layerspp.ResnetBlockBigGANpp(act=jax.nn.swish, down=True, fir=True, dropout=0.)
  p = _random_params(mod, x, temb, False, seed=7)
  out = mod.apply({'params': p}, x, temb, False)
  assert out.shape == (2, 2, 2, 8)
  h = np_down_fir(np_swish(np_gn(p['GroupNorm_0'], x)))
  h = np_conv(p['Conv_0'], h)
  d = p['Dense_0']
  h = h + (np_swish(temb) @ np.asarray(d['kernel']) + np.asarray(d['bias']))[:, None, None, :]
  h = np_conv(p['Conv_1'], np_swish(np_gn(p['GroupNorm_1'], h)))
  skip = np_conv(p['Conv_2'], np_down_fir(x))  # 1x1 conv shortcut because of the resampling
  np.testing.assert_allclose(out, (skip + h) / np.sqrt(2.), atol=1e-4)


def test_resnet_blocks_start_as_rescaled_identity(x):
  """init_scale 0 makes the last conv ~1e-10: a fresh block is (x + ~0) / sqrt(2)."""
  for mod in (layerspp.ResnetBlockBigGANpp(act=jax.nn.swish, dropout=0.),
              layerspp.ResnetBlockDDPMpp(act=jax.nn.swish, dropout=0., skip_rescale=True)):
    out, _ = jax.jit(lambda k: mod.init_with_output(k, x, None, False))(_key())
    np.testing.assert_allclose(out, x / np.sqrt(2.), atol=1e-4)


def test_timestep_embedding_formula():
  t = jnp.array([0., 1., 17.5, 999.])
  emb = layers.get_timestep_embedding(t, 9)
  assert emb.shape == (4, 9)
  freqs = np.exp(-np.log(10000.) * np.arange(4) / 3.)
  ref = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs)), np.zeros((4, 1))],
                       axis=1)
  np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-4)


def test_gaussian_fourier_projection_is_frozen_unless_trainable():
  x = jnp.array([0.3, -1.2])
  for trainable in (False, True):
    mod = layerspp.GaussianFourierProjection(embedding_size=6, scale=16., trainable=trainable)
    p = mod.init(_key(), x)['params']
    W = np.asarray(p['W'])
    assert W.shape == (6,) and 4. < W.std() < 40.
    out = mod.apply({'params': p}, x)
    proj = 2 * np.pi * np.outer(x, W)
    ref = np.concatenate([np.sin(proj), np.cos(proj)], 1)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    g = jax.grad(lambda p: mod.apply({'params': p}, x).sum())(p)['W']
    assert bool(jnp.any(g != 0)) == trainable


def test_combine_sum_and_cat(x):
  y = np.random.RandomState(8).randn(2, 4, 4, 5).astype(np.float32)
  for method, channels in (('sum', 5), ('cat', 10)):
    mod = layerspp.Combine(method=method)
    p = _random_params(mod, x, y)
    h = np_conv(p['Conv_0'], x)
    ref = h + y if method == 'sum' else np.concatenate([h, y], -1)
    out = mod.apply({'params': p}, x, y)
    assert out.shape[-1] == channels
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_instance_norm_plus_and_conditional(x):
  mod = normalization.InstanceNorm2dPlus()
  p = _random_params(mod, x)
  mu = x.mean(axis=(1, 2), keepdims=True)
  sd = np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)
  means = x.mean(axis=(1, 2))
  mp = (means - means.mean(-1, keepdims=True)) / np.sqrt(means.var(-1, keepdims=True) + 1e-5)
  ref = ((x - mu) / sd + mp[:, None, None] * p['alpha']) * p['gamma'] + p['beta']
  np.testing.assert_allclose(mod.apply({'params': p}, x), ref, atol=1e-4)

  cmod = normalization.ConditionalInstanceNorm2dPlus(num_classes=3)
  y = jnp.array([2, 0])
  cp = _random_params(cmod, x, y)
  emb = np.asarray(cp['Embed_0']['embedding'])
  assert emb.shape == (3, 24)
  g, a, b = np.split(emb[np.asarray(y)], 3, axis=-1)
  ref = g[:, None, None] * ((x - mu) / sd + mp[:, None, None] * a[:, None, None]) + b[:, None, None]
  np.testing.assert_allclose(cmod.apply({'params': cp}, x, y), ref, atol=1e-4)


def test_get_normalization_and_act_errors():
  config = ml_collections.ConfigDict({'model': {'normalization': 'GroupNorm',
                                                'nonlinearity': 'swish',
                                                'num_classes': 10}})
  assert normalization.get_normalization(config) is layers.nn.GroupNorm
  assert layers.get_act(config) is jax.nn.swish
  config.model.normalization = 'BatchNorm'
  with pytest.raises(ValueError, match='normalization'):
    normalization.get_normalization(config)
  with pytest.raises(ValueError, match='conditional'):
    normalization.get_normalization(config, conditional=True)
  config.model.nonlinearity = 'tanh'
  with pytest.raises(ValueError, match='nonlinearity'):
    layers.get_act(config)


def test_dropout_only_in_train_mode(x):
  mod = layerspp.ResnetBlockDDPMpp(act=jax.nn.swish, dropout=0.5)
  p = _random_params(mod, x, None, False, seed=9)
  run = jax.jit(lambda train, rng: mod.apply({'params': p}, x, None, train, rngs={'dropout': rng}),
                static_argnums=0)
  det = run(False, jax.random.PRNGKey(0))
  np.testing.assert_allclose(det, run(False, jax.random.PRNGKey(1)), atol=1e-6)
  assert not np.allclose(det, run(True, jax.random.PRNGKey(0)), atol=1e-3)
