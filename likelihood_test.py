"""ODE likelihoods against the analytic density of Gaussian data.

Data N(MU, COV) (flat dims 1-3 and a 2x2x1 'image'): the perturbed marginal is
p_t = N(a_t MU, a_t^2 COV + b_t^2 I) (a_t, b_t the mean coefficient and std of the kernel) for
VP, sub-VP and VE, with score -(a_t^2 COV + b_t^2 I)^{-1} (x - a_t MU). Along each eigenvector of
COV the probability-flow map is affine, u_T = sqrt(v_T / v_eps) u_eps with v_t = a_t^2 lam + b_t^2,
so the model density integrated from eps is exactly
  log p(x) = log prior(z) + 1/2 sum log(v_T / v_eps),
  z = a_T MU + V diag(sqrt(v_T / v_eps)) V^T (x - a_eps MU).
This target accounts for both the eps smoothing (v_eps = lam + b_eps^2, not lam) and the small
mismatch between p_T and the prior, so no tolerance has to absorb them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import likelihood
import sde_lib

EPS = 1e-5
SDES = {
  'vp': lambda: sde_lib.VPSDE(0.1, 20., 1000),
  'subvp': lambda: sde_lib.subVPSDE(0.1, 20., 1000),
  've': lambda: sde_lib.VESDE(0.01, 50., 1000),
}


class Gaussian:
  """Data N(mu, cov) with examples of shape `shape` (cov over the flattened example)."""

  def __init__(self, mu, cov, shape=None):
    self.mu = np.asarray(mu, np.float64)
    self.cov = np.asarray(cov, np.float64)
    self.dim = self.mu.size
    self.shape = tuple(shape) if shape is not None else (self.dim,)
    self.lam, self.vecs = np.linalg.eigh(self.cov)

  def sample(self, rng, n):
    z = np.asarray(jax.random.normal(rng, (n, self.dim)), np.float64)
    x = self.mu + (z * np.sqrt(self.lam)) @ self.vecs.T
    return jnp.asarray(x.reshape((n,) + self.shape), jnp.float32)

  @staticmethod
  def kernel(sde, t, n=1):
    """(a_t, b_t) as float64 numpy arrays of shape (n,)."""
    t = jnp.full((n,), t, jnp.float32) if np.ndim(t) == 0 else jnp.asarray(t, jnp.float32)
    a, b = sde.marginal_prob(jnp.ones((t.shape[0], 1)), t)
    return np.asarray(a[:, 0], np.float64), np.asarray(b, np.float64)

  def score_fn(self, sde):
    mu = jnp.asarray(self.mu, jnp.float32)
    lam = jnp.asarray(self.lam, jnp.float32)
    vecs = jnp.asarray(self.vecs, jnp.float32)

    def score_fn(x, t):
      a, b = sde.marginal_prob(jnp.ones((x.shape[0], 1), x.dtype), t)
      u = (x.reshape((x.shape[0], -1)) - a * mu) @ vecs
      u = u / (a ** 2 * lam + b[:, None] ** 2)
      return (-u @ vecs.T).reshape(x.shape)
    return score_fn

  def variances(self, sde, t):
    a, b = self.kernel(sde, t)
    return a[0] ** 2 * self.lam + b[0] ** 2

  def ode_latent_and_nll(self, sde, x, eps=EPS):
    """The exact flow map z = Phi(x) from eps to T and the model NLL (nats) at x."""
    x = np.asarray(x, np.float64).reshape((x.shape[0], -1))
    (a0,), _ = self.kernel(sde, eps)
    (a1,), _ = self.kernel(sde, sde.T)
    ratio = self.variances(sde, sde.T) / self.variances(sde, eps)
    z = a1 * self.mu + ((x - a0 * self.mu) @ self.vecs * np.sqrt(ratio)) @ self.vecs.T
    var = sde.prior_std() ** 2
    prior_logp = -self.dim / 2 * np.log(2 * np.pi * var) - np.sum(z ** 2, -1) / (2 * var)
    return z.reshape((x.shape[0],) + self.shape), -(prior_logp + 0.5 * np.sum(np.log(ratio)))


def rotation3():
  q, _ = np.linalg.qr(np.array([[1., 0.3, -0.2], [0.4, 1., 0.5], [-0.3, 0.2, 1.]]))
  return q


CASES = {  # (data, exact divergence?)
  'd1': (Gaussian([0.7], [[0.3 ** 2]]), True),
  'd2': (Gaussian([1.0, -0.5], np.diag([0.5 ** 2, 0.2 ** 2])), True),
  'd3_full': (Gaussian([0.5, -0.2, 0.1], rotation3() @ np.diag([0.6, 0.1, 0.03]) @ rotation3().T),
              True),
  # Diagonal covariance: the drift's Jacobian is diagonal, so the Rademacher estimate is exact.
  'image': (Gaussian([0.2, -0.3, 0.5, 0.0], np.diag([0.3, 0.1, 0.05, 0.2]), (2, 2, 1)), False),
}
TOL_BPD = 1e-3


def bits(nll, dim):
  return np.asarray(nll, np.float64) / (dim * np.log(2.))


@pytest.mark.parametrize('sde_name', list(SDES))
@pytest.mark.parametrize('case', list(CASES))
def test_jax_route_matches_analytic_nll(sde_name, case):
  data, exact = CASES[case]
  sde = SDES[sde_name]()
  x = data.sample(jax.random.PRNGKey(1), 6)
  run = jax.jit(lambda rng, x: likelihood.ode_likelihood(rng, data.score_fn(sde), x, sde,
                                                         exact_div=exact, eps=EPS))
  nll, z, nfe = run(jax.random.PRNGKey(0), x)
  z_true, nll_true = data.ode_latent_and_nll(sde, x)
  err = np.max(np.abs(bits(nll, data.dim) - bits(nll_true, data.dim)))
  assert err < TOL_BPD, err
  np.testing.assert_allclose(z, z_true, atol=2e-4 * sde.prior_std())
  assert 10 < int(nfe) < 1000


@pytest.mark.parametrize('sde_name,case', [('vp', 'd3_full'), ('subvp', 'image'), ('ve', 'd1')])
def test_scipy_route_matches_analytic_nll_and_jax_nfe(sde_name, case):
  data, exact = CASES[case]
  sde = SDES[sde_name]()
  x = data.sample(jax.random.PRNGKey(1), 6)
  nll, z, nfe = likelihood.ode_likelihood(jax.random.PRNGKey(0), data.score_fn(sde), x, sde,
                                          exact_div=exact, eps=EPS, method='scipy')
  z_true, nll_true = data.ode_latent_and_nll(sde, x)
  assert np.max(np.abs(bits(nll, data.dim) - bits(nll_true, data.dim))) < TOL_BPD
  np.testing.assert_allclose(z, z_true, atol=2e-4 * sde.prior_std())
  # Same algorithm on the same state (float64 host vs float32 device): same NFE within 10%.
  _, _, nfe_jax = jax.jit(lambda x: likelihood.ode_likelihood(
    jax.random.PRNGKey(0), data.score_fn(sde), x, sde, exact_div=exact, eps=EPS))(x)
  assert abs(int(nfe_jax) - nfe) <= 0.1 * nfe, (int(nfe_jax), nfe)


@pytest.mark.parametrize('hutchinson_type', ['Rademacher', 'Gaussian'])
def test_hutchinson_is_unbiased_on_a_full_covariance(hutchinson_type):
  """With a non-diagonal Jacobian the probe matters: per-copy estimates scatter, their mean over
  256 independent probes equals the analytic NLL within 4 standard errors."""
  data, _ = CASES['d3_full']
  sde = SDES['vp']()
  copies = 256
  x = jnp.tile(data.sample(jax.random.PRNGKey(3), 2), (copies, 1))  # (512, 3): 2 points
  nll, _, _ = jax.jit(lambda x: likelihood.ode_likelihood(
    jax.random.PRNGKey(7), data.score_fn(sde), x, sde, hutchinson_type=hutchinson_type))(x)
  _, nll_true = data.ode_latent_and_nll(sde, x[:2])
  est = np.asarray(nll, np.float64).reshape(copies, 2)
  se = est.std(0, ddof=1) / np.sqrt(copies)
  assert np.all(est.std(0) > 1e-3)  # the estimator really is stochastic here
  assert np.all(np.abs(est.mean(0) - nll_true) < 4 * se + 1e-3), (est.mean(0), nll_true, se)


def test_fewer_bits_bins_and_offset():
  """b-bit data: dequantize puts k / (2^b - 1) into [k, k + 1) / 2^b (b = 8: (x * 255 + u) / 256);
  the density 1 on [0, 1] (nll 0, identity scaler) gives -log2 P(bin) = b bits/dim."""
  for bits in (1, 2, 5, 8):
    k = np.arange(2 ** bits)
    for u in (0., 0.5, 0.999):
      y = likelihood.dequantize(k / (2. ** bits - 1), u, bits)
      np.testing.assert_array_equal(np.floor(y * 2 ** bits), k)
    nll = np.zeros(3)
    np.testing.assert_allclose(likelihood.nll_to_bpd(nll, (3, 4), lambda x: x, bits=bits), bits)
  x = np.linspace(0, 1, 256)
  np.testing.assert_allclose(likelihood.dequantize(x, 0.3), (x * 255 + 0.3) / 256)
  assert float(likelihood.bpd_offset(lambda x: (x + 1.) / 2., bits=2)) == pytest.approx(1.)


def test_bpd_offset_and_data_kinds():
  assert float(likelihood.bpd_offset(lambda x: (x + 1.) / 2.)) == pytest.approx(7.)
  assert float(likelihood.bpd_offset(lambda x: x)) == pytest.approx(8.)
  assert likelihood.bpd_offset(None, data_is_images=False) == 0.
  nll = jnp.asarray([1., 2.])
  np.testing.assert_allclose(likelihood.nll_to_bpd(nll, (2, 2, 2, 1), lambda x: x),
                             np.asarray(nll) / (4 * np.log(2)) + 8., rtol=1e-6)
  np.testing.assert_allclose(likelihood.nll_to_bpd(nll, (2, 3), data_is_images=False),
                             np.asarray(nll) / (3 * np.log(2)), rtol=1e-6)


def test_bad_input():
  data, _ = CASES['image']
  sde = SDES['vp']()
  x = data.sample(jax.random.PRNGKey(0), 2)
  with pytest.raises(ValueError, match='likelihood solver'):
    likelihood.ode_likelihood(jax.random.PRNGKey(0), data.score_fn(sde), x, sde, method='euler')
  with pytest.raises(ValueError, match='exact_div'):
    likelihood.ode_likelihood(jax.random.PRNGKey(0), lambda x, t: -x, jnp.zeros((2, 8, 8, 1)),
                              sde, exact_div=True)
  with pytest.raises(ValueError, match='inverse'):
    likelihood.get_likelihood_fn(sde, None, None)
  with pytest.raises(ValueError, match='Hutchinson'):
    likelihood.ode_likelihood(jax.random.PRNGKey(0), data.score_fn(sde), x, sde,
                              hutchinson_type='uniform')


class GaussianScoreNet(nn.Module):
  """A 'network' whose output follows score_sde's conventions for the analytic Gaussian score:
  VP/sub-VP continuous: labels = 999 t, score = -output / std; VE: labels = std, output = score.
  One trainable scale (init 1) so that params are really threaded through."""
  sde_name: str
  data: Gaussian

  @nn.compact
  def __call__(self, x, labels, train=False):
    scale = self.param('scale', nn.initializers.ones, ())
    sde = SDES[self.sde_name]()
    if self.sde_name == 've':
      t = jnp.log(labels / sde.sigma_min) / np.log(sde.sigma_max / sde.sigma_min)
      return scale * self.data.score_fn(sde)(x, t)
    t = labels / 999.
    std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
    return -scale * std.reshape((-1,) + (1,) * (x.ndim - 1)) * self.data.score_fn(sde)(x, t)


@pytest.mark.parametrize('sde_name', ['vp', 've'])
def test_model_route_equals_score_route(sde_name):
  """get_likelihood_fn (flax model through models.utils.get_score_fn, continuous=True) gives the
  score-function core's numbers, for both solvers, with the image bits/dim offset."""
  data, _ = CASES['image']
  sde = SDES[sde_name]()
  model = GaussianScoreNet(sde_name, data)
  x = data.sample(jax.random.PRNGKey(1), 4)
  params = model.init(jax.random.PRNGKey(0), x, jnp.ones(4))['params']
  inverse_scaler = lambda x: (x + 1.) / 2.
  rng = jax.random.PRNGKey(5)
  nll_core, z_core, _ = likelihood.ode_likelihood(rng, data.score_fn(sde), x, sde, eps=EPS)
  for method in ('jax', 'scipy'):
    fn = likelihood.get_likelihood_fn(sde, model, inverse_scaler, method=method, eps=EPS,
                                      return_nll=True)
    bpd, z, nfe, nll = fn(rng, params, {}, x)
    np.testing.assert_allclose(nll, nll_core, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(z, z_core, atol=1e-3 * sde.prior_std())
    np.testing.assert_allclose(bpd, np.asarray(nll) / (4 * np.log(2.)) + 7., rtol=1e-6)
    assert int(nfe) > 10
  # The params are used: doubling the score changes the likelihood.
  fn = likelihood.get_likelihood_fn(sde, model, inverse_scaler, eps=EPS)
  bpd2, _, _ = fn(rng, {'scale': jnp.asarray(2.)}, {}, x)
  assert np.all(np.abs(np.asarray(bpd2) - np.asarray(bpd)) > 0.01)


_SHARDED_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import likelihood, likelihood_test as lt
assert jax.device_count() == 2
data, _ = lt.CASES['image']
sde = lt.SDES['vp']()
x = data.sample(jax.random.PRNGKey(1), 8)
fn = jax.jit(lambda rng, x: likelihood.ode_likelihood(rng, data.score_fn(sde), x, sde))
nll1, z1, nfe1 = fn(jax.random.PRNGKey(0), x)
mesh = Mesh(np.array(jax.devices()), ('batch',))
xs = jax.device_put(x, NamedSharding(mesh, P('batch')))
nll2, z2, nfe2 = fn(jax.random.PRNGKey(0), xs)
assert len(nll2.sharding.device_set) == 2, nll2.sharding
np.testing.assert_allclose(nll2, nll1, rtol=1e-5, atol=1e-4)
np.testing.assert_allclose(z2, z1, atol=1e-5)
assert int(nfe1) == int(nfe2)
print('OK')
'''


@pytest.mark.slow
def test_sharded_batch_matches_one_device():
  """The jitted likelihood runs data-parallel on a batch sharded over 2 (host) devices."""
  from harness import run_main
  out = run_main([], {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
                    'JAX_PLATFORMS': 'cpu'}, timeout=300, program=_SHARDED_SCRIPT)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-2000:]
