"""Mixture-of-logistics functions against scipy (float64) and their inverses."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from models.flowpp import logistic

RS = np.random.default_rng(0)
SHAPE, K = (5, 7), 4
PARAMS = dict(prior_logits=RS.standard_normal(SHAPE + (K,)).astype(np.float32),
              means=(2. * RS.standard_normal(SHAPE + (K,))).astype(np.float32),
              logscales=(0.5 * RS.standard_normal(SHAPE + (K,))).astype(np.float32))


def scipy_mixture(x):
  """pdf, cdf and survival function of the mixture in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
  w = np.exp(p['prior_logits'] - p['prior_logits'].max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  dist = stats.logistic(loc=p['means'], scale=np.exp(p['logscales']))
  x = np.asarray(x, np.float64)[..., None]
  return tuple(np.sum(w * f(x), -1) for f in (dist.pdf, dist.cdf, dist.sf))


def test_mixture_density_and_cdf_match_scipy():
  x = (3. * RS.standard_normal(SHAPE)).astype(np.float32)
  pdf, cdf, sf = scipy_mixture(x)
  np.testing.assert_allclose(logistic.mixlogistic_logpdf(x=x, **PARAMS), np.log(pdf), atol=1e-5)
  np.testing.assert_allclose(logistic.mixlogistic_logcdf(x=x, **PARAMS), np.log(cdf), atol=1e-5)
  np.testing.assert_allclose(logistic.mixlogistic_logsf(x=x, **PARAMS), np.log(sf), atol=1e-5)
  logit, _, _ = logistic.mixlogistic_logit_cdf(x=x, **PARAMS)
  np.testing.assert_allclose(logit, np.log(cdf) - np.log(sf), atol=1e-4)


def test_logit_cdf_exact_in_the_tails():
  """Where F rounds to 0 or 1 in float32 the logit is still accurate (this is what keeps the
  couplings invertible); the derivative of the logit is pdf / (F (1 - F))."""
  x = np.full(SHAPE, 80., np.float32) * np.sign(RS.standard_normal(SHAPE)).astype(np.float32)
  pdf, cdf, sf = scipy_mixture(x)
  logit, _, _ = logistic.mixlogistic_logit_cdf(x=x, **PARAMS)
  np.testing.assert_allclose(logit, np.log(cdf) - np.log(sf), rtol=1e-5)
  assert np.all(np.abs(np.asarray(logit)) > 20.)  # 1 - F < 1e-8: F itself rounds to 0 or 1
  grad = jax.grad(lambda x: jnp.sum(logistic.mixlogistic_logit_cdf(x=x, **PARAMS)[0]))(x)
  np.testing.assert_allclose(grad, pdf / (cdf * sf), rtol=1e-3)


def test_inverse_cdfs():
  x = (3. * RS.standard_normal(SHAPE)).astype(np.float32)
  _, cdf, _ = scipy_mixture(x)
  y = logistic.mixlogistic_invcdf(y=jnp.asarray(cdf, jnp.float32), **PARAMS)
  np.testing.assert_allclose(y, x, atol=1e-3)
  logit, _, _ = logistic.mixlogistic_logit_cdf(x=x, **PARAMS)
  y = logistic.mixlogistic_inv_logit_cdf(y=logit, **PARAMS)
  np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def test_sample_matches_cdf():
  """Kolmogorov-Smirnov distance of samples of one mixture from its CDF."""
  one = {k: np.broadcast_to(v[0, 0], (4000, K)) for k, v in PARAMS.items()}
  s = np.asarray(logistic.mixlogistic_sample(jax.random.PRNGKey(0), **one), np.float64)
  p = {k: np.asarray(v[0, 0], np.float64) for k, v in PARAMS.items()}
  w = np.exp(p['prior_logits']) / np.exp(p['prior_logits']).sum()
  cdf = lambda t: np.sum(w * stats.logistic.cdf(t[:, None], p['means'], np.exp(p['logscales'])), 1)
  assert stats.kstest(s, cdf).pvalue > 1e-3
