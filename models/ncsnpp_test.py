"""NCSN++ / DDPM++ / DDPM: checkpoint-compatible parameter trees, every wiring option, scaling."""
import gzip
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401  (registers the models)
from configs.base_config import get_base_config
from models import utils as mutils

# The parameter trees (path -> shape, counts) of the released score_sde / score_flow checkpoints.
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'testdata',
                         'param_trees.json.gz')
EXPERIMENTS = [
  've/cifar10_ncsnpp_continuous', 've/cifar10_ncsnpp_deep_continuous',
  've/imagenet32_ncsnpp_continuous', 've/imagenet32_ncsnpp_deep_continuous',
  've/church_ncsnpp_continuous',
  'vp/cifar10_ddpmpp_continuous', 'vp/cifar10_ddpmpp_deep_continuous',
  'vp/imagenet32_ddpmpp_continuous', 'vp/imagenet32_ddpmpp_deep_continuous',
  'subvp/cifar10_ddpmpp_continuous', 'subvp/cifar10_ddpmpp_deep_continuous',
  'subvp/imagenet32_ddpmpp_continuous', 'subvp/imagenet32_ddpmpp_deep_continuous',
]


def load_config(name):
  return importlib.import_module('configs.' + name.replace('/', '.')).get_config()


def abstract_params(config, batch=1):
  """The parameter tree as ShapeDtypeStructs: no weights are materialised."""
  return jax.eval_shape(lambda k: mutils.init_model(k, config, batch_size=batch)[2],
                        jax.random.PRNGKey(0))


def flat_shapes(tree):
  return {'params/' + '/'.join(p.key for p in path): list(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _reference():
  with gzip.open(REFERENCE, 'rt') as f:
    return json.load(f)


@pytest.mark.parametrize('path', sorted(_reference()))
def test_param_tree_matches_original(path):
  shapes = flat_shapes(abstract_params(load_config(path[len('configs/'):-len('.py')])))
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  ref = _reference()[path]
  missing = sorted(set(ref['arrays']) - set(shapes))
  extra = sorted(set(shapes) - set(ref['arrays']))
  assert not missing and not extra, (missing[:5], extra[:5])
  wrong = {p: (shapes[p], s) for p, s in ref['arrays'].items() if shapes[p] != s}
  assert not wrong, list(wrong.items())[:5]
  assert (n_params, len(shapes)) == (ref['n_params'], ref['n_arrays'])


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiment_configs_parse(name):
  config = load_config(name)
  m = config.model
  assert m.name == 'ncsnpp' and m.nf == 128
  assert m.num_res_blocks == (8 if 'deep' in name else 2 if 'church' in name else 4)
  sde = name.split('/')[0]
  assert config.training.sde == {'ve': 'vesde', 'vp': 'vpsde', 'subvp': 'subvpsde'}[sde]
  assert m.scale_by_sigma == (sde == 've')
  assert m.embedding_type == ('fourier' if sde == 've' else 'positional')
  assert config.data.centered == (sde != 've')


def test_church_tree_is_the_output_and_input_skip_variant():
  """Not in the reference file: check the progressive-skip modules NCSN++ creates at 256^2."""
  config = load_config('ve/church_ncsnpp_continuous')
  shapes = flat_shapes(abstract_params(config))
  assert config.model.sigma_max == 380.
  # 7 resolutions, 2 blocks each: 7*2 + 6 down + 2 middle + 7*3 up + 6 up resblocks.
  blocks = {p.split('/')[1] for p in shapes if 'ResnetBlockBigGANpp' in p}
  assert len(blocks) == 14 + 6 + 2 + 21 + 6
  assert {p.split('/')[1] for p in shapes if 'Combine' in p} == {f'Combine_{i}' for i in range(6)}
  assert shapes['params/Combine_0/Conv_0/kernel'] == [1, 1, 3, 128]
  # output_skip: one 3x3 conv to RGB per resolution, no final GroupNorm+conv beyond those.
  rgb = [p for p, s in shapes.items() if p.count('/') == 2 and p.endswith('kernel')
         and s[-1] == 3]
  assert len(rgb) == 7
  assert not any('Downsample' in p or 'Upsample' in p for p in shapes)  # FIR without convs


def tiny_config(**model):
  """8x8x3 NCSN++ with every component, small enough for CPU tests."""
  config = get_base_config()
  config.training.sde = 'vesde'
  config.training.continuous = True
  config.data.image_size = 8
  config.data.num_channels = 3
  config.data.centered = False
  m = config.model
  m.name = 'ncsnpp'
  m.scale_by_sigma = True
  m.normalization = 'GroupNorm'
  m.nonlinearity = 'swish'
  m.nf = 16
  m.ch_mult = (1, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = (4,)
  m.resamp_with_conv = True
  m.conditional = True
  m.fir = True
  m.fir_kernel = [1, 3, 3, 1]
  m.skip_rescale = True
  m.resblock_type = 'biggan'
  m.progressive = 'output_skip'
  m.progressive_input = 'input_skip'
  m.progressive_combine = 'sum'
  m.attention_type = 'ddpm'
  m.init_scale = 0.
  m.embedding_type = 'fourier'
  m.fourier_scale = 16
  m.conv_size = 3
  m.dropout = 0.
  for k, v in model.items():
    if k == 'sde':
      config.training.sde = v
    else:
      m[k] = v
  return config


OPTIONS = [
  dict(),
  dict(progressive='residual', progressive_input='residual'),
  dict(progressive='none', progressive_input='none', fir=False),
  dict(progressive_combine='cat'),
  dict(resblock_type='ddpm', progressive='output_skip', progressive_input='residual'),
  dict(resblock_type='ddpm', fir=False, resamp_with_conv=False, progressive='residual',
       progressive_input='input_skip'),
  dict(sde='vpsde', scale_by_sigma=False, embedding_type='positional', conditional=False),
  dict(sde='subvpsde', scale_by_sigma=False, embedding_type='fourier', skip_rescale=False),
]


@pytest.mark.parametrize('options', OPTIONS,
                         ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_output_shape_for_each_option(options):
  config = tiny_config(**options)
  model = mutils.get_model('ncsnpp')(config=config)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  variables = jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False),
                             jax.random.PRNGKey(0), x, t)
  out = jax.eval_shape(lambda v, x, t: model.apply(v, x, t, train=False), variables, x, t)
  assert out.shape == (2, 8, 8, 3)
  names = {p.split('/')[1] for p in flat_shapes(variables['params'])}
  if config.model.progressive_input == 'input_skip':
    assert 'Combine_0' in names
  if not config.model.conditional:
    assert 'Dense_0' not in names


def _random_variables(model, x, t, seed=0):
  shapes = jax.eval_shape(lambda k: model.init(k, x, t, train=False), jax.random.PRNGKey(0))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
    treedef, [jnp.asarray(0.1 * rng.randn(*leaf.shape), jnp.float32) for leaf in leaves])


def test_scale_by_sigma_divides_by_the_label():
  """Same params: output(scale_by_sigma) == output(no scaling) / sigma, finite and non-trivial."""
  x = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 3), jnp.float32)
  sigma = jnp.array([0.05, 7.])
  m1 = mutils.get_model('ncsnpp')(config=tiny_config(nf=8))
  m2 = mutils.get_model('ncsnpp')(config=tiny_config(nf=8, scale_by_sigma=False))
  v = _random_variables(m1, x, sigma)
  a, b = jax.jit(lambda v: (m1.apply(v, x, sigma, train=False),
                            m2.apply(v, x, sigma, train=False)))(v)
  assert np.all(np.isfinite(a)) and float(jnp.abs(b).mean()) > 1e-3
  np.testing.assert_allclose(a * sigma[:, None, None, None], b, rtol=1e-4, atol=1e-5)


def test_invalid_options_raise_value_error():
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  for options, match in ((dict(progressive='bogus'), 'progressive'),
                         (dict(embedding_type='positional'), 'Positional'),
                         (dict(sde='vpsde'), 'scale_by_sigma')):
    model = mutils.get_model('ncsnpp')(config=tiny_config(**options))
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda k: model.init(k, x, t, train=False), jax.random.PRNGKey(0))


def ddpm_config(scale_by_sigma=False):
  config = get_base_config()
  config.training.continuous = False
  config.data.image_size = 8
  config.data.num_channels = 3
  m = config.model
  m.name = 'ddpm'
  m.scale_by_sigma = scale_by_sigma
  m.num_scales = 10
  m.normalization = 'GroupNorm'
  m.nonlinearity = 'swish'
  m.nf = 32
  m.ch_mult = (1, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = (4,)
  m.resamp_with_conv = True
  m.conditional = True
  m.dropout = 0.
  return config


def test_ddpm_tree_shape_and_sigma_scaling():
  config = ddpm_config()
  shapes = flat_shapes(abstract_params(config))
  # DDPM uses GroupNorm(32) and the (nearest + conv) / stride-2 conv resamplers of layers.py.
  assert shapes['params/Downsample_0/Conv_0/kernel'] == [3, 3, 32, 32]
  assert shapes['params/Upsample_0/Conv_0/kernel'] == [3, 3, 64, 64]
  assert shapes['params/AttnBlock_0/NIN_0/W'] == [64, 64]
  assert shapes['params/ResnetBlockDDPM_1/NIN_0/W'] == [32, 64]
  assert shapes['params/Dense_0/kernel'] == [32, 128]
  x = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 3), jnp.float32)
  labels = jnp.array([0, 9])
  plain = mutils.get_model('ddpm')(config=config)
  scaled = mutils.get_model('ddpm')(config=ddpm_config(scale_by_sigma=True))
  v = _random_variables(plain, x, labels)
  a, b = jax.jit(lambda v: (plain.apply(v, x, labels, train=False),
                            scaled.apply(v, x, labels, train=False)))(v)
  assert a.shape == (2, 8, 8, 3)
  sigmas = np.exp(np.linspace(np.log(50.), np.log(0.01), 10))  # largest first
  np.testing.assert_allclose(b * sigmas[[0, 9], None, None, None], a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', ['tiny/digits_ddpmpp', 'tiny/digits_ncsnpp'])
def test_tiny_configs_build(name):
  config = load_config(name)
  assert config.data.image_size == 16 and config.model.nf == 32
  assert config.training.batch_size == 16 and config.model.num_scales <= 100
  if config.training.sde == 'vpsde':  # every DDPM alpha_i = 1 - beta_i must stay positive
    assert config.model.beta_max / config.model.num_scales < 1.
  shapes = flat_shapes(abstract_params(config))
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert 3e5 < n < 2e6
  assert any('AttnBlockpp' in p for p in shapes)
