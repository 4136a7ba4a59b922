"""Tests of the Flow++ dequantizer on the 'tiny' variant (4x4x3 images, CPU)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base_config import get_base_config
from models import flowpp

SHAPE = (8, 4, 4, 3)


def tiny_config(model='tiny', size=4):
  config = get_base_config()
  config.deq.model = model
  config.data.image_size = size
  config.data.num_channels = 3
  return config


def perturb(params, seed):
  """Move the params away from init (numpy, no compiles) so that the couplings are far from
  the identity while the noise stays clear of float32 saturation at 0 and 1."""
  rs = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, p in leaves:
    name, p = path[-1].key, np.asarray(p)
    n = rs.standard_normal(p.shape).astype(np.float32)
    if name.endswith('_g'):  # positive scales
      out.append(p * np.exp(0.1 * n))
    elif name.startswith('proj_out'):  # coupling outputs: init_scale 0.1, here larger
      out.append(3. * p + 0.03 * n)
    elif name.startswith('W'):  # invertible 1x1 convs
      out.append(p + 0.2 * n / np.sqrt(p.shape[0]))
    else:
      out.append(p + 0.1 * (p.std() + 0.05) * n)
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in out])


def make_checks(model, jacobian=True):
  """One jitted forward returning noise, sldj, the sown activations and per-example Jacobians
  (None without `jacobian`), one jitted inverse and the jitted public dequantizer."""

  @jax.jit
  def forward(params, u, x):
    (noise, sldj), state = model.apply({'params': params}, u, x, mutable=['intermediates'])
    if not jacobian:
      return noise, sldj, state['intermediates'], None

    def single(ui, xi):
      return model.apply({'params': params}, ui[None], xi[None])[0][0].reshape(-1)

    flat = lambda ui, xi: single(ui.reshape(x.shape[1:]), xi)
    jac = jax.vmap(jax.jacfwd(flat))(u.reshape(u.shape[0], -1), x)
    return noise, sldj, state['intermediates'], jac

  inverse = jax.jit(lambda params, n, x: flowpp.get_inverse_dequantizer(model, params)(n, x))
  deq = jax.jit(lambda params, u, x: flowpp.get_dequantizer(model, params)(u, x))
  return forward, inverse, deq


def build(model, seed=0, jacobian=True):
  """Init `model` (a Dequantization, or a config for init_dequantizer) on random 4x4 images."""
  rng = jax.random.PRNGKey(seed)
  x = jax.random.uniform(jax.random.fold_in(rng, 1), SHAPE)
  u = jax.random.normal(jax.random.fold_in(rng, 2), SHAPE)
  if isinstance(model, flowpp.Dequantization):
    params = flowpp.init_params(jax.random.fold_in(rng, 3), model, x, u=u, jit=True)
  else:
    model, params = flowpp.init_dequantizer(jax.random.fold_in(rng, 3), model, x, u=u, jit=True)
  forward, inverse, deq = make_checks(model, jacobian)
  return dict(model=model, params=params, x=x, u=u, forward=forward, inverse=inverse, deq=deq,
              perturbed=perturb(params, seed))


@pytest.fixture(scope='module')
def tiny():
  return build(tiny_config())


def _flat_intermediates(inter):
  flat = jax.tree_util.tree_flatten_with_path(inter)[0]
  return [('/'.join(str(getattr(k, 'key', k)) for k in path), a) for path, a in flat]


def check_data_init(setup):
  """On the init batch every data-initialised layer is exactly zero-mean unit-variance (per
  channel; ActNorm per position), and roughly so on a fresh batch."""
  _, _, inter, _ = setup['forward'](setup['params'], setup['u'], setup['x'])
  layers = _flat_intermediates(inter)
  assert len(layers) > 10
  n_norm = 0
  for name, a in layers:
    axes = 0 if '/norm' in name else (0, 1, 2)
    n_norm += axes == 0
    np.testing.assert_allclose(a.mean(axes), 0., atol=2e-4, err_msg=name)
    # rsqrt(var + 1e-6) scaling: exactly 1 unless a channel's raw variance is tiny.
    np.testing.assert_allclose(a.var(axes), 1., atol=1e-2, err_msg=name)
  assert n_norm >= 2
  rng = jax.random.PRNGKey(7)
  x = jax.random.uniform(rng, SHAPE)
  u = jax.random.normal(jax.random.fold_in(rng, 1), SHAPE)
  _, _, inter, _ = setup['forward'](setup['params'], u, x)
  for name, a in _flat_intermediates(inter):
    assert abs(float(a.mean())) < 0.5, name
    assert 0.2 < float(a.var()) < 5., name


def check_flow(setup):
  """Log-determinant against the exact Jacobian (when built with it), range and invertibility
  with perturbed params."""
  params, x = setup['perturbed'], setup['x']
  u = jax.random.normal(jax.random.PRNGKey(11), SHAPE)
  noise, sldj, _, jac = setup['forward'](params, u, x)
  assert noise.shape == x.shape and sldj.shape == (SHAPE[0],)
  assert bool(jnp.all(noise > 0.)) and bool(jnp.all(noise < 1.))
  # The map is far from a fixed scaling: the log-determinant varies across examples.
  assert float(jnp.std(sldj)) > 0.1
  if jac is not None:
    sign, logdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert np.all(sign != 0)
    np.testing.assert_allclose(sldj, logdet, rtol=0, atol=1e-3)
  # u -> noise -> u, and noise -> u -> noise for noise spread over (0, 1).
  u_back, sldj_back = setup['inverse'](params, noise, x)
  np.testing.assert_allclose(u_back, u, atol=5e-4)
  np.testing.assert_allclose(sldj_back, sldj, atol=1e-3)
  noise = jax.random.uniform(jax.random.PRNGKey(12), SHAPE, minval=0.01, maxval=0.99)
  u_inv, sldj_inv = setup['inverse'](params, noise, x)
  noise_back, sldj_fwd, _, _ = setup['forward'](params, u_inv, x)
  np.testing.assert_allclose(noise_back, noise, atol=2e-6)
  np.testing.assert_allclose(sldj_inv, sldj_fwd, atol=1e-3)


def test_data_dependent_init(tiny):
  check_data_init(tiny)


def test_flow_jacobian_range_and_inverse(tiny):
  check_flow(tiny)


def test_public_dequantizer_matches_module(tiny):
  u = jax.random.normal(jax.random.PRNGKey(11), SHAPE)
  noise, sldj, _, _ = tiny['forward'](tiny['perturbed'], u, tiny['x'])
  noise2, sldj2 = tiny['deq'](tiny['perturbed'], u, tiny['x'])
  np.testing.assert_allclose(noise2, noise, atol=1e-6)
  np.testing.assert_allclose(sldj2, sldj, atol=1e-4)


def test_noise_strictly_inside_unit_interval_even_when_saturated(tiny):
  u = 30. * jax.random.normal(jax.random.PRNGKey(3), SHAPE)
  noise, sldj = tiny['deq'](tiny['perturbed'], u, tiny['x'])
  assert float(jnp.max(jnp.abs(u))) > 50.
  assert bool(jnp.all(noise > 0.)) and bool(jnp.all(noise < 1.))
  assert bool(jnp.all(jnp.isfinite(sldj)))


def test_log_q_sign_convention(tiny):
  """log q(noise|x) = log N(u) - sldj; neg_log_q is score_flow's second output."""
  u = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  _, sldj = tiny['deq'](tiny['perturbed'], u, tiny['x'])
  logn = -0.5 * np.sum(np.asarray(u, np.float64) ** 2, axis=(1, 2, 3)) - 24 * np.log(2 * np.pi)
  np.testing.assert_allclose(flowpp.std_normal_logpdf(u), logn, rtol=1e-5)
  np.testing.assert_allclose(flowpp.log_q(u, sldj), logn - sldj, rtol=1e-5)
  np.testing.assert_allclose(flowpp.neg_log_q(u, sldj), sldj - logn, rtol=1e-5)


def test_bad_input_raises_value_error():
  with pytest.raises(ValueError, match='config.deq.model'):
    flowpp.init_dequantizer(jax.random.PRNGKey(0), tiny_config(model='cifar100'))
  with pytest.raises(ValueError, match='shape'):
    flowpp.init_dequantizer(jax.random.PRNGKey(0), tiny_config(), jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match='even'):
    flowpp.init_dequantizer(jax.random.PRNGKey(0), tiny_config(size=5))


def test_dropout_needs_rng_in_training():
  model = dataclasses.replace(flowpp.get_model(tiny_config()), dropout=0.1)
  deq = flowpp.get_dequantizer(model, {}, train=True)
  with pytest.raises(ValueError, match='rng'):
    deq(jnp.zeros(SHAPE), jnp.zeros(SHAPE))


def test_dropout_acts_in_training_only(tiny):
  """config.deq.dropout reaches the context processor: training noise depends on the dropout
  key, evaluation noise does not use one."""
  model = dataclasses.replace(tiny['model'], dropout=0.5)
  params, x = tiny['perturbed'], tiny['x']
  u = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  train = jax.jit(lambda u, x, r: flowpp.get_dequantizer(model, params, train=True)(u, x, rng=r))
  a, _ = train(u, x, jax.random.PRNGKey(1))
  b, _ = train(u, x, jax.random.PRNGKey(1))
  c, _ = train(u, x, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  d, _ = tiny['deq'](params, u, x)
  e, _ = jax.jit(flowpp.get_dequantizer(model, params))(u, x)  # eval mode: no dropout
  np.testing.assert_allclose(e, d, atol=1e-6)
