"""Per-example maths shared by the losses, likelihoods, samplers and SDEs: products and sums over
the batch axis, divergences of fn(x, t) (Hutchinson-Skilling estimates and exact), and the
probes of the estimator."""
import jax
import jax.numpy as jnp


def batch_mul(a, b):
  """Multiply per-example scalars `a` (B,) with arrays `b` (B, ...) (or the other way round)."""
  return jax.vmap(lambda a, b: a * b)(a, b)


def batch_sum(x):
  """Sum over all but the leading (batch) axis."""
  return jnp.sum(x.reshape((x.shape[0], -1)), axis=-1)


def get_value_div_fn(fn):
  """fn(x, t) -> (fn(x, t), Hutchinson estimate of div_x fn) with probe `eps` (same shape as x).

  Forward mode: one jvp along the probe returns the value and J eps together, so the
  primal pass is shared. Examples must not interact inside `fn` (true for our models).
  """
  def value_div_fn(x, t, eps):
    value, jvp = jax.jvp(lambda y: fn(y, t), (x,), (eps,))
    return value, batch_sum(jvp * eps)
  return value_div_fn


def get_div_fn(fn):
  """fn(x, t) -> Hutchinson-Skilling estimate of div_x fn(x, t) along the probe `eps`."""
  value_div_fn = get_value_div_fn(fn)
  return lambda x, t, eps: value_div_fn(x, t, eps)[1]


def get_exact_value_div_fn(fn):
  """Exact divergence by one jvp per input dimension (for low-dimensional data only)."""
  def value_div_fn(x, t):
    flat = x.reshape((x.shape[0], -1))
    value, fn_jvp = jax.linearize(lambda y: fn(y, t), x)  # one primal pass for every tangent

    def diag(i):
      basis = jnp.zeros_like(flat).at[:, i].set(1.).reshape(x.shape)
      return fn_jvp(basis).reshape(flat.shape)[:, i]

    div = sum(diag(i) for i in range(flat.shape[1]))
    return value, div
  return value_div_fn


def rademacher(rng, shape, dtype=jnp.float32):
  """Random +-1 entries."""
  return jax.random.rademacher(rng, shape, dtype=dtype)


def get_hutchinson_noise(rng, shape, kind='Rademacher'):
  """The fixed probe of the Hutchinson-Skilling trace estimator."""
  if kind.lower() == 'rademacher':
    return rademacher(rng, shape)
  if kind.lower() == 'gaussian':
    return jax.random.normal(rng, shape)
  raise ValueError(f"Unknown Hutchinson noise '{kind}': use 'Rademacher' or 'Gaussian'.")
