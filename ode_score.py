"""The score of the probability-flow ODE's own density against the network score.

mle_score_ode (`eval_scorenet.py`) measured how far the ScoreODE's density p_t^ODE is from the
one the score model s_theta believes in. The ODE dx/dt = h(x, t) = f(x, t) - g(t)^2 / 2 s_theta
moves its density by d/dt log p_t(x(t)) = -div h, so its score s(t) = grad log p_t^ODE(x(t))
obeys, along a trajectory,
  ds/dt = -grad_x div h(x, t) - J_h(x, t)^T s.
As the original: integrate x from eps (data) to T, start s_T = grad log p_T(x_T) (the prior's
score: -x / sigma_max^2 for VE, -x for VP/sub-VP), integrate (x, s) back from T to eps together
and read both at nt times uniform in [eps, T]. The two terms of ds/dt come from one reverse-mode
pass, grad_x [<v, J_h v> + <h, stop_grad(s)>], with the Hutchinson probe v (Rademacher or
Gaussian, fixed over both solves) or, for low-dimensional data, the exact divergence (a sum over
the basis vectors). The solves are ode_solver.solve (scipy's RK45, jitted); the state of the
backward solve is (x, s), so its step control sees both, as the original's flat solve_ivp state.

Diagnostics at each time t_k (batch means; |.|^2 sums over all dims of an example, *not*
normalised per dimension, as the original; g = diffusion of the SDE; std = std of the
perturbation kernel p_0t, so s_normal = -x / std^2 is the score of p_t for data at the origin):
  gap                 g^2 |s_ode - s_theta|^2        (original: s_with_odes)
  score_vs_normal     g^2 |s_theta - s_normal|^2     (s_with_normals)
  ode_vs_normal       g^2 |s_ode - s_normal|^2       (ode_with_normals)
  div_vs_normal       g^2 (div s_theta + dim / std^2)^2          (s_div_with_normals)
  grad_div_vs_normal  g^2 |grad_x div s_theta|^2     (s_grad_div_with_normals; the normal's is 0)
div s_theta and its gradient use the same probe (or the exact divergence) as the solve.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

import divergence
import likelihood
import ode_solver
import parallel
from models import utils as mutils

EXACT_DIV_MAX_DIM = 16  # exact divergence unrolls one jvp per dimension (as likelihood.py)
DEFAULT_NT = 100  # the original's NUM_TIMEPOINTS
DIAGNOSTICS = ('gap', 'score_vs_normal', 'ode_vs_normal', 'div_vs_normal', 'grad_div_vs_normal')


def _check_args(shape, nt, eps, sde, hutchinson_type, exact_div):
  if int(nt) != nt or nt < 2:
    raise ValueError(f'ode_score: nt={nt}; pass an integer number of time points >= 2.')
  if not 0 < eps < sde.T:
    raise ValueError(f'ode_score: eps={eps} must lie in (0, T={sde.T}); pass e.g. eps=1e-5.')
  if len(shape) < 2:
    raise ValueError(f'ode_score: data of shape {shape}; pass a batch (B, ...) of examples.')
  dim = int(np.prod(shape[1:]))
  if exact_div and dim > EXACT_DIV_MAX_DIM:
    raise ValueError(f'ode_score: exact_div=True needs data dim <= {EXACT_DIV_MAX_DIM}, got '
                     f'{dim}: use the Hutchinson estimator (exact_div=False).')
  if not exact_div and str(hutchinson_type).lower() not in ('rademacher', 'gaussian'):
    raise ValueError(f"Unknown Hutchinson noise '{hutchinson_type}': use 'Rademacher' or "
                     "'Gaussian'.")


def _probes(rng, x, hutchinson_type, exact_div):
  """The probe vectors whose <v, J v> sum to the divergence estimate: the basis, or one v."""
  if exact_div:
    flat = jnp.zeros((x.shape[0], int(np.prod(x.shape[1:]))), x.dtype)
    return [flat.at[:, i].set(1.).reshape(x.shape) for i in range(flat.shape[1])]
  return [divergence.get_hutchinson_noise(rng, x.shape, hutchinson_type).astype(x.dtype)]


def value_div_grad(fn, x, probes, cotangent=None):
  """(fn(x), div estimate (B,), grad_x [div + <fn(x), stop_grad(cotangent)>]) in one pass.

  div = sum over probes of <v, J_fn v> per example (exact for the basis, Hutchinson for one
  random v); examples must not interact inside fn, so the grad of the batch sum is per example.
  """
  def scalar(x):
    value, div = None, 0.
    for v in probes:
      out, jv = jax.jvp(fn, (x,), (v,))
      value = out if value is None else value
      div = div + divergence.batch_sum(jv * v)
    total = jnp.sum(div)
    if cotangent is not None:
      total = total + jnp.sum(value * jax.lax.stop_gradient(cotangent))
    return total, (value, div)

  grad, (value, div) = jax.grad(scalar, has_aux=True)(x)
  return value, div, grad


def get_ode_drift_fn(sde, score_fn):
  """h(x, t) = f(x, t) - g(t)^2 / 2 score(x, t), t a scalar."""
  rsde = sde.reverse(score_fn, probability_flow=True)
  return lambda x, t: rsde.sde(x, jnp.full((x.shape[0],), t, x.dtype))[0]


def get_score_dynamics_fn(sde, score_fn, probes):
  """(t, (x, s)) -> (h, -grad div h - J_h^T s): the backward ODE of the ODE score."""
  drift_fn = get_ode_drift_fn(sde, score_fn)

  def dynamics(t, state):
    x, s = state
    h, _, grad = value_div_grad(lambda y: drift_fn(y, t), x, probes, cotangent=s)
    return h, -grad
  return dynamics


def ode_score_gap(rng, score_fn, data, sde, nt=DEFAULT_NT, eps=1e-5, rtol=1e-5, atol=1e-5,
                  hutchinson_type='Rademacher', exact_div=False, max_steps=4096,
                  return_trajectory=False):
  """The ODE score along the probability-flow trajectories of `data`, and its diagnostics.

  Args:
    rng: key for the Hutchinson probe (fixed over both solves; unused with exact_div).
    score_fn: score_fn(x, t) with t of shape (B,) (the model score s_theta).
    data: (B, ...) in the model's data space (flat or images); the trajectory starts at t = eps.
    sde: the forward SDE (sde_lib).
    nt: number of times, uniform in [eps, T] (both ends included).
    eps, rtol, atol, max_steps: integration range start and ode_solver.solve settings.
    hutchinson_type: 'Rademacher' or 'Gaussian'; exact_div: sum over the basis instead
      (data dim <= EXACT_DIV_MAX_DIM).
    return_trajectory: also return 'x' and 's_ode', 's_model' (nt, B, ...) and 'nfe' (2,)
      (forward, backward solves).

  Returns:
    dict of (nt,) arrays: 'ts' and the DIAGNOSTICS of the module docstring (batch means,
    unnormalised sums over dimensions). A failed solve gives NaN.
  """
  _check_args(data.shape, nt, eps, sde, hutchinson_type, exact_div)
  probes, x_T, s_T, ts, nfe_fwd = _start(rng, score_fn, data, sde, nt, eps, rtol, atol,
                                         hutchinson_type, exact_div, max_steps)
  (xs, s_odes), nfe_bwd = ode_solver.solve(get_score_dynamics_fn(sde, score_fn, probes),
                                           (x_T, s_T), sde.T, eps, rtol=rtol, atol=atol,
                                           max_steps=max_steps, save_ts=ts[::-1])
  xs, s_odes = xs[::-1], s_odes[::-1]
  result, scores = jax.lax.map(
    lambda args: _diagnostics(score_fn, sde, probes, *args), (ts, xs, s_odes))
  return _finish(result, scores, ts, xs, s_odes, nfe_fwd, nfe_bwd, return_trajectory)


def _start(rng, score_fn, data, sde, nt, eps, rtol, atol, hutchinson_type, exact_div, max_steps):
  """(probes, x_T, s_T, ts, nfe): the forward solve from eps to T and the prior's score there."""
  dtype = data.dtype if jnp.issubdtype(data.dtype, jnp.floating) else jnp.float32
  data = jnp.asarray(data, dtype)
  _, step_rng = jax.random.split(rng)
  probes = _probes(step_rng, data, hutchinson_type, exact_div)
  drift_fn = get_ode_drift_fn(sde, score_fn)
  x_T, nfe_fwd = ode_solver.solve(lambda t, x: drift_fn(x, t), data, eps, sde.T, rtol=rtol,
                                  atol=atol, max_steps=max_steps)
  s_T = jax.grad(lambda z: jnp.sum(sde.prior_logp(z)))(x_T).astype(dtype)
  ts = jnp.linspace(eps, sde.T, nt, dtype=dtype).at[0].set(eps).at[-1].set(sde.T)
  return probes, x_T, s_T, ts, nfe_fwd


def _diagnostics(score_fn, sde, probes, t, x, s_ode):
  """(DIAGNOSTICS at time t as batch means, s_theta(x, t))."""
  batch = x.shape[0]
  dim = int(np.prod(x.shape[1:]))
  vec_t = jnp.full((batch,), t, x.dtype)
  score, div, grad_div = value_div_grad(lambda y: score_fn(y, vec_t), x, probes)
  g2 = sde.sde(x, vec_t)[1] ** 2
  std2 = sde.marginal_prob(jnp.zeros_like(x), vec_t)[1] ** 2
  s_normal = -divergence.batch_mul(1. / std2, x)
  sq = lambda a: divergence.batch_sum(jnp.square(a))
  out = dict(gap=sq(s_ode - score), score_vs_normal=sq(score - s_normal),
             ode_vs_normal=sq(s_ode - s_normal), div_vs_normal=jnp.square(div + dim / std2),
             grad_div_vs_normal=sq(grad_div))
  return {k: jnp.mean(g2 * v) for k, v in out.items()}, score


def _finish(result, scores, ts, xs, s_odes, nfe_fwd, nfe_bwd, return_trajectory):
  result = dict(result, ts=ts)
  if return_trajectory:
    result.update(x=xs, s_ode=s_odes, s_model=scores, nfe=jnp.stack([nfe_fwd, nfe_bwd]))
  return result


def get_ode_score_fn(sde, model, nt=DEFAULT_NT, eps=1e-5, rtol=1e-5, atol=1e-5,
                     hutchinson_type='Rademacher', exact_div=False, continuous=True,
                     max_steps=4096):
  """ode_score_fn(rng, params, model_state, data) -> dict of (nt,) arrays.

  s_theta = models.utils.get_score_fn(sde, model, params, model_state, train=False,
  continuous=continuous); data are scaled model-space data (B, ...). See ode_score_gap. One
  jitted program, or where parallel.loops_unrolled() (the backward solve and the diagnostics
  differentiate the network) the backward solve's steps and the nt diagnostics as Python loops
  over jitted calls (ode_solver.get_host_solver): the same steps and values.
  """
  if not exact_div and str(hutchinson_type).lower() not in ('rademacher', 'gaussian'):
    raise ValueError(f"Unknown Hutchinson noise '{hutchinson_type}': use 'Rademacher' or "
                     "'Gaussian'.")
  settings = dict(nt=nt, eps=eps, rtol=rtol, atol=atol, hutchinson_type=hutchinson_type,
                  exact_div=exact_div, max_steps=max_steps)

  def score_of(params, model_state):
    return mutils.get_score_fn(sde, model, params, model_state, train=False,
                               continuous=continuous)

  if not parallel.loops_unrolled():
    @jax.jit
    def ode_score_fn(rng, params, model_state, data):
      return ode_score_gap(rng, score_of(params, model_state), data, sde, **settings)
    return ode_score_fn

  start = jax.jit(lambda rng, params, model_state, data: _start(
    rng, score_of(params, model_state), data, sde, nt, eps, rtol, atol, hutchinson_type,
    exact_div, max_steps))
  backward = ode_solver.get_host_solver(
    lambda t, state, args: get_score_dynamics_fn(sde, score_of(*args[:2]), args[2])(t, state),
    rtol, atol, max_steps)
  diagnostics = jax.jit(lambda params, model_state, probes, t, x, s_ode: _diagnostics(
    score_of(params, model_state), sde, probes, t, x, s_ode))
  finish = jax.jit(lambda rows, *args: _finish(
    *jax.tree_util.tree_map(lambda *r: jnp.stack(r), *rows), *args, return_trajectory=False))

  def host_ode_score_fn(rng, params, model_state, data):
    _check_args(data.shape, nt, eps, sde, hutchinson_type, exact_div)
    probes, x_T, s_T, ts, nfe_fwd = start(rng, params, model_state, data)
    (xs, s_odes), nfe_bwd = backward((x_T, s_T), sde.T, eps, (params, model_state, probes),
                                     save_ts=ts[::-1])
    xs, s_odes = xs[::-1], s_odes[::-1]
    rows = [diagnostics(params, model_state, probes, ts[k], xs[k], s_odes[k]) for k in range(nt)]
    return finish(rows, ts, xs, s_odes, nfe_fwd, nfe_bwd)
  return host_ode_score_fn


def ode_score_kwargs_from_config(config):
  """get_ode_score_fn's keyword arguments from a config: config.eval.ode_score_nt, rtol, atol,
  hutchinson_type; eps = config.training.smallest_time; continuous = config.training.continuous;
  the exact divergence for data of dim <= 2 (likelihood.use_exact_div)."""
  return dict(nt=int(config.eval.ode_score_nt), eps=float(config.training.smallest_time),
              rtol=float(config.eval.rtol), atol=float(config.eval.atol),
              hutchinson_type=config.eval.hutchinson_type, exact_div=likelihood.use_exact_div(config),
              continuous=bool(config.training.get('continuous', True)))


def get_ode_score_fn_from_config(config, sde, model):
  """get_ode_score_fn with the settings of ode_score_kwargs_from_config(config)."""
  return get_ode_score_fn(sde, model, **ode_score_kwargs_from_config(config))


def plot_gap(results, path, key='gap', title=None):
  """PNG of results[label][key] against results[label]['ts'] (log y), one line per run.

  results: {label: dict with 'ts' and key (nt,)}, e.g. {'order 1': ..., 'order 3': ...}.
  Non-positive or non-finite values are left out of the log plot.
  """
  from matplotlib.figure import Figure
  if not results:
    raise ValueError('plot_gap: results is empty; pass {label: ode_score result dict}.')
  fig = Figure(figsize=(6, 4), dpi=120)
  ax = fig.add_subplot(1, 1, 1)
  for label, res in results.items():
    if 'ts' not in res or key not in res:
      raise ValueError(f"plot_gap: results['{label}'] lacks 'ts' or '{key}'; pass the dicts "
                       'returned by ode_score_gap / get_ode_score_fn.')
    ts, ys = np.asarray(res['ts'], np.float64), np.asarray(res[key], np.float64)
    ok = np.isfinite(ys) & (ys > 0)
    ax.plot(ts[ok], ys[ok], marker='.', label=str(label))
  ax.set_yscale('log')
  ax.set_xlabel('t')
  ax.set_ylabel(r'$g(t)^2\,E|s^{ODE}_t - s_\theta|^2$' if key == 'gap' else key)
  ax.set_title(title or 'ScoreODE score vs model score')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fig.savefig(path, format='png')
  return path
