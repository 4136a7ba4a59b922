"""The second- and third-order DSM estimators of mle_score_ode (Lu et al., ICML 2022).

Per-example terms for losses.score_matching_losses (formulas: losses.py's docstring): the
Rademacher-probe (JVP) estimators for any data size, and the exact-Jacobian ones of toy.py for data
of at most two dimensions (their derivatives by the model's own pass where it has one, as the toy
MLP's Taylor pass, else by autodiff).
"""
import jax
import jax.numpy as jnp

MAX_EXACT_JACOBIAN_DIM = 2


def flat(x):
  return x.reshape((x.shape[0], -1))


def _inner(x, y):
  """Per-example inner product of flat (B, D) arrays, kept as (B, 1)."""
  return jnp.sum(x * y, axis=-1, keepdims=True)


def basis(x):
  """The D basis vectors e_i of flat (B, D) data, each broadcast to x's shape."""
  eye = jnp.eye(x.shape[1], dtype=x.dtype)
  return [jnp.broadcast_to(eye[i], x.shape) for i in range(x.shape[1])]


def _jacobian(fn, x):
  """fn(x) and its per-example Jacobian J[b, i, j] = d fn_i / d x_j: one primal pass (linearize),
  one unrolled tangent per dimension (vmapped tangents compile to much slower XLA:CPU dots)."""
  value, fn_jvp = jax.linearize(fn, x)
  return value, jnp.stack([fn_jvp(e) for e in basis(x)], axis=-1)


def with_derivatives(fn, derivatives):
  """fn carrying derivatives(x, order) -> (s, J, grad_x tr J or None), a pass of its own that
  exact_derivatives takes in place of autodiff (models.mlp.taylor_derivatives for the toy MLP)."""
  fn.exact_derivatives = derivatives
  return fn


def exact_derivatives(fn, x, order):
  """(s, J, grad_x tr J) of a per-example map fn on flat (B, D) data, D <= 2, exactly.

  Order 2 needs s and J (grad_x tr J is None). fn's own pass when it carries one (see
  `with_derivatives`), else `autodiff_derivatives`.
  """
  own = getattr(fn, 'exact_derivatives', None)
  if own is not None:
    return own(x, order)
  return autodiff_derivatives(fn, x, order)


def autodiff_derivatives(fn, x, order):
  """exact_derivatives of any fn by JAX autodiff.

  Order 3 takes grad_x tr J by forward-over-forward mode in 1-D (s'' from one nested jvp: 3
  streams) and by reverse mode over the linearized Jacobian in 2-D (the cheapest of the autodiff
  options in benchmarks/train_step.py --toy).
  """
  if order == 2:
    return _jacobian(fn, x) + (None,)
  if x.shape[1] == 1:
    one = jnp.ones_like(x)
    (s, d1), (_, d2) = jax.jvp(lambda y: jax.jvp(fn, (y,), (one,)), (x,), (one,))
    return s, d1[:, :, None], d2

  def trace_fn(y):
    s, jac = _jacobian(fn, y)
    return jnp.sum(jnp.trace(jac, axis1=1, axis2=2)), (s, jac)
  grad_tr, (s, jac) = jax.grad(trace_fn, has_aux=True)(x)
  return s, jac, grad_tr


def _dsm_target(z, score, std):
  """(sigma, sigma^2, c = z + sigma stop_grad(s)) as flat (B, 1), (B, 1), (B, D) arrays."""
  std_ = std.reshape((z.shape[0], 1))
  std2 = jnp.square(std_)
  c = flat(z) + flat(jax.lax.stop_gradient(score)) * std_
  return std_, std2, c


def hutchinson_losses(fn, perturbed, std, z, v, order, dim):
  """(score, losses2, losses3 or None) of the Rademacher-probe (JVP) estimators of orders 2, 3.

  fn(x) -> score at the batch's times; v is the probe (shape of the data). One JVP gives the score
  and J v for order 2; order 3 differentiates <v, J v> in reverse mode over that JVP.
  """
  losses3 = None
  if order == 2:
    score, jv = jax.jvp(fn, (perturbed,), (v,))  # one pass gives the score and J v
  else:
    def vjv_fn(x):
      s, jv = jax.jvp(fn, (x,), (v,))
      return jnp.sum(v * jv), (s, jv)
    # Reverse mode over the JVP: grad_x <v, J v> with the score and J v as by-products.
    grad_vjv, (score, jv) = jax.grad(vjv_fn, has_aux=True)(perturbed)
  std_, std2, c = _dsm_target(z, score, std)
  vf, jvf = flat(v), flat(jv)
  cv = _inner(c, vf)
  vv = _inner(vf, vf)
  vjv = _inner(vf, jvf)
  frob = jnp.mean(jnp.square(std2 * jvf + vf - cv * c) / dim, axis=-1)
  trace = jnp.square((std2 * vjv + vv - jnp.square(cv)) / dim)[:, 0]
  losses2 = frob + trace
  if order == 3:
    vjv = jax.lax.stop_gradient(vjv)
    jvf = jax.lax.stop_gradient(jvf)
    resid = (std2 * std_ * flat(grad_vjv) + jnp.square(cv) * c - (std2 * vjv + vv) * c
             - 2 * cv * (std2 * jvf + vf))
    losses3 = jnp.mean(jnp.square(resid / dim), axis=-1)
  return score, losses2, losses3


def exact_jacobian_losses(fn, perturbed, std, z, order, dim):
  """(score, losses2, losses3 or None) from the exact Jacobian (and grad tr J), dim <= 2.

  toy.py's 'score_eps_second_jac' / 'score_eps_third': exact_derivatives of fn on flat data.
  """
  losses3 = None
  flat_fn = fn if perturbed.ndim == 2 else lambda y: flat(fn(y.reshape(perturbed.shape)))
  score, jac, grad_tr = exact_derivatives(flat_fn, flat(perturbed), order)
  eye = jnp.eye(dim, dtype=perturbed.dtype)
  std_, std2, c = _dsm_target(z, score, std)
  a = std2[:, :, None] * jac + eye - c[:, :, None] * c[:, None, :]
  losses2 = jnp.mean(jnp.square(a).reshape((perturbed.shape[0], -1)), axis=-1)
  if order == 3:
    jac = jax.lax.stop_gradient(jac)
    tr = jnp.trace(jac, axis1=1, axis2=2)[:, None]
    resid = (std2 * std_ * flat(grad_tr) + _inner(c, c) * c - (std2 * tr + dim) * c
             - 2 * jnp.einsum('bij,bj->bi', std2[:, :, None] * jac + eye, c))
    losses3 = jnp.mean(jnp.square(resid), axis=-1)
  return score, losses2, losses3
