"""The toy MLP: toy.py's architecture (parameter count of the PyTorch ScoreNetwork), flat data,
the label conventions of get_score_fn, and its Taylor pass (exact x-derivatives) against
autodiff and jax.jacfwd, in the training loss too."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
import high_order
import losses
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


def _toy_inputs(config, dim, batch=6):
  x = jax.random.normal(jax.random.PRNGKey(dim), (batch, dim)) * 2.
  t = jnp.linspace(0.02, 0.9, batch)
  if config.training.sde == 'vesde':
    return x, config.model.sigma_min * (config.model.sigma_max / config.model.sigma_min) ** t
  return x, 999. * t


@pytest.mark.parametrize('order', [2, 3])
@pytest.mark.parametrize('name,dim,decoder', [
  ('mog1d_ve', 1, None), ('checkerboard_ve', 2, None), ('checkerboard_vp', 2, None),
  ('mog1d_vp', 1, (48, 64)), ('checkerboard_ve', 2, (48, 64)), ('checkerboard_vp', 2, (64,))])
def test_taylor_derivatives_match_autodiff_and_jacfwd(name, dim, decoder, order):
  """The MLP's Taylor pass gives autodiff's (out, J, grad_x tr J), and J, grad_x tr J of jacfwd
  (the toy widths, and narrow ones: layers of unequal widths, one decoder layer)."""
  config = toy_config(name)
  if decoder:
    config.model.encoder_layers, config.model.temb_dim = (32,), 16
    config.model.decoder_layers = decoder
  model, _, params = mutils.init_model(jax.random.PRNGKey(3), config)
  x, labels = _toy_inputs(config, dim)
  fn = lambda y: model.apply({'params': params}, y, labels)
  got = jax.jit(lambda y: model.apply({'params': params}, y, labels, order,
                                      method='derivatives'))(x)
  want = high_order.autodiff_derivatives(fn, x, order)
  assert got[1].shape == (x.shape[0], dim, dim)
  for a, b in zip(got, want):
    if b is None:
      assert a is None
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
  row = lambda y, i: fn(x.at[i].set(y))[i]
  for i in range(x.shape[0]):
    np.testing.assert_allclose(got[1][i], jax.jacfwd(row)(x[i], i), rtol=1e-4, atol=1e-7)
    if order == 3:
      tr = lambda y: jnp.trace(jax.jacfwd(row)(y, i))
      np.testing.assert_allclose(got[2][i], jax.grad(tr)(x[i]), rtol=1e-4, atol=1e-7)


def _no_autodiff(*args):
  raise AssertionError('autodiff taken where the Taylor pass should be')


@pytest.mark.parametrize('order', [2, 3])
@pytest.mark.parametrize('name', ['mog1d_ve', 'checkerboard_ve', 'checkerboard_vp'])
def test_exact_jacobian_loss_and_gradient_match_the_autodiff_path(name, order, monkeypatch):
  """The training loss takes the MLP's pass (get_score_fn's derivatives); its value and parameter
  gradient equal those of the same loss with the derivatives taken by autodiff."""
  config = toy_config(name)
  model, states, params = mutils.init_model(jax.random.PRNGKey(4), config)
  sde, _ = sde_lib.get_sde(config)
  score_fn = mutils.get_score_fn(sde, model, params, states, train=True, continuous=True,
                                 return_state=True)
  assert hasattr(score_fn, 'derivatives')
  loss_fn = losses.get_sde_loss_fn(sde, model, True, reduce_mean=True, continuous=True,
                                   likelihood_weighting=False, importance_weighting=False,
                                   score_matching_order=order, loss_weights=(1., 0.5, 0.1),
                                   exact_jacobian=True)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(5), (64, config.data.dim))}
  grad_fn = lambda: jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))(
    jax.random.PRNGKey(6), params, states, batch)
  autodiff = high_order.autodiff_derivatives
  monkeypatch.setattr(high_order, 'autodiff_derivatives', _no_autodiff)
  (loss, aux), grads = grad_fn()
  monkeypatch.setattr(high_order, 'exact_derivatives', autodiff)
  (loss_a, aux_a), grads_a = grad_fn()
  np.testing.assert_allclose(loss, loss_a, rtol=1e-5)
  np.testing.assert_allclose(jnp.stack(aux[1:]), jnp.stack(aux_a[1:]), rtol=1e-5)
  for g, g_a in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_a)):
    np.testing.assert_allclose(g, g_a, rtol=1e-4, atol=1e-5 * float(jnp.abs(g_a).max()))
