"""ode_solver.solve against closed-form solutions and scipy's RK45 (solve_ivp)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import ode_solver

# A damped rotation in 2-D plus an independent decaying 3rd coordinate: y' = M y.
M = np.array([[-0.3, 2.0, 0.], [-2.0, -0.3, 0.], [0., 0., -1.5]])
Y0 = np.array([[1.0, 0.5, 2.0], [-0.7, 0.2, 0.3], [0.1, -1.0, 1.0], [2.0, 1.0, -0.5]])  # (4, 3)


def exact(t, t0=0.):
  return Y0 @ scipy.linalg.expm(M * (t - t0)).T


def linear_fn(t, y):
  return y @ jnp.asarray(M, y.dtype).T


def scipy_solve(t0, t1, y0, tol, t_eval=None):
  fun = lambda t, y: (y.reshape(y0.shape) @ M.T).ravel()
  sol = scipy.integrate.solve_ivp(fun, (t0, t1), y0.ravel(), method='RK45', rtol=tol, atol=tol,
                                  t_eval=t_eval)
  assert sol.success
  return sol


@pytest.mark.parametrize('tol', [1e-4, 1e-6])
def test_linear_ode_accuracy_and_nfe_match_scipy(tol):
  solve = jax.jit(lambda y0: ode_solver.solve(linear_fn, y0, 0., 3., rtol=tol, atol=tol,
                                              full_output=True))
  y1, nfe, info = solve(jnp.asarray(Y0, jnp.float32))
  sol = scipy_solve(0., 3., Y0, tol)
  assert int(info['status']) == ode_solver.SUCCESS
  assert abs(int(nfe) - sol.nfev) <= 0.1 * sol.nfev, (int(nfe), sol.nfev)
  assert int(nfe) == 2 + 6 * int(info['n_accepted'] + info['n_rejected'])
  truth = exact(3.)
  err_ours = np.max(np.abs(np.asarray(y1) - truth))
  err_scipy = np.max(np.abs(sol.y[:, -1].reshape(Y0.shape) - truth))
  # Same global error as scipy's float64 run (float32 round-off ~1e-6 aside), and small.
  assert err_ours <= 1.5 * err_scipy + 3e-6, (err_ours, err_scipy)
  assert err_ours < 300 * tol


def test_backward_integration_inverts_forward():
  tol = 1e-6
  y1, _ = ode_solver.solve(linear_fn, jnp.asarray(exact(2.), jnp.float32), 2., 0., tol, tol)
  np.testing.assert_allclose(y1, Y0, atol=2e-4)
  # NFE as scipy's backward solve.
  _, nfe = ode_solver.solve(linear_fn, jnp.asarray(Y0, jnp.float32), 2., 0.5, tol, tol)
  sol = scipy_solve(2., 0.5, Y0, tol)
  assert abs(int(nfe) - sol.nfev) <= 0.1 * sol.nfev
  np.testing.assert_allclose(
    ode_solver.solve(linear_fn, jnp.asarray(Y0, jnp.float32), 2., 0.5, tol, tol)[0],
    sol.y[:, -1].reshape(Y0.shape), atol=1e-5)


@pytest.mark.parametrize('t0,t1', [(0., 3.), (3., 0.)])
def test_save_times_dense_output(t0, t1):
  """States at save times (including t0 and t1) match the exact solution and scipy's t_eval,
  and cost no extra evaluations."""
  tol = 1e-6
  ts = np.linspace(t0, t1, 9)
  y_start = exact(t0)
  ys, nfe = jax.jit(lambda y: ode_solver.solve(linear_fn, y, t0, t1, tol, tol, save_ts=ts))(
    jnp.asarray(y_start, jnp.float32))
  _, nfe_plain = ode_solver.solve(linear_fn, jnp.asarray(y_start, jnp.float32), t0, t1, tol, tol)
  assert ys.shape == (9,) + Y0.shape
  assert int(nfe) == int(nfe_plain)
  truth = np.stack([exact(t) for t in ts])
  np.testing.assert_allclose(ys, truth, atol=5e-5)
  np.testing.assert_array_equal(ys[0], np.float32(y_start))
  sol = scipy_solve(t0, t1, y_start, tol, t_eval=ts)
  np.testing.assert_allclose(ys, np.moveaxis(sol.y.reshape(Y0.shape + (9,)), -1, 0), atol=1e-5)


def test_pytree_state_uses_rms_over_all_leaves():
  """A (x, logdet) pytree state integrates like scipy on the concatenated state: same NFE,
  and logdet' = tr(M) gives log det expm(M t)."""
  tol = 1e-5

  def fn(t, state):
    x, _ = state
    return linear_fn(t, x), jnp.full((x.shape[0],), np.trace(M), x.dtype)

  (x1, logdet), nfe = ode_solver.solve(fn, (jnp.asarray(Y0, jnp.float32), jnp.zeros(4)), 0., 2.,
                                       tol, tol)
  np.testing.assert_allclose(x1, exact(2.), atol=1e-4)
  np.testing.assert_allclose(logdet, np.trace(M) * 2., rtol=1e-5)

  def flat(t, y):
    x = y[:12].reshape(Y0.shape)
    return np.concatenate([(x @ M.T).ravel(), np.full(4, np.trace(M))])

  sol = scipy.integrate.solve_ivp(flat, (0., 2.), np.concatenate([Y0.ravel(), np.zeros(4)]),
                                  rtol=tol, atol=tol)
  assert abs(int(nfe) - sol.nfev) <= 0.1 * sol.nfev, (int(nfe), sol.nfev)


def test_time_dependent_ode_args_and_traced_times():
  """y' = -2 a t y, y = exp(-a (t^2 - t0^2)) y0, with `a` passed as args and traced t0/t1."""
  @jax.jit
  def run(t0, t1, a):
    return ode_solver.solve(lambda t, y, a: -2. * a * t * y, jnp.ones(3), t0, t1, 1e-6, 1e-6,
                            args=a)
  for t0, t1, a in [(0., 2., 0.5), (1.5, -0.5, jnp.asarray([1., 2., 0.1]))]:
    y1, _ = run(t0, t1, a)
    np.testing.assert_allclose(y1, np.exp(-np.asarray(a) * (t1 ** 2 - t0 ** 2)) * np.ones(3),
                               rtol=2e-5)


def test_failures_return_nan_and_status():
  y, _, info = ode_solver.solve(linear_fn, jnp.asarray(Y0, jnp.float32), 0., 3., 1e-6, 1e-6,
                                max_steps=5, full_output=True)
  assert int(info['status']) == ode_solver.MAX_STEPS_REACHED
  assert np.all(np.isnan(y))
  # A singular right-hand side: the step shrinks below the minimum step.
  y, _, info = ode_solver.solve(lambda t, y: -1. / (1. - t) ** 2 * jnp.ones_like(y), jnp.ones(2),
                                0., 2., 1e-6, 1e-6, max_steps=10000, full_output=True)
  assert int(info['status']) in (ode_solver.STEP_TOO_SMALL, ode_solver.MAX_STEPS_REACHED)
  assert np.all(np.isnan(y))


def test_bad_input():
  with pytest.raises(ValueError, match='floating-point'):
    ode_solver.solve(lambda t, y: y, jnp.ones(3, jnp.int32), 0., 1.)
  with pytest.raises(ValueError, match='sorted'):
    ode_solver.solve(linear_fn, jnp.ones((1, 3)), 0., 1., save_ts=[0., 0.5, 0.2])


def test_host_solver_takes_the_same_steps():
  """get_host_solver (the step loop in Python) = solve (one while_loop): steps, NFE, values."""
  fn = lambda t, y, a: y @ jnp.asarray(M, y.dtype).T * a
  y0 = jnp.asarray(Y0, jnp.float32)
  ts = [3., 2., 1.5, 0.25]
  traced = jax.jit(lambda y0, a: ode_solver.solve(fn, y0, 3., 0.25, 1e-5, 1e-5, args=a,
                                                  save_ts=ts, full_output=True))(y0, 0.7)
  host = ode_solver.get_host_solver(fn, 1e-5, 1e-5)(y0, 3., 0.25, 0.7, save_ts=ts,
                                                    full_output=True)
  np.testing.assert_allclose(host[0], traced[0], rtol=1e-6, atol=1e-6)
  assert int(host[1]) == int(traced[1])
  for k in ('status', 'n_accepted', 'n_rejected'):
    assert int(host[2][k]) == int(traced[2][k]), k
  expected = np.stack([exact(3. + 0.7 * (t - 3.), 3.) for t in ts])  # y' = 0.7 M y
  np.testing.assert_allclose(host[0], expected, rtol=1e-4, atol=1e-4)
