"""score_flow's variational bound against its exact expectation for Gaussian data.

With the exact score, the bound started at x_eps is tight up to the prior mismatch, so for data
N(MU, COV) (eigenvalues lam, eigenvectors V; w = V^T x, m = V^T MU; a, b the kernel's mean
coefficient and std at eps; v = a^2 lam + b^2) its expectation is, per eigen-direction, in closed
form:
  E[-log p_eps(x_eps)]             = 1/2 log(2 pi v) + (a^2 (w - m)^2 + b^2) / (2 v)
  + E[log p_T(x_T) - log pi(x_T)]  (x_T ~ N(a_T w, b_T^2), p_T = N(a_T m, v_T), pi = N(0, s_pi^2))
  + offset: E[-log q(x | x_eps)] - H[p_0eps(. | x)], q = N((x_eps + b^2 s(x_eps)) / a, b^2 / a^2).
At eps = 1e-5 the offset and the smoothing are tiny; at eps = 0.1 they are not, so the offset
on/off cases are told apart. The estimates of many independent copies of each point give the
Monte Carlo standard error the test allows (4 SE).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bound_likelihood
import likelihood
from likelihood_test import SDES, Gaussian, GaussianScoreNet, rotation3


def _gauss_ce(mean, var_sample, var):
  """E[-log N(y; 0, var)] for y - centre ~ N(mean, var_sample): elementwise."""
  return 0.5 * np.log(2 * np.pi * var) + (mean ** 2 + var_sample) / (2 * var)


def expected_bound(data, sde, x, eps, offset):
  """Exact expectation (nats, per example) of the bound with the exact score."""
  w = np.asarray(x, np.float64).reshape((x.shape[0], -1)) @ data.vecs
  m = data.mu @ data.vecs
  lam = data.lam
  (a,), (b,) = data.kernel(sde, eps)
  (a1,), (b1,) = data.kernel(sde, sde.T)
  v = a ** 2 * lam + b ** 2
  v1 = a1 ** 2 * lam + b1 ** 2
  s_pi2 = sde.prior_std() ** 2
  total = _gauss_ce(a * (w - m), b ** 2, v)
  total += -_gauss_ce(a1 * (w - m), b1 ** 2, v1) + _gauss_ce(a1 * w, b1 ** 2, s_pi2)
  if offset:
    c1, c0 = (1 - b ** 2 / v) / a, b ** 2 * m / v  # q's mean = c0 + c1 x_eps
    total += _gauss_ce(w - c0 - c1 * a * w, c1 ** 2 * b ** 2, b ** 2 / a ** 2)
    total -= 0.5 * (np.log(2 * np.pi * b ** 2) + 1.)
  return total.sum(-1)


def data_nll(data, x):
  xf = np.asarray(x, np.float64).reshape((x.shape[0], -1)) - data.mu
  return (0.5 * np.einsum('bi,ij,bj->b', xf, np.linalg.inv(data.cov), xf)
          + 0.5 * np.log(np.linalg.det(2 * np.pi * data.cov)))


DATA = {
  'd2': Gaussian([1.0, -0.5], np.diag([0.5 ** 2, 0.2 ** 2])),
  'd3_full': Gaussian([0.5, -0.2, 0.1], rotation3() @ np.diag([0.6, 0.1, 0.03]) @ rotation3().T),
  'image': Gaussian([0.2, -0.3, 0.5, 0.0], np.diag([0.3, 0.1, 0.05, 0.2]), (2, 2, 1)),
}
COPIES = 2048


def run_bound(data, sde, n_points=2, seed=0, **kw):
  """Bound estimates (COPIES, n_points) and the points."""
  x = data.sample(jax.random.PRNGKey(11), n_points)
  xs = jnp.tile(x, (COPIES,) + (1,) * (x.ndim - 1))
  fn = jax.jit(lambda rng, xs: bound_likelihood.likelihood_bound(rng, data.score_fn(sde), xs, sde,
                                                                 **kw))
  est = np.asarray(fn(jax.random.PRNGKey(seed), xs), np.float64).reshape(COPIES, n_points)
  return est, x


def check_within_mc_error(est, target, dim, max_se_bits):
  mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(est.shape[0])
  assert np.all(se / (dim * np.log(2)) < max_se_bits), se  # the test has power
  assert np.all(np.abs(mean - target) < 4 * se), (mean, target, se)


@pytest.mark.parametrize('sde_name,dsm,case', [
  ('vp', True, 'd2'), ('vp', False, 'image'), ('subvp', True, 'image'),
  ('subvp', False, 'd3_full'), ('ve', True, 'd2'), ('ve', False, 'image')])
def test_bound_is_tight_for_the_exact_score(sde_name, dsm, case):
  """DSM and SSM forms (SSM: Hutchinson divergence of the score, non-diagonal for d3_full)."""
  data = DATA[case]
  sde = SDES[sde_name]()
  est, x = run_bound(data, sde, dsm=dsm, N=128, eps=1e-5)
  target = expected_bound(data, sde, x, 1e-5, offset=True)
  check_within_mc_error(est, target, data.dim, max_se_bits=0.05)
  # At eps = 1e-5 the target is the data NLL up to ~1e-2 bits/dim (smoothing, prior mismatch).
  assert np.all(np.abs(target - data_nll(data, x)) / data.dim / np.log(2) < 2e-2)


@pytest.mark.parametrize('offset', [True, False])
@pytest.mark.parametrize('importance_weighting', [True, False])
def test_offset_and_time_sampling_at_a_large_eps(offset, importance_weighting):
  """eps = 0.1 (VP): the offset and the smoothing matter (targets differ by > 6 SE). This also
  catches the original's uniform-time estimator, which lacks the factor T - eps (10% here)."""
  data = DATA['image']
  sde = SDES['vp']()
  eps = 0.1
  est, x = run_bound(data, sde, eps=eps, offset=offset, N=64,
                     importance_weighting=importance_weighting)
  target = expected_bound(data, sde, x, eps, offset=offset)
  other = expected_bound(data, sde, x, eps, offset=not offset)
  se = est.std(0, ddof=1) / np.sqrt(COPIES)
  assert np.all(np.abs(target - other) > 6 * se), (target - other, se)
  check_within_mc_error(est, target, data.dim, max_se_bits=0.05)


def test_offset_fn_expectation():
  """The eps offset alone, averaged over many x_eps, equals its closed form."""
  data = DATA['image']
  sde = SDES['subvp']()
  eps = 0.05
  x = data.sample(jax.random.PRNGKey(2), 2)
  xs = jnp.tile(x, (4096, 1, 1, 1))
  fn = bound_likelihood.get_likelihood_offset_fn(sde, data.score_fn(sde), eps)
  est = np.asarray(jax.jit(fn)(jax.random.PRNGKey(0), xs), np.float64).reshape(4096, 2)
  target = (expected_bound(data, sde, x, eps, offset=True)
            - expected_bound(data, sde, x, eps, offset=False))
  se = est.std(0, ddof=1) / np.sqrt(4096)
  assert np.all(np.abs(est.mean(0) - target) < 4 * se + 1e-4), (est.mean(0), target, se)


def test_wrong_score_gives_a_larger_bound():
  """Averaged over data, the bound exceeds the data entropy; a scaled score makes it larger."""
  data = DATA['d2']
  sde = SDES['vp']()
  x = data.sample(jax.random.PRNGKey(4), 2048)
  exact = data.score_fn(sde)
  for score_fn, larger in ((exact, False), (lambda x, t: 1.3 * exact(x, t), True)):
    nll = jax.jit(lambda rng, x: bound_likelihood.likelihood_bound(rng, score_fn, x, sde, N=64))(
      jax.random.PRNGKey(0), x)
    gap = float(np.mean(np.asarray(nll) - data_nll(data, x)))
    se = float(np.std(np.asarray(nll) - data_nll(data, x)) / np.sqrt(2048))
    if larger:
      assert gap > 10 * se and gap > 0.05, (gap, se)
    else:
      assert abs(gap) < 4 * se + 0.01, (gap, se)


@pytest.mark.parametrize('sde_name', ['vp', 've'])
def test_model_route_equals_score_route(sde_name):
  """get_bound_fn (flax model, continuous=True) reproduces the score-function core, in bits/dim
  with the image offset."""
  data = DATA['image']
  sde = SDES[sde_name]()
  model = GaussianScoreNet(sde_name, data)
  x = data.sample(jax.random.PRNGKey(1), 4)
  params = model.init(jax.random.PRNGKey(0), x, jnp.ones(4))['params']
  rng = jax.random.PRNGKey(3)
  core = bound_likelihood.likelihood_bound(rng, data.score_fn(sde), x, sde, N=16)
  fn = bound_likelihood.get_bound_fn(sde, model, lambda x: (x + 1.) / 2., N=16, return_nll=True)
  bpd, nll = fn(rng, params, {}, x)
  np.testing.assert_allclose(nll, core, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(bpd, likelihood.nll_to_bpd(nll, x.shape, lambda x: x) - 1.,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='inverse'):
    bound_likelihood.get_bound_fn(sde, model, None)
