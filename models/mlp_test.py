"""The toy MLP: toy.py's architecture (parameter count of the PyTorch ScoreNetwork), flat data,
and the label conventions of get_score_fn."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
import sde_lib
from models import mlp
from models import utils as mutils


def toy_config(name):
  return importlib.import_module('configs.toy.' + name).get_config()


def torch_score_network_params(x_dim, enc=(128, 128), pos_dim=64, dec=(512, 512)):
  """Number of parameters of toy.py's ScoreNetwork (nn.Linear: in*out + out)."""
  def mlp_count(d_in, widths):
    n = 0
    for w in widths:
      n, d_in = n + d_in * w + w, w
    return n
  t_enc = 2 * pos_dim
  return (mlp_count(pos_dim, list(enc) + [t_enc]) + mlp_count(x_dim, list(enc) + [t_enc])
          + mlp_count(2 * t_enc, list(dec) + [x_dim]))


@pytest.mark.parametrize('name,dim', [('mog1d_ve', 1), ('checkerboard_vp', 2)])
def test_toy_configs_build_the_toy_network(name, dim):
  config = toy_config(name)
  model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
  assert states == {}
  n = sum(p.size for p in jax.tree_util.tree_leaves(params))
  assert n == torch_score_network_params(dim)  # 469377 for 1-D
  assert params['net']['Dense_2']['kernel'].shape == (512, dim)
  assert params['x_encoder']['Dense_0']['kernel'].shape == (dim, 128)
  assert params['t_encoder']['Dense_0']['kernel'].shape == (64, 128)
  for layer in params['net'].values():  # nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1. / np.sqrt(layer['kernel'].shape[0])
    assert float(jnp.abs(layer['kernel']).max()) <= bound
    assert float(jnp.abs(layer['kernel']).max()) > 0.9 * bound
  sde, _ = sde_lib.get_sde(config)
  score_fn = jax.jit(mutils.get_score_fn(sde, model, params, states, continuous=True))
  score = score_fn(jnp.ones((5, dim)), jnp.linspace(1e-5, 1., 5))
  assert score.shape == (5, dim) and bool(jnp.all(jnp.isfinite(score)))


def test_label_to_time_inverts_the_score_fn_labels():
  t = jnp.array([1e-5, 0.25, 0.5, 1.])
  ve = toy_config('mog1d_ve')
  sigma = ve.model.sigma_min * (ve.model.sigma_max / ve.model.sigma_min) ** t
  np.testing.assert_allclose(mlp.label_to_time(ve, sigma), t, atol=1e-5)
  vp = toy_config('mog1d_vp')
  np.testing.assert_allclose(mlp.label_to_time(vp, 999. * t), t, atol=1e-6)
  vp.training.continuous = False
  vp.model.num_scales = 11
  np.testing.assert_allclose(mlp.label_to_time(vp, jnp.array([0., 5., 10.])), [0., .5, 1.])


def test_network_sees_the_same_time_under_each_sde_and_scale_by_sigma_divides():
  """Same params: the VE net at label sigma(t), times sigma, equals the VP net at label 999 t."""
  ve, vp = toy_config('checkerboard_ve'), toy_config('checkerboard_vp')
  assert ve.model.scale_by_sigma and not vp.model.scale_by_sigma
  ve_model, _, params = mutils.init_model(jax.random.PRNGKey(1), ve)
  vp_model = mutils.get_model('mlp')(config=vp)
  x = jnp.asarray(np.random.RandomState(0).randn(4, 2), jnp.float32)
  t = jnp.array([0.01, 0.2, 0.6, 0.95])
  sigma = ve.model.sigma_min * (ve.model.sigma_max / ve.model.sigma_min) ** t
  out_ve = ve_model.apply({'params': params}, x, sigma)
  out_vp = vp_model.apply({'params': params}, x, 999. * t)
  np.testing.assert_allclose(out_ve * sigma[:, None], out_vp, rtol=1e-4, atol=1e-5)
  assert not np.allclose(out_vp[0], out_vp[-1], atol=1e-4)  # time matters


def test_mlp_rejects_images_and_scaled_vp():
  config = toy_config('mog1d_vp')
  model = mutils.get_model('mlp')(config=config)
  with pytest.raises(ValueError, match='flat data'):
    jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,))),
                   jax.random.PRNGKey(0))
  config.model.scale_by_sigma = True
  model = mutils.get_model('mlp')(config=config)
  with pytest.raises(ValueError, match='scale_by_sigma'):
    jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 1)), jnp.zeros((2,))),
                   jax.random.PRNGKey(0))
