"""Samplers against independent truth: Gaussian data N(MU, S^2 I) in 2-D, whose perturbed marginal
p_t = N(m(t) MU, (m(t)^2 S^2 + std(t)^2) I) and score are known exactly for VP, sub-VP and VE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_lib
import sampling
from configs import base_config

jax.config.update('jax_enable_x64', False)

MU = np.array([1.0, -0.5], np.float32)
S = 0.5
B = 4000  # samples: standard error of the mean 0.016 S, of a variance ~2.2%
N = 500
SDES = {
    'vp': lambda n=N: sde_lib.VPSDE(0.1, 20., n),
    'subvp': lambda n=N: sde_lib.subVPSDE(0.1, 20., n),
    've': lambda n=N: sde_lib.VESDE(0.01, 10., n),
}


def marginal(sde, t, s=S):
  """Mean (B, 2) and variance (B, 1) of p_t for data N(MU, s^2 I)."""
  mean, std = sde.marginal_prob(jnp.broadcast_to(MU, (t.shape[0], 2)), t)
  coeff = sde.marginal_prob(jnp.ones((t.shape[0], 1)), t)[0]
  return mean, coeff ** 2 * s ** 2 + std[:, None] ** 2


def gaussian_score(sde, s=S):
  def score_fn(x, t):
    mean, var = marginal(sde, t, s)
    return -(x - mean) / var
  return score_fn


def moment_errors(x, mu=MU, s=S):
  """(max |mean error| / s, max |cov / s^2 - I|)."""
  x = np.asarray(x, np.float64)
  mean_err = np.abs(x.mean(0) - mu).max() / s
  cov_err = np.abs(np.cov(x.T) / s ** 2 - np.eye(2)).max()
  return mean_err, cov_err


# Tolerances: ~6 standard errors of the mean and ~5 of the covariance (sampling error plus the
# O(1/N) discretisation and Langevin biases). A wrong score scale (1.5 S) gives cov error ~1.25.
MEAN_TOL, COV_TOL = 0.1, 0.12


def run_pc(sde, predictor, corrector, snr=0.16, n_steps=1, probability_flow=False, denoise=True,
           score_fn=None, seed=0):
  sampler = sampling.get_pc_sampler(sde, (B, 2), predictor, corrector, lambda x: x, snr,
                                    n_steps=n_steps, probability_flow=probability_flow,
                                    denoise=denoise)
  score_fn = score_fn or gaussian_score(sde)
  x, nfe = jax.jit(sampler, static_argnums=1)(jax.random.PRNGKey(seed), score_fn)
  assert x.shape == (B, 2) and np.all(np.isfinite(x))
  return x, int(nfe)


PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'ancestral_sampling', 'none')
CORRECTORS = ('langevin', 'ald', 'none')
# Corrector-only ALD is excluded from the moment check: its step (snr sigma_t)^2 cannot mix once
# sigma_t << S (NCSN ran ~100 steps per level); test_corrector_keeps_marginal checks its maths.
FULL_GRID = [(s, p, c) for s in SDES for p in PREDICTORS for c in CORRECTORS
             if (p, c) not in (('none', 'none'), ('none', 'ald'))
             and not (p == 'ancestral_sampling' and s == 'subvp')]
# Every predictor/corrector pair once, cycling through the SDEs (the full grid is marked slow).
FAST_GRID = [('vp', 'euler_maruyama', 'langevin'), ('subvp', 'euler_maruyama', 'ald'),
             ('ve', 'euler_maruyama', 'none'), ('ve', 'reverse_diffusion', 'langevin'),
             ('vp', 'reverse_diffusion', 'ald'), ('subvp', 'reverse_diffusion', 'none'),
             ('vp', 'ancestral_sampling', 'langevin'), ('ve', 'ancestral_sampling', 'ald'),
             ('vp', 'ancestral_sampling', 'none'), ('subvp', 'none', 'langevin')]
SLOW_GRID = [g for g in FULL_GRID if g not in FAST_GRID]


def _check_pc(name, predictor, corrector):
  sde = SDES[name]()
  x, nfe = run_pc(sde, predictor, corrector)
  mean_err, cov_err = moment_errors(x)
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)
  assert nfe == N * ((predictor != 'none') + (corrector != 'none'))


@pytest.mark.parametrize('name,predictor,corrector', FAST_GRID)
def test_pc_sampler_recovers_gaussian(name, predictor, corrector):
  _check_pc(name, predictor, corrector)


@pytest.mark.slow
@pytest.mark.parametrize('name,predictor,corrector', SLOW_GRID)
def test_pc_sampler_recovers_gaussian_full_grid(name, predictor, corrector):
  _check_pc(name, predictor, corrector)


@pytest.mark.parametrize('name,predictor,corrector', [('vp', 'reverse_diffusion', 'none'),
                                                       ('ve', 'euler_maruyama', 'langevin')])
def test_probability_flow_predictor_recovers_gaussian(name, predictor, corrector):
  x, _ = run_pc(SDES[name](), predictor, corrector, probability_flow=True)
  mean_err, cov_err = moment_errors(x)
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)


def test_wrong_score_is_detected():
  """Power of the moment check: the score of N(MU, (1.5 S)^2 I) yields samples it rejects."""
  sde = SDES['vp']()
  x, _ = run_pc(sde, 'reverse_diffusion', 'none', score_fn=gaussian_score(sde, 1.5 * S))
  _, cov_err = moment_errors(x)
  assert cov_err > 5 * COV_TOL
  np.testing.assert_allclose(np.var(np.asarray(x), 0) / S ** 2, 2.25, rtol=0.12)


@pytest.mark.parametrize('corrector,name', [('langevin', 've'), ('ald', 'vp')])
def test_corrector_keeps_marginal(corrector, name):
  """Many corrector steps at a fixed t, started from p_t, leave p_t (nearly) invariant."""
  sde = SDES[name]()
  t = jnp.full((B,), 0.3)
  mean, var = marginal(sde, t)
  key0, key1 = jax.random.split(jax.random.PRNGKey(1))
  x0 = mean + jnp.sqrt(var) * jax.random.normal(key0, (B, 2))
  obj = sampling.get_corrector(corrector)(sde, gaussian_score(sde), 0.16, 200)
  x, _ = jax.jit(obj.update_fn)(key1, x0, t)
  mu_t, s_t = np.asarray(mean[0]), float(np.sqrt(var[0, 0]))
  mean_err, cov_err = moment_errors(x, mu_t, s_t)
  # Unadjusted Langevin inflates the variance by 1 / (1 - step / (2 var)) <= 1 / (1 - snr^2).
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)
  # ... and the chain moved: the result is not x0.
  assert float(jnp.mean(jnp.abs(x - x0))) > 0.1 * s_t


def test_denoise_returns_noise_free_mean():
  """denoise=False adds the last predictor noise back: the two differ, by a small amount."""
  sde = SDES['ve'](100)
  sampler_kw = dict(shape=(8, 2), predictor='reverse_diffusion', corrector='none',
                    inverse_scaler=lambda x: x, snr=0.16)
  score_fn = gaussian_score(sde)
  rng = jax.random.PRNGKey(3)
  run = lambda denoise: jax.jit(sampling.get_pc_sampler(sde, denoise=denoise, **sampler_kw),
                                static_argnums=1)(rng, score_fn)[0]
  x_mean, x = run(True), run(False)
  diff = float(jnp.max(jnp.abs(x - x_mean)))
  assert 0 < diff < 0.1


@pytest.mark.parametrize('kind,name,match', [
    ('predictor', 'heun', 'ancestral_sampling, euler_maruyama, none, reverse_diffusion'),
    ('corrector', 'hmc', 'ald, langevin, none'),
    ('sampler', 'ddim', 'pc, ode'),
])
def test_unknown_names_raise_one_line(kind, name, match):
  config = base_config.get_base_config()
  config.sampling.method = name if kind == 'sampler' else 'pc'
  if kind == 'predictor':
    config.sampling.predictor = name
  if kind == 'corrector':
    config.sampling.corrector = name
  sde = SDES['vp']()
  with pytest.raises(ValueError) as info:
    sampling.get_sampling_fn(config, sde, None, (4, 2), lambda x: x, 1e-3)
  msg = str(info.value)
  assert '\n' not in msg and name in msg and match in msg


def test_unsupported_combinations_raise():
  with pytest.raises(ValueError, match='VPSDE and VESDE'):
    sampling.get_pc_sampler(SDES['subvp'](), (4, 2), 'ancestral_sampling', 'none',
                            lambda x: x, 0.16)
  with pytest.raises(ValueError, match='probability_flow'):
    sampling.get_pc_sampler(SDES['vp'](), (4, 2), 'ancestral_sampling', 'none',
                            lambda x: x, 0.16, probability_flow=True)
  with pytest.raises(ValueError, match='score_fn'):
    sampling.get_pc_sampler(SDES['vp'](), (4, 2), 'none', 'langevin', lambda x: x, 0.16)(
        jax.random.PRNGKey(0), 'not a score')


@pytest.mark.parametrize('sde_name,continuous,method', [
    ('vpsde', False, 'pc'), ('vpsde', False, 'ode'),
    pytest.param('vesde', True, 'pc', marks=pytest.mark.slow)])
def test_model_sampling_fn_matches_plain_score_route(sde_name, continuous, method):
  """get_sampling_fn(rng, params, state) == the plain-score sampler on get_score_fn's score
  (the ODE labels a discrete VP model as continuous, as score_sde)."""
  from configs.toy.common import get_toy_config
  from models import utils as mutils
  config = get_toy_config('CHECKERBOARD', 2, sde=sde_name)
  config.training.continuous = continuous
  config.model.encoder_layers, config.model.decoder_layers = (16,), (16,)
  config.model.temb_dim, config.model.num_scales = 8, 50  # VP: N > beta_max
  config.sampling.method, config.sampling.predictor = method, 'reverse_diffusion'
  config.sampling.smallest_time = 1e-3
  sde, eps = sde_lib.get_sde(config)
  model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
  shape = (16, 2)
  rng = jax.random.PRNGKey(5)
  x, nfe = sampling.get_sampling_fn(config, sde, model, shape, lambda x: 2 * x, eps)(
      rng, params, states)
  score_fn = mutils.get_score_fn(sde, model, params, states,
                                 continuous=continuous or method == 'ode')
  x_ref, nfe_ref = sampling.get_score_sampling_fn(config, sde, shape, lambda x: 2 * x, eps)(
      rng, score_fn)
  assert x.shape == shape and np.all(np.isfinite(x)) and int(nfe) == int(nfe_ref)
  if method == 'pc':
    assert int(nfe) == 2 * 50
  np.testing.assert_allclose(x, x_ref, rtol=1e-5, atol=1e-5)


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import sampling, sampling_test as st
assert jax.device_count() == 2
sde = st.SDES['vp'](50)
sampler = sampling.get_pc_sampler(sde, (64, 2), 'reverse_diffusion', 'langevin', lambda x: x, 0.16)
mesh = Mesh(np.array(jax.devices()), ('batch',))
sharded = jax.jit(sampler, static_argnums=1, out_shardings=(NamedSharding(mesh, P('batch')), None))
x, _ = sharded(jax.random.PRNGKey(0), st.gaussian_score(sde))
assert len(x.sharding.device_set) == 2, x.sharding
ref, _ = jax.jit(sampler, static_argnums=1)(jax.random.PRNGKey(0), st.gaussian_score(sde))
np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=1e-4, atol=1e-4)
print('OK')
"""


@pytest.mark.slow
def test_batch_sharded_over_two_devices_matches_one():
  """The caller may shard the batch (jit with shardings): same samples as on one device."""
  from harness import run_main
  out = run_main([], {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
                    'JAX_PLATFORMS': 'cpu'}, timeout=300, program=_SHARDED_SCRIPT)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-2000:]


TOL = 1e-5  # ODE tolerances (the config default): global errors ~5e-5 S, tested to 1e-3


def analytic_flow(sde, z, t_from, t_to):
  """The probability-flow map of Gaussian data is affine: standardise at t_from, rescale at t_to."""
  ones = lambda t: jnp.full((z.shape[0],), t)
  m0, v0 = marginal(sde, ones(t_from))
  m1, v1 = marginal(sde, ones(t_to))
  return m1 + jnp.sqrt(v1 / v0) * (z - m0)


@pytest.mark.parametrize('name', list(SDES))
def test_ode_sampler_is_the_exact_gaussian_flow(name):
  """From a prior sample z the ODE sampler lands on the analytic flow of z (hence N(MU, S^2 I)),
  deterministically: the rng only draws z."""
  sde = SDES[name]()
  eps = 1e-3
  sampler = jax.jit(sampling.get_ode_sampler(sde, (B, 2), lambda x: x, rtol=TOL, atol=TOL,
                                             eps=eps), static_argnums=1)
  score_fn = gaussian_score(sde)
  x, nfe = sampler(jax.random.PRNGKey(0), score_fn)
  z = sde.prior_sampling(jax.random.split(jax.random.PRNGKey(0))[1], (B, 2))
  np.testing.assert_allclose(x, analytic_flow(sde, z, sde.T, eps), atol=1e-3 * S)
  mean_err, cov_err = moment_errors(x)
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)
  assert 10 < int(nfe) < 2000
  x_z, _ = sampler(jax.random.PRNGKey(123), score_fn, z)
  np.testing.assert_array_equal(sampler(jax.random.PRNGKey(7), score_fn, z)[0], x_z)
  np.testing.assert_allclose(x_z, x, rtol=1e-5, atol=1e-6)  # another program: ulp differences


@pytest.mark.parametrize('name', ['vp', 've'])
def test_ode_encoder_inverts_the_sampler(name):
  sde = SDES[name]()
  eps = 1e-3
  shape = (256, 2)
  score_fn = gaussian_score(sde)
  sampler = sampling.get_ode_sampler(sde, shape, lambda x: x, rtol=TOL, atol=TOL, eps=eps)
  encoder = sampling.get_ode_encoder(sde, shape, rtol=TOL, atol=TOL, eps=eps)

  @jax.jit
  def roundtrip(z):
    x, _ = sampler(jax.random.PRNGKey(0), score_fn, z)
    return x, encoder(x, score_fn)[0]

  z = sde.prior_sampling(jax.random.PRNGKey(4), shape)
  x, z_back = roundtrip(z)
  assert float(jnp.max(jnp.abs(x - z))) > 0.1 * S  # the flow moved the points
  np.testing.assert_allclose(z_back, z, atol=1e-3 * sde.prior_std())


def test_ode_denoise_and_config_route():
  """config.sampling.method = 'ode' builds the ODE sampler; noise_removal adds one score call
  that moves x by std(eps)^2 * score (VE: the reverse-diffusion step to sigma = 0)."""
  config = base_config.get_base_config()
  config.sampling.method = 'ode'
  sde = SDES['ve']()
  eps = 1e-3
  shape = (64, 2)
  score_fn = gaussian_score(sde)
  rng = jax.random.PRNGKey(2)
  config.sampling.noise_removal = False
  x, nfe = sampling.get_score_sampling_fn(config, sde, shape, lambda x: x, eps)(rng, score_fn)
  config.sampling.noise_removal = True
  x_d, nfe_d = sampling.get_score_sampling_fn(config, sde, shape, lambda x: x, eps)(rng, score_fn)
  assert int(nfe_d) == int(nfe) + 1
  sigma = float(sde.discrete_sigmas[0])
  np.testing.assert_allclose(x_d, x + sigma ** 2 * score_fn(x, jnp.full((64,), eps)), atol=1e-6)
