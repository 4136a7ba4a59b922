"""sde_lib against independent truth: Euler-Maruyama simulation, scipy densities, autodiff."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

import sde_lib

jax.config.update('jax_enable_x64', False)

SDES = {
    'vp': lambda: sde_lib.VPSDE(0.1, 20., 1000),
    'subvp': lambda: sde_lib.subVPSDE(0.1, 20., 1000),
    've': lambda: sde_lib.VESDE(0.01, 50., 1000),
    've_linear': lambda: sde_lib.VESDE(0.01, 5., 1000, linear=True),
}


@pytest.mark.parametrize('name', list(SDES))
def test_marginal_matches_euler_maruyama(name):
  """Simulate the forward SDE finely from a fixed x0; the endpoint is N(mean, std^2)."""
  sde = SDES[name]()
  n, steps, t_end = 20000, 2000, 0.5
  x0 = jnp.full((n, 2), 0.7)
  dt = t_end / steps

  def step(x, inp):
    i, key = inp
    t = jnp.full((n,), i * dt)
    drift, g = sde.sde(x, t)
    x = x + drift * dt + g[:, None] * np.sqrt(dt) * jax.random.normal(key, x.shape)
    return x, None

  keys = jax.random.split(jax.random.PRNGKey(0), steps)
  x, _ = jax.lax.scan(step, x0, (jnp.arange(steps), keys))
  mean, std = sde.marginal_prob(x0, jnp.full((n,), t_end))
  # Mean within 5 standard errors; std within 3% (Euler bias + sampling error).
  se = std[0] / np.sqrt(n)
  np.testing.assert_allclose(np.mean(x, 0), mean[0], atol=5 * se)
  np.testing.assert_allclose(np.std(x, 0), std[0], rtol=0.03)


@pytest.mark.parametrize('name', list(SDES))
def test_cum_weight_is_integral_of_g2_over_sigma2(name):
  sde = SDES[name]()
  eps = 1e-5
  ts = jnp.linspace(0.05, 1., 9)
  dcum = jax.vmap(jax.grad(lambda t: sde.likelihood_importance_cum_weight(t, eps=eps)))(ts)
  g = sde.sde(jnp.zeros((9, 1)), ts)[1]
  std = sde.marginal_prob(jnp.zeros((9, 1)), ts)[1]
  np.testing.assert_allclose(dcum, g ** 2 / std ** 2, rtol=2e-3)
  assert abs(float(sde.likelihood_importance_cum_weight(jnp.float32(eps), eps=eps))) < 1e-3


@pytest.mark.parametrize('name', list(SDES))
def test_importance_time_has_the_density_of_its_cum_weight(name):
  sde = SDES[name]()
  eps = 1e-5
  t = np.asarray(sde.sample_importance_weighted_time_for_likelihood(
      jax.random.PRNGKey(1), (4000,), eps=eps))
  assert t.min() >= eps and t.max() <= sde.T
  Z = float(sde.likelihood_importance_cum_weight(sde.T, eps=eps))
  cdf = lambda s: np.asarray(sde.likelihood_importance_cum_weight(jnp.asarray(s, jnp.float32),
                                                                  eps=eps)) / Z
  assert scipy.stats.kstest(t, cdf).pvalue > 1e-3


@pytest.mark.parametrize('name', list(SDES))
def test_prior_logp_and_entropy_match_scipy(name):
  sde = SDES[name]()
  z = np.random.RandomState(0).randn(3, 4, 4, 3).astype(np.float32) * sde.prior_std()
  want = scipy.stats.norm(0, sde.prior_std()).logpdf(z).reshape(3, -1).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(jnp.asarray(z)), want, rtol=1e-5)
  ent = scipy.stats.norm(0, sde.prior_std()).entropy() * 48
  np.testing.assert_allclose(sde.prior_entropy(jnp.asarray(z)), [ent] * 3, rtol=1e-5)
  samples = sde.prior_sampling(jax.random.PRNGKey(0), (20000, 1))
  np.testing.assert_allclose(np.std(samples), sde.prior_std(), rtol=0.03)


@pytest.mark.parametrize('name', ['vp', 'subvp'])
def test_high_precision_branch_is_continuous(name):
  """The small-t expansions agree with the exact formulas in float64 at the switch point."""
  sde = SDES[name]()
  t = jnp.asarray([1e-6, 1e-5, 4e-5, 1e-4, 1e-3])
  mean_hp, std_hp = sde.marginal_prob(jnp.ones((5, 1)), t)
  lmc = -0.25 * np.asarray(t, np.float64) ** 2 * 19.9 - 0.5 * np.asarray(t, np.float64) * 0.1
  var = -np.expm1(2 * lmc)
  want_std = np.sqrt(var) if name == 'vp' else var
  np.testing.assert_allclose(std_hp, want_std, rtol=2e-3)
  np.testing.assert_allclose(mean_hp[:, 0], np.exp(lmc), rtol=1e-6)


def test_probability_flow_drift():
  sde = SDES['vp']()
  score_fn = lambda x, t: -x
  rev = sde.reverse(score_fn, probability_flow=True)
  x, t = jnp.ones((2, 3)), jnp.asarray([0.3, 0.6])
  drift, diff = rev.sde(x, t)
  f, g = sde.sde(x, t)
  np.testing.assert_allclose(drift, f + 0.5 * (g ** 2)[:, None] * x, rtol=1e-6)
  np.testing.assert_allclose(diff, 0.)


def test_get_sde_factory_and_error():
  config = ml_collections.ConfigDict({
      'training': {'sde': 'vesde'}, 'sampling': {'smallest_time': 1e-5},
      'model': {'sigma_min': 0.01, 'sigma_max': 50., 'beta_min': 0.1, 'beta_max': 20.,
                'num_scales': 1000}})
  sde, eps = sde_lib.get_sde(config)
  assert isinstance(sde, sde_lib.VESDE) and eps == 1e-5
  t = np.array([0.3])
  for name in ('vesde_linear', 'linearvesde'):  # ours and the original's name, the same SDE
    config.training.sde = name
    linear, _ = sde_lib.get_sde(config)
    assert linear.linear and not sde.linear
    np.testing.assert_allclose(linear.marginal_prob(np.zeros((1, 1)), t)[1], 0.3 * 50.,
                               rtol=1e-5)
  config.training.sde = 'nope'
  with pytest.raises(ValueError, match='training.sde'):
    sde_lib.get_sde(config)
