"""losses against independent truth: analytic Gaussian scores, exact Jacobians (jax.jacfwd, numpy),
hand-computed Adam steps, and the importance-weighting identity."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import high_order
import losses
import optim
import sde_lib
from configs.base_config import get_base_config
from configs.toy.mog1d_ve import get_config as mog1d_ve_config
from train_state import create_train_state

VP = lambda: sde_lib.VPSDE(0.1, 20., 1000)
VE = lambda: sde_lib.VESDE(0.01, 50., 1000)


# ---------------------------------------------------------------------------------------------
# Gaussian data: the exact score of the perturbed marginal minimises every order's loss.
# ---------------------------------------------------------------------------------------------
MU = np.array([0.5, -1.0], np.float32)
S = 0.7
THETA_TRUE = jnp.array([MU[0], MU[1], S, 0.])  # (a0, a1, b, k)
THETA_OFF = jnp.array([0.8, -1.2, 0.9, 0.3])


def gaussian_score_fn(sde, theta):
  """Score of N(a m_t, (m_t^2 b^2 + sigma_t^2) I) plus k u^3 / sqrt(var) with u the standardised
  residual: the true score of the perturbed data at THETA_TRUE; k gives grad tr J != 0, so the
  third-order term sees it."""
  a, b, k = theta[:2], theta[2], theta[3]

  def score_fn(x, t, rng=None):
    m, std = sde.marginal_prob(jnp.ones_like(x), t)
    var = m ** 2 * b ** 2 + std[:, None] ** 2
    d = x - a * m
    u = d / jnp.sqrt(var)
    return -d / var + k * u ** 3 / jnp.sqrt(var), {}

  return score_fn


def mc_gradient_fn(sde, exact, likelihood_weighting, reps=64, batch=256):
  """theta -> per-replicate gradients of (loss1, loss2, loss3) w.r.t. theta, (reps, 3, 4); the
  replicates use the same random numbers for every theta (paired comparisons)."""
  loss_fn = losses.get_loss_from_score_fn(sde, losses.LossOptions(
    reduce_mean=True, likelihood_weighting=likelihood_weighting,
    importance_weighting=likelihood_weighting, score_matching_order=3, exact_jacobian=exact))

  def terms(theta, rng):
    data_rng, loss_rng = jax.random.split(rng)
    data = MU + S * jax.random.normal(data_rng, (batch, 2))
    _, (_, l1, l2, l3) = loss_fn(loss_rng, gaussian_score_fn(sde, theta), {}, {'image': data})
    return jnp.stack([l1, l2, l3])

  rngs = jax.random.split(jax.random.PRNGKey(1), reps)
  fn = jax.jit(jax.vmap(jax.jacrev(terms), in_axes=(None, 0)))
  return lambda theta: np.asarray(fn(theta, rngs), np.float64)


def _mean_se(x):
  return x.mean(0), x.std(0, ddof=1) / np.sqrt(x.shape[0])


@pytest.mark.parametrize('name,exact,lw', [('vp', False, True), ('ve', False, False),
                                           ('ve', True, False)])
def test_true_gaussian_score_is_stationary(name, exact, lw):
  sde = {'vp': VP, 've': VE}[name]()
  grad_fn = mc_gradient_fn(sde, exact, lw)
  g_true = grad_fn(THETA_TRUE)
  mean, se = _mean_se(g_true)
  # At the truth every component of every term's gradient is 0 within 4.5 standard errors.
  np.testing.assert_array_less(np.abs(mean), 4.5 * se + 1e-6)
  # Near it, each term's gradient points back: along delta = theta - theta_true the directional
  # derivative grows (paired with the truth's draws). The step is small because the order-2/3
  # targets hold the current (wrong) lower-order score fixed and move at second order in delta.
  delta = 0.1 * (THETA_OFF - THETA_TRUE)
  diff = (grad_fn(THETA_TRUE + delta) - g_true) @ np.asarray(delta)
  d_mean, d_se = _mean_se(diff)
  assert np.all(d_mean > 8 * d_se), (d_mean, d_se)
  # Far from it the first-order term still points back (its target does not move).
  far = _mean_se(grad_fn(THETA_OFF)[:, 0] @ np.asarray(THETA_OFF - THETA_TRUE))
  assert far[0] > 8 * far[1], far


# ---------------------------------------------------------------------------------------------
# Rademacher (JVP) estimators against exact Jacobians.
# ---------------------------------------------------------------------------------------------
def _nonlinear_score(dim):
  w = jax.random.normal(jax.random.PRNGKey(3), (dim, dim))
  v = jax.random.normal(jax.random.PRNGKey(4), (dim, dim))
  b0 = jax.random.normal(jax.random.PRNGKey(5), (dim,))

  def single(x, t):  # one example: (dim,) -> (dim,), asymmetric Jacobian, nonzero 3rd derivative
    return jnp.tanh(x @ w + b0) @ v * (1. + t) - x

  def score_fn(x, t, rng=None):
    return jax.vmap(single)(x, t), {}

  return single, score_fn


def _fixed_inputs(dim, batch=3):
  rng = np.random.RandomState(0)
  data = jnp.asarray(rng.randn(batch, dim), jnp.float32)
  t = jnp.asarray([0.05, 0.3, 0.8][:batch], jnp.float32)
  z = jnp.asarray(rng.randn(batch, dim), jnp.float32)
  return data, t, z


def _numpy_truth(sde, single, data, t, z):
  """Per example: A = sigma^2 J + I - c c^T, the order-3 residual X(v) for every sign vector,
  and the exact (toy.py) residual, from jacfwd Jacobians and third-order tensors in float64."""
  mean, std = sde.marginal_prob(data, t)
  x = mean + std[:, None] * z
  # J[b, i, j] = d s_i / d x_j and hess[b, i, j, k] = d^2 s_i / d x_j d x_k, example by example.
  derivs = jax.jit(jax.vmap(lambda x, t: (single(x, t), jax.jacfwd(single)(x, t),
                                          jax.jacfwd(jax.jacfwd(single))(x, t))))
  s_all, jac_all, hess_all = (np.asarray(a, np.float64) for a in derivs(x, t))
  out = []
  for b in range(x.shape[0]):
    sb, dim = float(std[b]), x.shape[1]
    s, jac, hess = s_all[b], jac_all[b], hess_all[b]
    c = np.asarray(z[b], np.float64) + sb * s
    eye = np.eye(dim)
    a = sb ** 2 * jac + eye - np.outer(c, c)
    signs = [np.array(v, np.float64) for v in np.ndindex(*(2,) * dim)]
    signs = [2 * v - 1 for v in signs]
    resid_v = []
    for v in signs:
      grad_vjv = np.einsum('i,j,ijk->k', v, v, hess)
      vjv = v @ jac @ v
      resid_v.append(sb ** 3 * grad_vjv + (c @ v) ** 2 * c - (sb ** 2 * vjv + v @ v) * c
                     - 2 * (v @ c) * (sb ** 2 * jac @ v + v))
    grad_tr = np.einsum('iik->k', hess)
    resid_exact = (sb ** 3 * grad_tr + (c @ c) * c - (sb ** 2 * np.trace(jac) + dim) * c
                   - 2 * (sb ** 2 * jac + eye) @ c)
    out.append(dict(a=a, signs=signs, resid_v=resid_v, resid_exact=resid_exact, dim=dim))
  return out


def _losses(sde, score_fn, data, t, z, v, order, exact):
  fn = jax.jit(lambda data, t, z, v: losses.score_matching_losses(
    sde, score_fn, data, t, z, v,
    options=losses.LossOptions(reduce_mean=True, score_matching_order=order, exact_jacobian=exact))[:3])
  return tuple(np.asarray(x, np.float64) for x in fn(data, t, z, v))


@pytest.mark.parametrize('name', ['vp', 've'])
def test_jvp_and_exact_losses_match_jacobian_formulas_2d(name):
  sde = {'vp': VP, 've': VE}[name]()
  single, score_fn = _nonlinear_score(2)
  data, t, z = _fixed_inputs(2)
  truth = _numpy_truth(sde, single, data, t, z)
  d = 2
  # Exact mode against |A|_F^2 / d^2 and |X|^2 / d (toy.py).
  _, l2x, l3x = _losses(sde, score_fn, data, t, z, None, 3, True)
  np.testing.assert_allclose(l2x, [np.sum(tr['a'] ** 2) / d ** 2 for tr in truth], rtol=2e-4)
  np.testing.assert_allclose(l3x, [np.sum(tr['resid_exact'] ** 2) / d for tr in truth],
                             rtol=2e-3)
  _, l2x2, _ = _losses(sde, score_fn, data, t, z, None, 2, True)
  np.testing.assert_allclose(l2x2, l2x, rtol=1e-6)
  # JVP mode for each of the 4 sign vectors against |A v|^2/d^2 + (v^T A v / d)^2, |X(v)|^2/d^3.
  l2_all, l3_all = [], []
  jvp_fn = jax.jit(lambda v: losses.score_matching_losses(
    sde, score_fn, data, t, z, v, options=losses.LossOptions(reduce_mean=True, score_matching_order=3))[1:3])
  for i, v in enumerate(truth[0]['signs']):
    vb = jnp.broadcast_to(jnp.asarray(v, jnp.float32), data.shape)
    l2, l3 = (np.asarray(x, np.float64) for x in jvp_fn(vb))
    want2 = [np.sum((tr['a'] @ v) ** 2) / d ** 2 + (v @ tr['a'] @ v / d) ** 2 for tr in truth]
    want3 = [np.sum(tr['resid_v'][i] ** 2) / d ** 3 for tr in truth]
    np.testing.assert_allclose(l2, want2, rtol=2e-4)
    np.testing.assert_allclose(l3, want3, rtol=2e-3)
    l2_all.append(l2)
    l3_all.append(l3)
  # In expectation over v: the residuals are unbiased (E X(v) = X_exact), the Frobenius term is
  # exact, and the squared trace / residual add the probe's variance:
  #   E loss2_jvp = loss2_exact + (tr(A)^2 + sum_{i<j} (A_ij + A_ji)^2) / d^2
  #   E loss3_jvp = (d loss3_exact + E |X(v) - X_exact|^2) / d^3.
  for tr in truth:
    np.testing.assert_allclose(np.mean(tr['resid_v'], 0), tr['resid_exact'], rtol=1e-9,
                               atol=1e-9)
  a_sym = [(np.trace(tr['a']) ** 2 + (tr['a'][0, 1] + tr['a'][1, 0]) ** 2) / d ** 2
           for tr in truth]
  var3 = [np.mean([np.sum((r - tr['resid_exact']) ** 2) for r in tr['resid_v']]) / d ** 3
          for tr in truth]
  np.testing.assert_allclose(np.mean(l2_all, 0), l2x + np.array(a_sym), rtol=5e-4)
  np.testing.assert_allclose(np.mean(l3_all, 0), l3x * d / d ** 3 + np.array(var3), rtol=3e-3)
  # The same expectations by Monte Carlo over random probes, through the sampling loss path.
  keys = jax.random.split(jax.random.PRNGKey(7), 4000)
  mc = jax.jit(jax.vmap(lambda k: jnp.stack(jvp_fn(
    jax.random.rademacher(k, data.shape, jnp.float32)))))(keys)
  mc = np.asarray(mc, np.float64)
  se = mc.std(0) / np.sqrt(mc.shape[0])
  np.testing.assert_array_less(np.abs(mc.mean(0) - np.stack([np.mean(l2_all, 0),
                                                             np.mean(l3_all, 0)])), 5 * se + 1e-6)


@pytest.mark.parametrize('dim', [1, 2])
def test_exact_derivatives_match_jacfwd(dim):
  """s, J and grad_x tr J (forward-over-forward in 1-D, reverse over the Jacobian in 2-D) equal
  per-example jacfwd derivatives of a nonlinear map."""
  single, score_fn = _nonlinear_score(dim)
  x, t, _ = _fixed_inputs(dim)
  fn = lambda y: score_fn(y, t)[0]
  for order in (2, 3):
    s, jac, grad_tr = jax.jit(lambda y: high_order.exact_derivatives(fn, y, order))(x)
    want_jac = jax.vmap(jax.jacfwd(single))(x, t)
    np.testing.assert_allclose(s, jax.vmap(single)(x, t), rtol=1e-6)
    np.testing.assert_allclose(jac, want_jac, rtol=1e-5, atol=1e-6)
    if order == 2:
      assert grad_tr is None
    else:
      hess = jax.vmap(jax.jacfwd(jax.jacfwd(single)))(x, t)
      np.testing.assert_allclose(grad_tr, jnp.einsum('biik->bk', hess), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('exact,dim', [(False, 2), (True, 1), (True, 2)])
def test_parameter_gradients_flow_only_through_the_highest_order_quantity(exact, dim):
  """d loss_k / d theta equals the gradient of a reference in which everything of lower order
  (the score in c, J v, <v, J v>, J, tr J) is a constant taken at theta0: loss1 through s, loss2
  through J (v), loss3 through grad <v, J v> (grad tr J)."""
  sde, batch = VP(), 3
  data, t, z = _fixed_inputs(dim, batch)
  keys = jax.random.split(jax.random.PRNGKey(11), 3)
  theta0 = {'w': jax.random.normal(keys[0], (dim, dim)),
            'u': jax.random.normal(keys[1], (dim, dim)),
            'b': jax.random.normal(keys[2], (dim,))}
  single = lambda th, x, t: jnp.tanh(x @ th['w'] + th['b']) @ th['u'] * (1. + t) - x
  score_fn = lambda th: (lambda x, t, rng=None: (jax.vmap(lambda x, t: single(th, x, t))(x, t), {}))
  v = None if exact else jax.random.rademacher(jax.random.PRNGKey(12), data.shape, jnp.float32)

  def ours(th):
    l1, l2, l3, _ = losses.score_matching_losses(
      sde, score_fn(th), data, t, z, v,
      options=losses.LossOptions(reduce_mean=True, score_matching_order=3, exact_jacobian=exact))
    return jnp.stack([l1.mean(), l2.mean(), l3.mean()])

  mean, std = sde.marginal_prob(data, t)
  x = mean + std[:, None] * z
  sig = std[:, None]
  eye = jnp.eye(dim)
  derivs = lambda th: jax.vmap(lambda x, t: (single(th, x, t), jax.jacfwd(single, 1)(th, x, t),
                                             jax.jacfwd(jax.jacfwd(single, 1), 1)(th, x, t)))(x, t)
  s0, jac0, hess0 = derivs(theta0)
  c0 = z + sig * s0

  def reference(th):
    s, jac, hess = derivs(th)
    l1 = jnp.mean((sig * s + z) ** 2)
    if exact:
      a = sig[:, :, None] ** 2 * jac + eye - c0[:, :, None] * c0[:, None, :]
      l2 = jnp.mean(jnp.sum(a ** 2, (1, 2)) / dim ** 2)
      rest = (jnp.sum(c0 * c0, 1, keepdims=True) * c0
              - (sig ** 2 * jnp.trace(jac0, axis1=1, axis2=2)[:, None] + dim) * c0
              - 2 * jnp.einsum('bij,bj->bi', sig[:, :, None] ** 2 * jac0 + eye, c0))
      l3 = jnp.mean(jnp.sum((sig ** 3 * jnp.einsum('biik->bk', hess) + rest) ** 2, 1) / dim)
    else:
      cv = jnp.sum(c0 * v, 1, keepdims=True)
      jv, jv0 = jnp.einsum('bij,bj->bi', jac, v), jnp.einsum('bij,bj->bi', jac0, v)
      vjv, vjv0 = jnp.sum(v * jv, 1, keepdims=True), jnp.sum(v * jv0, 1, keepdims=True)
      vv = jnp.sum(v * v, 1, keepdims=True)
      l2 = jnp.mean(jnp.sum((sig ** 2 * jv + v - cv * c0) ** 2, 1) / dim ** 2
                    + ((sig ** 2 * vjv + vv - cv ** 2)[:, 0] / dim) ** 2)
      rest = cv ** 2 * c0 - (sig ** 2 * vjv0 + vv) * c0 - 2 * cv * (sig ** 2 * jv0 + v)
      grad_vjv = jnp.einsum('bi,bj,bijk->bk', v, v, hess)
      l3 = jnp.mean(jnp.sum((sig ** 3 * grad_vjv + rest) ** 2, 1) / dim ** 3)
    return jnp.stack([l1, l2, l3])

  np.testing.assert_allclose(ours(theta0), reference(theta0), rtol=2e-4)
  got, want = jax.jit(jax.jacrev(ours))(theta0), jax.jit(jax.jacrev(reference))(theta0)
  for key in theta0:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-3, atol=1e-5 * np.abs(want[key]).max())


@pytest.mark.parametrize('order', [2, 3])
def test_one_dimensional_jvp_loss_is_exact(order):
  """In 1-D v = +-1 makes the estimators exact: loss2_jvp = 2 loss2_exact (the trace and
  Frobenius terms coincide), loss3_jvp = loss3_exact; through the full sampling loss."""
  sde = VE()
  _, score_fn = _nonlinear_score(1)
  batch = {'image': jnp.linspace(-1., 1., 8)[:, None]}
  out = {}
  for exact in (False, True):
    loss_fn = losses.get_loss_from_score_fn(sde, losses.LossOptions(
      reduce_mean=True, score_matching_order=order, exact_jacobian=exact))
    out[exact] = jax.jit(lambda b: loss_fn(jax.random.PRNGKey(0), score_fn, {}, b)[1])(batch)
  np.testing.assert_allclose(out[False][1], out[True][1], rtol=1e-6)
  np.testing.assert_allclose(out[False][2], 2 * out[True][2], rtol=1e-5)
  np.testing.assert_allclose(out[False][3], out[True][3], rtol=1e-4)


def test_loss_weights_and_image_shapes():
  """Total = w . (loss1, loss2, loss3); an image batch gives the per-pixel loss of its flat copy."""
  sde = VP()
  score_img = lambda x, t, rng=None: (jnp.sin(x) * (1 + t[:, None, None, None]) - x, {})
  score_flat = lambda x, t, rng=None: (jnp.sin(x) * (1 + t[:, None]) - x, {})
  img = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))
  w = (0.7, 0.5, 0.1)
  fi = losses.get_loss_from_score_fn(sde, losses.LossOptions(
    reduce_mean=True, likelihood_weighting=True, importance_weighting=True,
    score_matching_order=3, loss_weights=w))
  run = lambda score_fn, x: jax.jit(lambda x: fi(jax.random.PRNGKey(1), score_fn, {},
                                                  {'image': x}))(x)
  loss_i, (_, *terms_i) = run(score_img, img)
  loss_f, (_, *terms_f) = run(score_flat, img.reshape(4, 12))
  np.testing.assert_allclose(terms_i, terms_f, rtol=1e-5)
  np.testing.assert_allclose(loss_i, np.dot(w, np.asarray(terms_i)), rtol=1e-6)
  assert all(float(x) > 0 for x in terms_i)


# ---------------------------------------------------------------------------------------------
# Likelihood weighting: importance-sampled time vs uniform time with g^2 weights.
# ---------------------------------------------------------------------------------------------
def _order1(sde, importance, eps, reps, batch, seed=0):
  loss_fn = losses.get_loss_from_score_fn(sde, losses.LossOptions(
    reduce_mean=True, likelihood_weighting=True, importance_weighting=importance,
    smallest_time=eps))
  score_fn = lambda x, t, rng=None: (-x, {})  # wrong on purpose

  def one(rng):
    data = 0.5 + 0.7 * jax.random.normal(jax.random.fold_in(rng, 1), (batch, 2))
    return loss_fn(rng, score_fn, {}, {'image': data})[0]

  rngs = jax.random.split(jax.random.PRNGKey(seed), reps)
  return np.asarray(jax.jit(jax.vmap(one))(rngs), np.float64)


def test_importance_weighting_matches_g2_weighting_vp():
  """E_iw[|sigma s + z|^2] Z = E_uniform[g^2 |s + z / sigma|^2] (T - eps), Z = cum_weight(T)."""
  sde, eps = VP(), 1e-2
  z_norm = float(sde.likelihood_importance_cum_weight(sde.T, eps=eps))
  iw = _order1(sde, True, eps, 64, 2048) * z_norm
  un = _order1(sde, False, eps, 64, 2048, seed=1) * (sde.T - eps)
  se = np.sqrt(iw.var(ddof=1) / len(iw) + un.var(ddof=1) / len(un))
  assert abs(iw.mean() - un.mean()) < 4 * se, (iw.mean(), un.mean(), se)
  assert se < 0.02 * un.mean()  # the check has power


def test_importance_weighting_matches_g2_weighting_ve_per_sample():
  """VE: g^2 / sigma^2 is constant, so the importance density is uniform and both forms agree
  draw by draw (same rng -> same t, z) up to Z / (T - eps)."""
  sde, eps = VE(), 1e-5
  z_norm = float(sde.likelihood_importance_cum_weight(sde.T, eps=eps))
  iw = _order1(sde, True, eps, 4, 256) * z_norm
  un = _order1(sde, False, eps, 4, 256) * (sde.T - eps)
  np.testing.assert_allclose(iw, un, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Optimizer: warmup, clipping, decoupled weight decay (flax.optim.Adam), by hand.
# ---------------------------------------------------------------------------------------------
def _optim_config(**kw):
  config = get_base_config()
  config.optim.update(dict(lr=0.1, warmup=4, grad_clip=1., beta1=0.9, eps=1e-8,
                           weight_decay=0.01))
  config.optim.update(kw)
  return config


def _hand_adam(p, grads, lr, warmup, clip, wd, b1=0.9, b2=0.999, eps=1e-8):
  """score_sde's optimization_manager + flax.optim.Adam, in numpy float64."""
  p = np.array(p, np.float64)
  m = np.zeros_like(p)
  n = np.zeros_like(p)
  for step, g in enumerate(grads):
    g = np.array(g, np.float64)
    lr_t = lr * min(step / warmup, 1.) if warmup > 0 else lr
    if clip >= 0:
      g = g * clip / max(np.linalg.norm(g), clip)
    m = b1 * m + (1 - b1) * g
    n = b2 * n + (1 - b2) * g ** 2
    mhat, nhat = m / (1 - b1 ** (step + 1)), n / (1 - b2 ** (step + 1))
    p = p - lr_t * mhat / (np.sqrt(nhat) + eps) - lr_t * wd * p
  return p


@pytest.mark.parametrize('kw', [dict(), dict(grad_clip=-1.), dict(warmup=0),
                                dict(weight_decay=0.)])
def test_optimizer_matches_hand_computation(kw):
  config = _optim_config(**kw)
  tx = optim.get_optimizer(config)
  p0 = np.array([1., -2., 3.])
  grads = [np.array([3., 4., 0.]), np.array([0.3, -0.4, 0.]), np.array([-1., 0.5, 2.])]
  params = {'w': jnp.asarray(p0, jnp.float32)}
  state = tx.init(params)
  for i, g in enumerate(grads):
    updates, state = tx.update({'w': jnp.asarray(g, jnp.float32)}, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    want = _hand_adam(p0, grads[:i + 1], config.optim.lr, config.optim.warmup,
                      config.optim.grad_clip, config.optim.weight_decay)
    np.testing.assert_allclose(params['w'], want, rtol=1e-5, atol=1e-7)
  if config.optim.warmup > 0:  # the first update has lr 0: nothing moved after step 0
    updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_array_equal(updates['w'], 0.)


@pytest.mark.parametrize('warmup', [0, 5])
def test_cosine_schedule_closed_form(warmup):
  """optim.schedule='cosine': lr * step / warmup, then lr (1 + cos(pi (step - warmup) /
  (n_iters - warmup))) / 2, 0 at n_iters; 'constant' keeps lr after the warm-up."""
  config = _optim_config(warmup=warmup, schedule='cosine')
  config.training.n_iters = 25
  fn = optim.get_lr_schedule(config)
  for step in range(26):
    if step < warmup:
      want = 0.1 * step / warmup
    else:
      want = 0.05 * (1 + np.cos(np.pi * (step - warmup) / (25 - warmup)))
    np.testing.assert_allclose(float(fn(step)), want, atol=1e-7)
  config.optim.schedule = 'constant'
  constant = optim.get_lr_schedule(config)  # a plain number without warm-up
  np.testing.assert_allclose(float(constant(20) if callable(constant) else constant), 0.1)
  config.optim.schedule = 'linear'
  with pytest.raises(ValueError, match="schedule to one of constant, cosine"):
    optim.get_optimizer(config)


def test_optimizer_rejects_unknown_name():
  with pytest.raises(ValueError, match="set --config.optim.optimizer=Adam"):
    optim.get_optimizer(_optim_config(optimizer='SGD'))


# ---------------------------------------------------------------------------------------------
# Step function: EMA, non-finite handling, eval, scan; a tiny flax model through models.utils.
# ---------------------------------------------------------------------------------------------
class TinyScore(nn.Module):
  """Flat data (B, D); output = the score (VE continuous convention: labels = sigma(t))."""

  @nn.compact
  def __call__(self, x, labels, train=False):
    h = jnp.concatenate([x, jnp.log(labels)[:, None]], axis=-1)
    return nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(8)(h))) / labels[:, None]


@functools.lru_cache(maxsize=None)
def _setup(ema_rate=0.9, ema_start=0, nonfinite='stop', train=True, order=1):
  sde = VE()
  model = TinyScore()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 2)), jnp.ones((2,)))['params']
  config = _optim_config(warmup=0, lr=1e-2)
  tx = optim.get_optimizer(config)
  state = create_train_state(jax.random.PRNGKey(1), config, model, params, {}, tx)
  step_fn = losses.get_step_fn(sde, model, train=train, optimize_fn=tx, reduce_mean=True,
                               score_matching_order=order, ema_rate=ema_rate,
                               ema_start=ema_start, nonfinite=nonfinite)
  return jax.jit(step_fn), state


BATCH = {'image': jnp.asarray(np.random.RandomState(0).randn(16, 2), jnp.float32)}
NAN_BATCH = {'image': BATCH['image'].at[3, 1].set(jnp.nan)}


def _leaves_equal(a, b):
  return all(np.array_equal(x, y, equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_ema_copies_until_ema_start_then_averages():
  step_fn, state = _setup(ema_rate=0.9, ema_start=2)
  for i in range(3):
    prev = state
    state, metrics = step_fn(state, BATCH)
    assert bool(metrics['finite']) and int(state.step) == i + 1
    assert not _leaves_equal(state.params, prev.params)
    want = (state.params if i < 2 else jax.tree_util.tree_map(
      lambda e, p: 0.9 * e + 0.1 * p, prev.params_ema, state.params))
    for x, y in zip(jax.tree_util.tree_leaves(state.params_ema), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-6)


def test_ema_from_initial_params_when_ema_start_is_zero():
  step_fn, state0 = _setup(ema_rate=0.9, ema_start=0)
  state, _ = step_fn(state0, BATCH)
  want = jax.tree_util.tree_map(lambda e, p: 0.9 * e + 0.1 * p, state0.params, state.params)
  for x, y in zip(jax.tree_util.tree_leaves(state.params_ema), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_nonfinite_skip_and_stop():
  step_fn, state = _setup(nonfinite='skip', order=2)
  state, _ = step_fn(state, BATCH)
  new, metrics = step_fn(state, NAN_BATCH)
  assert not bool(metrics['finite']) and not np.isfinite(float(metrics['loss']))
  for field in ('params', 'opt_state', 'params_ema', 'model_state'):
    assert _leaves_equal(getattr(new, field), getattr(state, field)), field
  assert int(new.step) == int(state.step) + 1
  assert int(new.nonfinite_count) == int(state.nonfinite_count) + 1
  assert not np.array_equal(new.rng, state.rng)
  after, metrics = step_fn(new, BATCH)  # and training goes on
  assert bool(metrics['finite']) and not _leaves_equal(after.params, new.params)

  step_fn, state = _setup(nonfinite='stop')
  new, metrics = step_fn(state, NAN_BATCH)
  assert not bool(metrics['finite'])
  assert _leaves_equal(new, state)


def test_eval_step_uses_ema_params_and_leaves_state():
  train_fn, state = _setup()
  state, _ = train_fn(state, BATCH)
  state, _ = train_fn(state, BATCH)  # params_ema != params
  eval_fn, _ = _setup(train=False)
  new, metrics = eval_fn(state, BATCH)
  for field in ('step', 'params', 'opt_state', 'params_ema', 'model_state', 'nonfinite_count'):
    assert _leaves_equal(getattr(new, field), getattr(state, field)), field
  loss_fn = losses.get_sde_loss_fn(VE(), TinyScore(), False, likelihood_weighting=False,
                                   importance_weighting=False, score_matching_order=1)
  want = jax.jit(loss_fn)(jax.random.split(state.rng)[1], state.params_ema, {}, BATCH)[0]
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-6)
  assert bool(metrics['finite'])


def test_scanned_steps_equal_sequential_steps():
  step_fn, state = _setup()
  batches = {'image': jnp.stack([BATCH['image'], -BATCH['image']])}
  scanned, metrics = jax.jit(lambda s, b: jax.lax.scan(step_fn, s, b))(state, batches)
  seq = state
  for i in range(2):
    seq, _ = step_fn(seq, {'image': batches['image'][i]})
  for x, y in zip(jax.tree_util.tree_leaves(scanned), jax.tree_util.tree_leaves(seq)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert metrics['loss'].shape == (2,)


def test_loss_options_from_config_give_the_step_of_the_loose_keywords():
  """LossOptions.from_config reads config.training and config.model (ema_rate, ema_start): the
  options of get_step_fn's keywords, and the same step (state and metrics)."""
  config = mog1d_ve_config()
  t = config.training
  t.score_matching_order, t.smallest_time, t.nonfinite = 2, 1e-3, 'skip'
  t.likelihood_weighting = t.importance_weighting = True
  t.loss_weights = (1., 0.3, 0.2)
  config.model.ema_rate, config.model.ema_start = 0.8, 0
  loose = dict(reduce_mean=True, continuous=True, likelihood_weighting=True,
               importance_weighting=True, smallest_time=1e-3, score_matching_order=2,
               loss_weights=(1., 0.3, 0.2), exact_jacobian=True, ema_rate=0.8, ema_start=0,
               nonfinite='skip')
  options = losses.LossOptions.from_config(config)
  assert options == losses.LossOptions(**loose)
  _, state = _setup()
  sde, model, tx = VE(), TinyScore(), optim.get_optimizer(_optim_config(warmup=0, lr=1e-2))
  from_config = losses.get_train_step_fn(sde, model, True, tx, options)
  from_loose = losses.get_step_fn(sde, model, True, optimize_fn=tx, **loose)
  new_config, metrics_config = jax.jit(from_config)(state, BATCH)
  new_loose, metrics_loose = jax.jit(from_loose)(state, BATCH)
  assert not _leaves_equal(new_config.params, state.params)
  assert _leaves_equal(new_config, new_loose) and _leaves_equal(metrics_config, metrics_loose)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------
def test_bad_options_raise_one_line_value_errors():
  sde = VP()
  with pytest.raises(ValueError, match='score_matching_order to 1, 2 or 3'):
    losses.LossOptions(reduce_mean=True, score_matching_order=4)
  for order in (2, 3):
    with pytest.raises(ValueError, match='reduce_mean=True'):
      losses.get_sde_loss_fn(sde, TinyScore(), True, reduce_mean=False,
                             score_matching_order=order)
  with pytest.raises(ValueError, match='loss_weights'):
    losses.LossOptions(loss_weights=(1., 1.))
  with pytest.raises(ValueError, match="nonfinite is 'ignore': set it to 'stop' or 'skip'"):
    losses.get_step_fn(sde, TinyScore(), True, optimize_fn=None, nonfinite='ignore')
  with pytest.raises(ValueError, match='continuous = True'):
    losses.get_step_fn(sde, TinyScore(), True, continuous=False)
  with pytest.raises(ValueError, match='score_matching_order to 1, 2 or 3'):
    losses.LossOptions(score_matching_order=0)
  with pytest.raises(ValueError, match="nonfinite is 'ignore': set it to 'stop' or 'skip'"):
    losses.LossOptions(nonfinite='ignore')
  loss_fn = losses.get_loss_from_score_fn(sde, losses.LossOptions(
    reduce_mean=True, likelihood_weighting=True, importance_weighting=True,
    score_matching_order=2, exact_jacobian=True))
  with pytest.raises(ValueError, match='exact_jacobian = False'):
    loss_fn(jax.random.PRNGKey(0), lambda x, t, rng=None: (-x, {}), {},
            {'image': jnp.zeros((2, 3))})
