"""benchmarks/train_step.py: each way of taking the exact order-3 derivatives that it times gives
the same score, Jacobian and grad_x tr J as high_order.exact_derivatives (1-D and 2-D data)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_step  # benchmarks/ is on sys.path in pytest (the test's folder) and when run from here



def _field(x):
  """A smooth nonlinear vector field R^D -> R^D (per row), with cross terms in 2-D."""
  return jnp.sin(x) * jnp.roll(x, 1, axis=1) + x ** 3


@pytest.mark.parametrize('dim', [1, 2])
@pytest.mark.parametrize('method', sorted(train_step.DERIVATIVE_METHODS))
def test_every_derivative_method_agrees_with_ours(method, dim):
  x = jax.random.normal(jax.random.PRNGKey(dim), (5, dim))
  want = train_step.high_order.exact_derivatives(_field, x, 3)
  got = train_step.DERIVATIVE_METHODS[method](_field, x, 3)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # ... and ours is right: J and grad_x tr J by jax.jacfwd on one row.
  row = lambda y: _field(y[None])[0]
  np.testing.assert_allclose(want[1][0], jax.jacfwd(row)(x[0]), rtol=1e-5)
  tr = lambda y: jnp.trace(jax.jacfwd(row)(y))
  np.testing.assert_allclose(want[2][0], jax.grad(tr)(x[0]), rtol=1e-5)
