"""Log-likelihoods (bits/dim, nats) by the probability-flow ODE, as score_sde / score_flow.

log p_eps(x) = log p_T(z) + int_eps^T div f~(x_t, t) dt, with x_t the probability-flow ODE
dx/dt = f~(x, t) = f(x, t) - g(t)^2 / 2 * score(x, t) from x_eps = x to z = x_T.
The divergence is the Hutchinson-Skilling estimate v^T (df~/dx) v with one probe v (Rademacher
or Gaussian) fixed over the whole solve (one forward-mode jvp that also yields f~), or, for
low-dimensional data, the exact divergence (one jvp per dimension).

Two routes for the same integral:
- method='jax': the jitted Dormand-Prince solver of ode_solver.py (scipy's RK45 algorithm),
  the whole solve one XLA program; jit-compatible with a batch sharded over devices (the step
  size is shared by the whole batch, as in the originals, whose scipy state was the whole batch).
- method='scipy': the originals' route, `scipy.integrate.solve_ivp(method='RK45')` on the host
  calling a jitted drift-and-divergence function; a cross-check (not traceable).

bits/dim: nll / (dim ln 2), plus log2(d inverse_scaler / dx) + 8 for 8-bit images whose
inverse scaler maps the model's data range back to [0, 1] (as score_flow); flat toy data get
no offset (data_is_images=False), and `nll` in nats is returned as well on request.
"""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

import divergence
import ode_solver
from models import utils as mutils

EXACT_DIV_MAX_DIM = 16  # exact divergence unrolls one jvp per dimension
EXACT_DIV_AUTO_DIM = 2  # configs of data up to this dim (the toys) always use the exact divergence


def use_exact_div(config):
  """Whether evaluation from a config takes the exact divergence: data of dim <= 2 (toy.py's
  likelihoods were exact; a one-probe Hutchinson estimate would only add noise there)."""
  return int(np.prod(mutils.get_data_shape(config))) <= EXACT_DIV_AUTO_DIM


METHODS = ('jax', 'scipy')


def _check_method(method):
  method = str(method).lower()
  if method not in METHODS:
    raise ValueError(f"Unknown likelihood solver '{method}': use 'jax' (jitted Dormand-Prince) "
                     "or 'scipy' (solve_ivp RK45 on the host).")
  return method


def _check_exact_div(exact_div, shape):
  dim = int(np.prod(shape[1:]))
  if exact_div and dim > EXACT_DIV_MAX_DIM:
    raise ValueError(f'exact_div=True needs data dim <= {EXACT_DIV_MAX_DIM} (one jvp per '
                     f'dimension), got {dim}: use the Hutchinson estimator (exact_div=False).')


def get_drift_div_fn(sde, score_fn, exact_div=False):
  """(x, t, probe) -> (drift, div drift) of the probability-flow ODE; probe unused if exact."""
  rsde = sde.reverse(score_fn, probability_flow=True)
  drift_fn = lambda x, t: rsde.sde(x, t)[0]
  if exact_div:
    value_div_fn = divergence.get_exact_value_div_fn(drift_fn)
    return lambda x, t, probe: value_div_fn(x, t)
  return divergence.get_value_div_fn(drift_fn)


def num_bits(config):
  """Bits per pixel of image data: config.data.num_bits (default 8, score_flow's 8-bit images)."""
  return int(config.data.get('num_bits', 8))


def dequantize(images, noise, bits=8):
  """b-bit images k / (2^b - 1) in [0, 1] moved by noise in [0, 1) into bin k of width 2^-b:
  (images * (2^b - 1) + noise) / 2^b (score_flow's (x * 255 + u) / 256 for b = 8)."""
  return (images * (2. ** bits - 1.) + noise) / 2. ** bits


def bpd_offset(inverse_scaler=None, data_is_images=True, bits=8):
  """log2(d inverse_scaler / dx) + b for b-bit images (score_flow's conversion), else 0."""
  if not data_is_images:
    return 0.
  if inverse_scaler is None:
    raise ValueError('bits/dim of images need the inverse data scaler: pass inverse_scaler, or '
                     'data_is_images=False for flat (non-image) data.')
  return jnp.log2(jax.grad(lambda x: jnp.sum(inverse_scaler(x)))(0.)) + float(bits)


def nll_to_bpd(nll, shape, inverse_scaler=None, data_is_images=True, bits=8):
  """Per-example nats -> bits/dim for data of shape (B, ...) (b-bit images)."""
  dim = int(np.prod(shape[1:]))
  return nll / (dim * np.log(2.)) + bpd_offset(inverse_scaler, data_is_images, bits)


def _probe(rng, shape, hutchinson_type, exact_div):
  if exact_div:
    return jnp.zeros(shape)
  return divergence.get_hutchinson_noise(rng, shape, hutchinson_type)


def _solve_jax(drift_div_fn, data, probe, sde, rtol, atol, eps, max_steps):
  batch = data.shape[0]

  def ode_fn(t, state):
    x, _ = state
    drift, div = drift_div_fn(x, jnp.full((batch,), t, x.dtype), probe)
    return drift, div.astype(x.dtype)

  (z, delta_logp), nfe = ode_solver.solve(ode_fn, (data, jnp.zeros((batch,), data.dtype)), eps,
                                          sde.T, rtol=rtol, atol=atol, max_steps=max_steps)
  return z, delta_logp, nfe


def _solve_scipy(jitted_drift_div, data, probe, sde, rtol, atol, eps):
  """The originals' route: solve_ivp RK45 on the flattened float64 state [x, delta_logp]."""
  shape, batch = data.shape, data.shape[0]
  n = int(np.prod(shape))
  dtype = data.dtype

  def ode_func(t, y):
    x = jnp.asarray(y[:n].reshape(shape), dtype)
    drift, div = jitted_drift_div(x, jnp.full((batch,), t, dtype), probe)
    return np.concatenate([np.asarray(drift, np.float64).ravel(), np.asarray(div, np.float64)])

  init = np.concatenate([np.asarray(data, np.float64).ravel(), np.zeros(batch)])
  sol = scipy.integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol,
                                  method='RK45')
  if not sol.success:
    raise RuntimeError(f'solve_ivp failed: {sol.message}')
  z = jnp.asarray(sol.y[:n, -1].reshape(shape), dtype)
  return z, jnp.asarray(sol.y[n:, -1], dtype), sol.nfev


def ode_likelihood(rng, score_fn, data, sde, hutchinson_type='Rademacher', rtol=1e-5, atol=1e-5,
                   eps=1e-5, exact_div=False, method='jax', max_steps=4096):
  """Negative log-likelihood (nats) of data (B, ...) under the probability-flow ODE of score_fn.

  Args:
    rng: key for the Hutchinson probe (fixed over the solve; unused with exact_div).
    score_fn: score_fn(x, t) with t of shape (B,).
    data: (B, ...) in the model's data space.
    sde: the forward SDE (sde_lib).
    hutchinson_type: 'Rademacher' or 'Gaussian'.
    rtol, atol: ODE tolerances; eps: start time of the integration (the ODE is integrated from
      eps to T: the density is that of x_eps, i.e. the data smoothed by the tiny p_0eps kernel).
    exact_div: exact divergence (data dim <= EXACT_DIV_MAX_DIM) instead of Hutchinson.
    method: 'jax' (traceable; jit it) or 'scipy' (host solve_ivp; not traceable).
    max_steps: cap on attempted steps for 'jax' (a failed solve returns NaN).

  Returns:
    nll (B,), the latent z = x_T (data's shape), nfe (number of drift-and-divergence calls).
  """
  method = _check_method(method)
  _check_exact_div(exact_div, data.shape)
  _, step_rng = jax.random.split(rng)
  probe = _probe(step_rng, data.shape, hutchinson_type, exact_div)
  drift_div_fn = get_drift_div_fn(sde, score_fn, exact_div)
  if method == 'jax':
    z, delta_logp, nfe = _solve_jax(drift_div_fn, data, probe, sde, rtol, atol, eps, max_steps)
  else:
    z, delta_logp, nfe = _solve_scipy(jax.jit(drift_div_fn), data, probe, sde, rtol, atol, eps)
  nll = -(sde.prior_logp(z) + delta_logp)
  return nll, z, nfe


def get_likelihood_fn(sde, model, inverse_scaler, hutchinson_type='Rademacher', rtol=1e-5,
                      atol=1e-5, method='jax', eps=1e-5, exact_div=False, data_is_images=True,
                      return_nll=False, max_steps=4096, bits=8):
  """score_flow's get_likelihood_fn for a flax model (score by models.utils.get_score_fn with
  train=False, continuous=True, as the originals).

  Returns:
    likelihood_fn(rng, params, model_state, data) -> (bpd (B,), z, nfe), plus nll (B,) in nats
    when return_nll. With method='jax' it is jitted (shard `data` over devices on its batch
    axis to run data-parallel); with method='scipy' it runs solve_ivp on the host.
  """
  method = _check_method(method)
  if data_is_images and inverse_scaler is None:
    bpd_offset(None, True)  # raises the ValueError

  def score_fn_of(params, model_state):
    return mutils.get_score_fn(sde, model, params, model_state, train=False, continuous=True)

  def finish(nll, z, nfe, shape):
    bpd = nll_to_bpd(nll, shape, inverse_scaler, data_is_images, bits)
    return (bpd, z, nfe, nll) if return_nll else (bpd, z, nfe)

  if method == 'jax':
    @jax.jit
    def likelihood_fn(rng, params, model_state, data):
      nll, z, nfe = ode_likelihood(rng, score_fn_of(params, model_state), data, sde,
                                   hutchinson_type, rtol, atol, eps, exact_div, 'jax', max_steps)
      return finish(nll, z, nfe, data.shape)
    return likelihood_fn

  @jax.jit
  def drift_div(params, model_state, x, t, probe):
    return get_drift_div_fn(sde, score_fn_of(params, model_state), exact_div)(x, t, probe)

  def scipy_likelihood_fn(rng, params, model_state, data):
    _check_exact_div(exact_div, data.shape)
    _, step_rng = jax.random.split(rng)
    probe = _probe(step_rng, data.shape, hutchinson_type, exact_div)
    fn = lambda x, t, probe: drift_div(params, model_state, x, t, probe)
    z, delta_logp, nfe = _solve_scipy(fn, data, probe, sde, rtol, atol, eps)
    nll = -(sde.prior_logp(z) + delta_logp)
    return finish(nll, z, nfe, data.shape)

  return scipy_likelihood_fn
