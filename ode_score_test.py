"""ode_score against independent truth.

- Gaussian data N(0, S0^2 I) with the exact marginal score as the model: the ODE drift is linear,
  h = a(t) x, so the ODE score is s(t) = c(t) x(t) with c' = -2 a c; with v_t the marginal
  variance, c(t) = -(v_T / prior_var) / v_t (the exact score up to the p_T vs prior mismatch,
  which the ODE carries back unchanged). The other diagnostics are closed forms of x(t).
- A perturbed 1-D model: the ODE score by brute force, the change of variables
  log p_t(x) = log p_T(x_T) + int_t^T div h, solved by scipy in float64 from x +- delta at each
  saved time, and central differences.
- The backward drift against explicit Jacobians and third-derivative tensors (jax.jacfwd).
- Image-shaped data through a flax model and the config route; the plot.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import flax.linen as nn
import ode_score
import parallel
import sde_lib
from configs import base_config

SDES = {'ve': lambda: sde_lib.VESDE(0.01, 50., 1000), 'vp': lambda: sde_lib.VPSDE(0.1, 20., 1000)}
S0 = {'ve': 1.0, 'vp': 0.5}


def marginal_var(sde, t, s0):
  """Variance of p_t for data N(0, s0^2 I) (v' = g^2 + 2 f-coefficient v, as the SDE)."""
  a, b = sde.marginal_prob(jnp.ones((t.shape[0], 1), t.dtype), t)
  return a[:, 0] ** 2 * s0 ** 2 + b ** 2


def gaussian_score(sde, s0):
  return lambda x, t: -x / marginal_var(sde, t, s0).reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize('sde_name,shape,kind', [('ve', (3,), 'Rademacher'),
                                                 ('vp', (2, 2, 1), 'Gaussian'),
                                                 ('vp', (2,), 'exact')])
def test_gaussian_exact_score_gives_no_gap(sde_name, shape, kind):
  with jax.enable_x64(True):
    sde, s0 = SDES[sde_name](), S0[sde_name]
    x0 = s0 * jax.random.normal(jax.random.PRNGKey(0), (4,) + shape, jnp.float64)
    fn = jax.jit(lambda rng, x: ode_score.ode_score_gap(
      rng, gaussian_score(sde, s0), x, sde, nt=6, rtol=1e-8, atol=1e-8,
      hutchinson_type=kind if kind != 'exact' else 'Rademacher', exact_div=kind == 'exact',
      return_trajectory=True))
    out = fn(jax.random.PRNGKey(1), x0)
    out = {k: np.asarray(v) for k, v in out.items()}
    ts = out['ts']
    np.testing.assert_allclose(ts, np.linspace(1e-5, 1., 6), rtol=1e-12)
    v = np.asarray(marginal_var(sde, jnp.asarray(ts), s0))
    v_T = float(marginal_var(sde, jnp.ones(1), s0)[0])
    expand = lambda a: a.reshape((-1,) + (1,) * (len(shape) + 1))
    x = out['x']
    # The trajectory is the exact linear flow x(t) = sqrt(v_t / v_eps) x(eps).
    np.testing.assert_allclose(x, np.asarray(x0)[None] * np.sqrt(expand(v / v[0])), rtol=1e-6)
    s_pred = -x * v_T / sde.prior_std() ** 2 / expand(v)
    np.testing.assert_allclose(out['s_ode'], s_pred, rtol=2e-6)
    np.testing.assert_allclose(out['s_model'], -x / expand(v), rtol=1e-12)

    g2 = np.asarray(sde.sde(jnp.zeros((6, 1)), jnp.asarray(ts))[1]) ** 2
    sq = lambda a: np.sum(a.reshape(a.shape[:2] + (-1,)) ** 2, -1)
    scale = g2 * np.mean(sq(out['s_model']), -1)
    assert np.all(out['gap'] <= 1e-6 * scale), out['gap'] / scale
    std2 = np.asarray(sde.marginal_prob(jnp.zeros((6, 1)), jnp.asarray(ts))[1]) ** 2
    dim = int(np.prod(shape))
    w = (1. / v - 1. / std2) ** 2
    np.testing.assert_allclose(out['score_vs_normal'], g2 * w * np.mean(sq(x), -1), rtol=1e-9)
    # s_ode - s_normal cancels where both are ~ -x: compare on the scale of g^2 |s|^2.
    ode_vs_normal = g2 * np.mean(sq(s_pred + x / expand(std2)), -1)
    assert np.all(np.abs(out['ode_vs_normal'] - ode_vs_normal) <= 1e-5 * (scale + ode_vs_normal))
    assert np.all(out['grad_div_vs_normal'] == 0.)
    if kind != 'Gaussian':  # Rademacher / exact: <v, -I/v_t v> = -dim / v_t exactly
      np.testing.assert_allclose(out['div_vs_normal'], g2 * dim ** 2 * w, rtol=1e-9)
    assert 100 < int(out['nfe'][0]) and 100 < int(out['nfe'][1])


C, W = 0.3, 2.


def perturbed_score(sde):
  """Exact score of N(0, 1) plus a smooth bump C sin(W x / sd) / sd (1-D)."""
  def score_fn(x, t):
    v = marginal_var(sde, t, 1.)[:, None]
    return -x / v + C * jnp.sin(W * x / jnp.sqrt(v)) / jnp.sqrt(v)
  return score_fn


def drift_and_div_1d(sde, score_fn):
  """Jitted (t, x (n,)) -> (h, dh/dx) of the 1-D probability-flow ODE, by plain autodiff."""
  drift = lambda x, t: -0.5 * sde.sde(x, t)[1][:, None] ** 2 * score_fn(x, t) + sde.sde(x, t)[0]
  div = jax.vmap(jax.grad(lambda xi, ti: drift(xi[None, None], ti[None])[0, 0]))
  return jax.jit(lambda t, x: (drift(x[:, None], jnp.full(x.shape, t))[:, 0],
                               div(x, jnp.full(x.shape, t))))


def brute_force_ode_score(sde, f, t, x, delta, rtol=1e-12):
  """d/dx [log p_T(Phi(x)) + int_t^T div h] by central differences; x (B,) at time t, f from
  drift_and_div_1d; x + delta and x - delta share one solve (the same steps)."""
  xs = np.concatenate([x + delta, x - delta])
  n = xs.size

  def rhs(t, y):
    h, d = f(t, jnp.asarray(y[:n]))
    return np.concatenate([np.asarray(h), np.asarray(d)])

  if t < sde.T:
    sol = scipy.integrate.solve_ivp(rhs, (t, sde.T), np.concatenate([xs, np.zeros(n)]),
                                    method='RK45', rtol=rtol, atol=rtol)
    assert sol.success
    z, logdet = sol.y[:n, -1], sol.y[n:, -1]
  else:
    z, logdet = xs, np.zeros(n)
  logp = np.asarray(sde.prior_logp(jnp.asarray(z)[:, None])) + logdet
  return (logp[:len(x)] - logp[len(x):]) / (2 * delta)


def test_perturbed_1d_model_matches_change_of_variables():
  with jax.enable_x64(True):
    sde = SDES['ve']()
    score_fn = perturbed_score(sde)
    x0 = jnp.asarray([[-1.3], [0.2], [0.9]], jnp.float64)
    fn = jax.jit(lambda rng, x: ode_score.ode_score_gap(
      rng, score_fn, x, sde, nt=5, rtol=1e-10, atol=1e-10, exact_div=True,
      return_trajectory=True))
    out = {k: np.asarray(v) for k, v in fn(jax.random.PRNGKey(0), x0).items()}

    ts = out['ts']
    g2 = np.asarray(sde.sde(jnp.zeros((5, 1)), jnp.asarray(ts))[1]) ** 2
    std2 = np.asarray(sde.marginal_prob(jnp.zeros((5, 1)), jnp.asarray(ts))[1]) ** 2
    f = drift_and_div_1d(sde, score_fn)
    # s_theta, div s_theta = ds/dx and grad div = d2s/dx2 in 1-D, by nested autodiff.
    s1 = lambda xi, ti: score_fn(xi[None, None], ti[None])[0, 0]
    s, ds, d2s = (jax.jit(jax.vmap(fn, (0, None))) for fn in
                  (s1, jax.grad(s1), jax.grad(jax.grad(s1))))
    truth = {k: [] for k in ode_score.DIAGNOSTICS}
    for k, t in enumerate(ts):
      sd = float(np.sqrt(marginal_var(sde, jnp.asarray([t]), 1.)[0]))
      x = out['x'][k, :, 0]
      s_fd = brute_force_ode_score(sde, f, float(t), x, 1e-4 * sd)
      np.testing.assert_allclose(out['s_ode'][k, :, 0], s_fd, rtol=1e-5, atol=1e-6 / sd)
      s_model = np.asarray(s(x, t))
      np.testing.assert_allclose(out['s_model'][k, :, 0], s_model, rtol=1e-12)
      s_normal = -x / std2[k]
      for key, err in (('gap', s_fd - s_model), ('score_vs_normal', s_model - s_normal),
                       ('ode_vs_normal', s_fd - s_normal),
                       ('div_vs_normal', ds(x, t) + 1 / std2[k]),
                       ('grad_div_vs_normal', d2s(x, t))):
        truth[key].append(g2[k] * np.mean(np.square(err)))
    for key, values in truth.items():
      scale = np.maximum(values, 1e-12 * g2 * np.mean(out['s_model'][..., 0] ** 2, -1))
      assert np.all(np.abs(out[key] - values) <= 1e-4 * scale), (key, out[key], values)
    # The perturbation is visible: the gap is a sizeable part of the score's own scale before T.
    scale = g2 * np.mean(out['s_model'][..., 0] ** 2, -1)
    assert np.all(out['gap'][:-1] > 1e-2 * scale[:-1]), out['gap'] / scale


def test_score_dynamics_against_explicit_derivatives():
  """-grad div h - J^T s from one reverse pass equals the explicit tensors (exact and probe)."""
  with jax.enable_x64(True):
    sde = SDES['vp']()
    a = jnp.asarray([[0.7, -0.3, 0.2], [0.1, 0.5, -0.4], [-0.6, 0.2, 0.3]])
    score_fn = lambda x, t: -x + jnp.tanh(x @ a) * x[:, ::-1] * t[:, None]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3), jnp.float64)
    s = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    t = 0.4
    h1 = lambda xi: ode_score.get_ode_drift_fn(sde, score_fn)(xi[None], t)[0]
    jac = jax.jit(jax.vmap(jax.jacfwd(h1)))(x)  # (B, i, j) = d h_i / d x_j
    third = jax.jit(jax.vmap(jax.jacfwd(jax.jacfwd(h1))))(x)  # (B, i, j, k) = d_k d_j h_i
    jts = jnp.einsum('bij,bi->bj', jac, s)
    probe = jnp.asarray([[1., -1., 1.], [-1., -1., 1.]])
    for probes, grad_div in (
        (ode_score._probes(None, x, None, True), jnp.einsum('biik->bk', third)),
        ([probe], jnp.einsum('bi,bj,bijk->bk', probe, probe, third))):
      h, ds = jax.jit(ode_score.get_score_dynamics_fn(sde, score_fn, probes))(t, (x, s))
      np.testing.assert_allclose(h, jax.vmap(h1)(x), rtol=1e-12)
      np.testing.assert_allclose(ds, -grad_div - jts, rtol=1e-10, atol=1e-12)


class TinyNet(nn.Module):
  """VP-convention output (score = -output / std): std * (x + 0.1 tanh(conv(x)))."""

  @nn.compact
  def __call__(self, x, labels, train=False):
    std = SDES['vp']().marginal_prob(jnp.zeros_like(x), labels / 999.)[1]
    h = jnp.tanh(nn.Conv(x.shape[-1], (3, 3))(x))
    return std.reshape((-1, 1, 1, 1)) * (x + 0.1 * h)


def test_images_through_model_and_config():
  config = base_config.get_base_config()
  config.training.sde = 'vpsde'
  config.data.image_size, config.data.num_channels = 4, 1
  config.eval.ode_score_nt = 3
  kwargs = ode_score.ode_score_kwargs_from_config(config)
  assert kwargs == dict(nt=3, eps=1e-5, rtol=1e-5, atol=1e-5, hutchinson_type='Rademacher',
                        exact_div=False, continuous=True)
  sde = SDES['vp']()
  model = TinyNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
  params = model.init(jax.random.PRNGKey(1), x, jnp.ones(2))['params']
  fn = ode_score.get_ode_score_fn_from_config(config, sde, model)
  out = fn(jax.random.PRNGKey(2), params, {}, x)
  assert set(out) == set(ode_score.DIAGNOSTICS) | {'ts'}
  for k, v in out.items():
    assert v.shape == (3,) and np.all(np.isfinite(v)), (k, v)
  assert np.all(np.asarray(out['gap']) > 0) and np.all(np.asarray(out['grad_div_vs_normal']) > 0)
  np.testing.assert_allclose(out['ts'], [1e-5, 0.500005, 1.], rtol=1e-6)

  toy = base_config.get_base_config()
  toy.data.image_size, toy.data.dim = 0, 1
  assert ode_score.ode_score_kwargs_from_config(toy)['exact_div']


def test_host_loops_give_the_compiled_results(monkeypatch):
  """Where loops around a gradient run in Python (parallel.loops_unrolled) the diagnostics are
  those of the one jitted program."""
  sde = SDES['vp']()
  model = TinyNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
  params = model.init(jax.random.PRNGKey(1), x, jnp.ones(2))['params']
  out = {}
  for unrolled in (False, True):
    monkeypatch.setattr(parallel, 'UNROLLED_BACKENDS', ('cpu',) if unrolled else ())
    fn = ode_score.get_ode_score_fn(sde, model, nt=4, rtol=1e-4, atol=1e-4)
    out[unrolled] = jax.device_get(fn(jax.random.PRNGKey(2), params, {}, x))
  assert out[True].keys() == out[False].keys()
  for k in out[True]:
    np.testing.assert_allclose(out[True][k], out[False][k], rtol=1e-4, err_msg=k)


def test_bad_input():
  sde = SDES['ve']()
  score_fn = gaussian_score(sde, 1.)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='nt'):
    ode_score.ode_score_gap(rng, score_fn, jnp.zeros((2, 3)), sde, nt=1)
  with pytest.raises(ValueError, match='exact_div'):
    ode_score.ode_score_gap(rng, score_fn, jnp.zeros((2, 20)), sde, exact_div=True)
  with pytest.raises(ValueError, match='Hutchinson'):
    ode_score.ode_score_gap(rng, score_fn, jnp.zeros((2, 3)), sde, hutchinson_type='uniform')
  with pytest.raises(ValueError, match='eps'):
    ode_score.ode_score_gap(rng, score_fn, jnp.zeros((2, 3)), sde, eps=0.)
  with pytest.raises(ValueError, match='empty'):
    ode_score.plot_gap({}, '/tmp/x.png')


def test_plot_gap(tmp_path):
  ts = np.linspace(1e-5, 1., 5)
  results = {f'order {k}': {'ts': ts, 'gap': np.exp(-k * ts) * 10. ** -k} for k in (1, 2, 3)}
  results['order 3']['gap'][0] = 0.  # left out of the log plot, no error
  path = ode_score.plot_gap(results, str(tmp_path / 'sub' / 'gap.png'))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
