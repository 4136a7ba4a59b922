"""The full-size variants build (shapes only), and the imagenet32 / imagenet64 wiring (weight
norm, two split stages, attention in the context processor, couplings without attention) passes
the same checks as the tiny variant at a few channels."""
import dataclasses

import jax
import numpy as np
import pytest

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
