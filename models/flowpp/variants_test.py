"""config.deq.model 'auto' picks score_flow's variant per dataset; every variant builds (shapes
only) at full size and on a small input; the imagenet32 / imagenet64 wiring (weight norm, two split
stages, attention in the context processor, couplings without attention) passes the same checks as
the tiny variant at a few channels."""
import dataclasses

import jax
import numpy as np
import pytest

from configs.base_config import get_base_config
from models import flowpp
from models.flowpp.dequantization_test import build, check_data_init, check_flow, tiny_config

# (image size, parameter count under this code; printed with -s). cifar10's count is also the
# sum of its layer shapes worked out by hand.
FULL = {'cifar10': (32, 3466976), 'imagenet32': (32, 35482720), 'imagenet64': (64, 4868008)}


@pytest.mark.parametrize('name', ['cifar10', 'imagenet32', 'imagenet64'])
def test_full_size_variant_builds(name):
  size = FULL[name][0]
  config = tiny_config(model=name, size=size)
  config.training.batch_size = 4
  model = flowpp.get_model(config)
  params = jax.eval_shape(lambda r: flowpp.init_dequantizer(r, config)[1], jax.random.PRNGKey(0))
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  print(f'{name}: {count} parameters in {len(jax.tree_util.tree_leaves(params))} arrays')
  assert count == FULL[name][1]
  x = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)
  noise, sldj = jax.eval_shape(lambda p, u, x: model.apply({'params': p}, u, x), params, x, x)
  assert noise.shape == x.shape and sldj.shape == (2,)
  v = flowpp.VARIANTS[name]
  couplings = v.stages * v.couplings_per_stage
  assert sorted(k for k in params if k.startswith('coupling_')) == sorted(
    f'coupling_{k}' for k in range(couplings))
  c0 = params['coupling_0']
  k_out = c0['proj_out_b'].shape[0]
  assert k_out == 3 * (2 + 3 * v.components)
  assert ('proj_in_V' in c0) == v.weight_norm
  assert ('pos_emb' in c0) == v.coupling_attn
  assert ('pointwise_0' in params) == v.pointwise
  assert sum(k.startswith(f'block{v.blocks - 1}_conv_c1') for k in c0) >= 1
  assert ('block%d_conv_c1_W' % v.blocks) not in c0 and ('block%d_conv_c1_V' % v.blocks) not in c0
  assert params['processor']['proj_b'].shape == (v.proc_filters,)


SMALL = {
  # Two stages of one coupling each: both split/merge stages, each half transformed once.
  'imagenet32': dict(filters=8, components=3, blocks=1, heads=2, couplings_per_stage=1,
                     proc_filters=8, proc_blocks=1),
  'imagenet64': dict(filters=8, components=3, blocks=1, heads=2, couplings_per_stage=2,
                     proc_filters=8, proc_blocks=1),
}


@pytest.fixture(scope='module', params=sorted(SMALL))
def small(request):
  variant = dataclasses.replace(flowpp.VARIANTS[request.param], **SMALL[request.param])
  # The log-determinant formulas are the tiny variant's (checked there against the Jacobian);
  # these variants differ in the conditioners, which the inverse check exercises.
  return build(flowpp.Dequantization(variant=variant), seed=1, jacobian=False)


def test_small_wiring_data_init_and_flow(small):
  check_data_init(small)
  check_flow(small)


# score_flow models/utils.py data_dependent_init_of_dequantizer: CIFAR10 -> dequantization_cifar10
# (at any size), ImageNet 32 -> dequantization_imagenet32, ImageNet 64 -> dequantization_imagenet64.
AUTO = [('CIFAR10', 32, 'cifar10'), ('CIFAR10', 16, 'cifar10'), ('cifar10', 32, 'cifar10'),
        ('ImageNet', 32, 'imagenet32'), ('ImageNet', 64, 'imagenet64')]


@pytest.mark.parametrize('dataset,size,expected', AUTO)
def test_auto_picks_the_original_variant_per_dataset(dataset, size, expected):
  config = get_base_config()
  assert config.deq.model == flowpp.AUTO  # the default
  config.data.dataset, config.data.image_size = dataset, size
  assert flowpp.model_name(config) == expected
  assert flowpp.get_model(config).variant == flowpp.VARIANTS[expected]


def test_auto_from_the_shipped_configs_and_explicit_names():
  from configs.subvp import imagenet32_ddpmpp_continuous
  from configs.tiny import digits_deq
  from configs.vp import cifar10_ddpmpp_continuous
  assert flowpp.model_name(cifar10_ddpmpp_continuous.get_config()) == 'cifar10'
  assert flowpp.model_name(imagenet32_ddpmpp_continuous.get_config()) == 'imagenet32'
  assert flowpp.model_name(digits_deq.get_config()) == 'tiny'
  config = get_base_config()
  config.data.dataset, config.data.image_size = 'ImageNet', 64
  for name in flowpp.VARIANTS:  # an explicit name wins over the dataset
    config.deq.model = name
    assert flowpp.model_name(config) == name and flowpp.get_model(config).variant.filters == (
      flowpp.VARIANTS[name].filters)


@pytest.mark.parametrize('dataset,size', [('DIGITS', 16), ('ImageNet', 128), ('LSUN', 64),
                                          ('NPZ', 32)])
def test_auto_refuses_what_the_original_could_not_build(dataset, size):
  config = get_base_config()
  config.data.dataset, config.data.image_size = dataset, size
  with pytest.raises(ValueError, match=r"^config.deq.model='auto' .* set --config.deq.model"):
    flowpp.model_name(config)
  config.deq.model = 'imagenet65'
  with pytest.raises(ValueError, match="'auto' or one of"):
    flowpp.model_name(config)


@pytest.mark.parametrize('name', sorted(flowpp.VARIANTS))
def test_every_variant_initialises_on_a_small_input(name):
  """8x8 images, batch 2, shapes only (jax.eval_shape): the init and both directions."""
  config = tiny_config(model=name, size=8)
  config.training.batch_size = 2
  model = flowpp.get_model(config)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), np.float32)
  params = jax.eval_shape(lambda r, x: flowpp.init_dequantizer(r, config, batch=x)[1],
                          jax.random.PRNGKey(0), x)
  v = flowpp.VARIANTS[name]
  assert len([k for k in params if k.startswith('coupling_')]) == v.stages * v.couplings_per_stage
  assert params['coupling_0']['proj_out_b'].shape == (3 * (2 + 3 * v.components),)
  if v.coupling_attn:
    assert params['coupling_0']['pos_emb'].shape == (8, 4, v.filters)
  for inverse in (False, True):
    out, sldj = jax.eval_shape(
      lambda p, u, x, inverse=inverse: model.apply({'params': p}, u, x, inverse=inverse),
      params, x, x)
    assert out.shape == x.shape and out.dtype == np.float32 and sldj.shape == (2,)
