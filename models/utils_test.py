"""models.utils: registry, shapes, model_fn, and get_score_fn's label / scaling conventions checked
against the exact score of Gaussian data perturbed by each SDE."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models  # noqa: F401
import sde_lib
from configs.base_config import get_base_config
from models import utils as mutils

MU, S0 = 0.7, 0.3  # data: x0 ~ N(MU, S0^2 I)
B0, B1, SMIN, SMAX, N = 0.1, 20., 0.01, 50., 50


def _marginal(config, labels):
  """(mean coefficient m, std) of x_t | x0 that each label encodes, from the SDEs' closed forms
  (written out here, independently of sde_lib)."""
  sde, continuous = config.training.sde, config.training.continuous
  if sde in ('vpsde', 'subvpsde') and (continuous or sde == 'subvpsde'):
    t = labels / 999.
    m = jnp.exp(-0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0)
    return m, (jnp.sqrt(1. - m ** 2) if sde == 'vpsde' else 1. - m ** 2)
  if sde == 'vpsde':  # DDPM chain: alpha_bar_i = prod_{j<=i} (1 - beta_j)
    abar = jnp.cumprod(1. - jnp.linspace(B0 / N, B1 / N, N))[labels.astype(jnp.int32)]
    return jnp.sqrt(abar), jnp.sqrt(1. - abar)
  if sde == 'vesde' and continuous:
    return jnp.ones_like(labels), labels
  if sde == 'vesde':  # index into the SMLD sigmas, largest first
    return jnp.ones(labels.shape), jnp.geomspace(SMAX, SMIN, N)[labels]
  if sde == 'vesde_linear':
    return jnp.ones_like(labels), labels / 999. * SMAX
  raise AssertionError(sde)


class GaussianOracle(nn.Module):
  """The Bayes-optimal network for Gaussian data, in each SDE's output convention: the posterior
  mean of the noise E[z | x_t] (VP, sub-VP, linear VE), or the score itself (VE, like an
  NCSN++ with scale_by_sigma)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, labels, train=False):
    m, std = _marginal(self.config, labels)
    m, std = m[:, None], std[:, None]
    x0_mean = MU + m * S0 ** 2 / (m ** 2 * S0 ** 2 + std ** 2) * (x - m * MU)
    noise = (x - m * x0_mean) / std
    return -noise / std if self.config.model.scale_by_sigma else noise


if 'gaussian_oracle_test' not in mutils._MODELS:
  mutils.register_model(GaussianOracle, name='gaussian_oracle_test')


def _config(sde, continuous):
  config = get_base_config()
  config.training.sde = sde
  config.training.continuous = continuous
  config.model.name = 'gaussian_oracle_test'
  config.model.scale_by_sigma = sde == 'vesde'
  config.model.beta_min, config.model.beta_max = B0, B1
  config.model.sigma_min, config.model.sigma_max = SMIN, SMAX
  config.model.num_scales = N
  config.data.image_size = 0
  config.data.dim = 3
  return config


@pytest.mark.parametrize('sde_name,continuous', [
  ('vpsde', True), ('vpsde', False), ('subvpsde', True), ('vesde', True), ('vesde', False),
  ('vesde_linear', True)])
def test_score_fn_is_the_exact_gaussian_score(sde_name, continuous):
  config = _config(sde_name, continuous)
  sde, _ = sde_lib.get_sde(config)
  model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
  score_fn = mutils.get_score_fn(sde, model, params, states, continuous=continuous)
  t = jnp.array([0.1, 0.3, 0.56, 0.97])  # (1 - 0.56) * 49 = 21.56: round != floor
  x = jnp.asarray(np.random.RandomState(0).randn(4, 3) * 2., jnp.float32)
  # The marginal that the discretisation (if any) puts at t, from first principles.
  if sde_name in ('vpsde', 'subvpsde') and continuous or sde_name == 'subvpsde':
    m = np.exp(-0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0)
    std = np.sqrt(1 - m ** 2) if sde_name == 'vpsde' else 1 - m ** 2
  elif sde_name == 'vpsde':
    i = np.floor(np.asarray(t) * (N - 1)).astype(int)
    abar = np.cumprod(1 - np.linspace(B0 / N, B1 / N, N))[i]
    m, std = np.sqrt(abar), np.sqrt(1 - abar)
  elif sde_name == 'vesde':
    m = 1.
    std = SMIN * (SMAX / SMIN) ** np.asarray(t)
    if not continuous:  # nearest of the N geometric sigmas
      std = np.geomspace(SMIN, SMAX, N)[np.round(np.asarray(t) * (N - 1)).astype(int)]
  else:
    m, std = 1., np.asarray(t) * SMAX
  m = np.broadcast_to(m, t.shape)[:, None]
  var = m ** 2 * S0 ** 2 + np.asarray(std)[:, None] ** 2
  exact = -(np.asarray(x) - m * MU) / var
  np.testing.assert_allclose(score_fn(x, t), exact, rtol=1e-4, atol=1e-6)


def test_score_fn_train_mode_returns_mutable_state():
  class Counter(nn.Module):
    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, labels, train=False):
      count = self.variable('stats', 'count', lambda: jnp.zeros(()))
      if train:
        count.value += 1.
      w = self.param('w', nn.initializers.ones, (x.shape[-1],))
      return x * w

  config = _config('vpsde', True)
  model = Counter(config=config)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 3)), jnp.zeros((2,)))
  states = {'stats': variables['stats']}
  sde, _ = sde_lib.get_sde(config)
  score_fn = mutils.get_score_fn(sde, model, variables['params'], states, train=True,
                                 continuous=True, return_state=True)
  x, t = jnp.ones((2, 3)), jnp.array([0.5, 0.5])
  score, new_state = score_fn(x, t, jax.random.PRNGKey(1))
  assert float(new_state['stats']['count']) == 1.
  std = np.sqrt(1 - np.exp(-0.25 * 0.25 * (B1 - B0) - 0.25 * B0) ** 2)
  np.testing.assert_allclose(score, -np.ones((2, 3)) / std, rtol=1e-5)
  eval_fn = mutils.get_score_fn(sde, model, variables['params'], states, continuous=True,
                                return_state=True)
  _, same_state = eval_fn(x, t)
  assert float(same_state['stats']['count']) == 0.
  out = mutils.get_model_fn(model, variables['params'], states)(x, t)
  np.testing.assert_allclose(out, x)


def test_unknown_sde_and_model_raise_value_error():
  class NotAnSDE:
    pass

  with pytest.raises(ValueError, match='VPSDE'):
    mutils.get_score_fn(NotAnSDE(), None, {}, {})
  with pytest.raises(ValueError, match="Unknown model 'nope'.*ncsnpp"):
    mutils.get_model('nope')
  with pytest.raises(ValueError, match='Already registered'):
    mutils.register_model(GaussianOracle, name='ncsnpp')
  linear = sde_lib.VESDE(linear=True)
  with pytest.raises(ValueError, match='continuous'):
    mutils.get_score_fn(linear, None, {}, {}, continuous=False)(jnp.ones((1, 2)), jnp.ones((1,)))


def test_data_shapes():
  config = get_base_config()
  assert mutils.get_data_shape(config) == (32, 32, 3)
  config.data.image_size = 0
  with pytest.raises(ValueError, match='config.data.dim'):
    mutils.get_data_shape(config)
  config.data.dim = 2
  assert mutils.get_data_shape(config) == (2,)
  config.data.shape = (5, 4)
  assert mutils.get_data_shape(config) == (5, 4)


def test_register_model_decorator_forms():
  @mutils.register_model
  class _UtilsTestPlainName(nn.Module):
    pass

  @mutils.register_model(name='utils_test_named')
  class _Named(nn.Module):
    pass

  assert mutils.get_model('_UtilsTestPlainName') is _UtilsTestPlainName
  assert mutils.get_model('utils_test_named') is _Named
  del mutils._MODELS['_UtilsTestPlainName'], mutils._MODELS['utils_test_named']


def test_sigmas_and_ddpm_params():
  config = _config('vesde', False)
  s = np.asarray(mutils.get_sigmas(config))
  np.testing.assert_allclose(s, np.geomspace(SMAX, SMIN, N), rtol=1e-5)
  p = mutils.get_ddpm_params(get_base_config())
  np.testing.assert_allclose(p['sqrt_1m_alphas_cumprod'] ** 2 + p['sqrt_alphas_cumprod'] ** 2, 1.)
  np.testing.assert_allclose(p['betas'][[0, -1]], [1e-4, 0.02])
