"""Variational dequantization: the loss (losses.get_dequantization_loss_fn), the training step and
dequantize_fn of deq_lib on the 'tiny' Flow++ (4x4x3 images) with an analytic Gaussian score
(the pipeline end to end through main.py: tests/deq_test.py).

Truths used: log q(noise | x) by brute force (log N(u) - log |det d noise / d u| from the full
Jacobian), the bound of bound_likelihood (tested against its closed form there), the 8-bit bins
of y, and E_q[log q] = KL(q || uniform) >= 0 on the unit cube.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bound_likelihood
import deq_lib
import losses
import names
import sde_lib
from configs.base_config import get_base_config
from likelihood_test import Gaussian, GaussianScoreNet
from models import flowpp

SHAPE = (4, 4, 4, 3)
DIM = 48
scaler = lambda x: 2. * x - 1.
inverse_scaler = lambda x: (x + 1.) / 2.


def tiny_config():
  config = get_base_config()
  config.deq.model = 'tiny'
  config.data.image_size = 4
  config.data.num_channels = 3
  config.data.centered = True
  config.deq.lr = 1e-3
  config.deq.warmup = 0
  return config


@pytest.fixture(scope='module')
def setup():
  """8-bit images, the tiny dequantizer (data-dependent init), VP SDE and a Gaussian score net."""
  config = tiny_config()
  rs = np.random.default_rng(0)
  images = rs.integers(0, 256, SHAPE).astype(np.float32) / 255.
  images[0, :2] = 0.  # saturated pixels, as in real data
  images[1, :2] = 1.
  deq_model, tx, state = deq_lib.init_deq_state(config, jax.random.PRNGKey(0), images)
  sde = sde_lib.VPSDE(0.1, 20., 1000)
  data = Gaussian(np.zeros(DIM), np.diag(np.full(DIM, 0.3)), SHAPE[1:])
  score_model = GaussianScoreNet('vp', data)
  score_params = score_model.init(jax.random.PRNGKey(1), jnp.zeros(SHAPE), jnp.ones(4))['params']
  return dict(config=config, images=jnp.asarray(images), deq_model=deq_model, tx=tx, state=state,
              sde=sde, data=data, score_model=score_model, score_params=score_params)


_JACOBIANS = {}


def brute_log_q(deq_model, params, u, x):
  """log N(u) - log |det d noise / d u| per example from the full (48 x 48) Jacobian."""
  if deq_model not in _JACOBIANS:
    def single(params, ui, xi):
      f = lambda v: deq_model.apply({'params': params}, v.reshape((1,) + xi.shape), xi[None])[0]
      return jax.jacfwd(lambda v: f(v).reshape(-1))(ui.reshape(-1))
    _JACOBIANS[deq_model] = jax.jit(jax.vmap(single, in_axes=(None, 0, 0)))
  jac = _JACOBIANS[deq_model](params, u, x)
  logdet = np.linalg.slogdet(np.asarray(jac, np.float64))[1]
  return np.asarray(flowpp.std_normal_logpdf(u), np.float64) - logdet


def test_loss_is_bound_of_dequantized_data_plus_brute_force_log_q(setup):
  s = setup
  loss_fn = losses.get_dequantization_loss_fn(s['sde'], s['score_model'], s['deq_model'], scaler,
                                              inverse_scaler, train=True, eps=1e-5)
  rng = jax.random.PRNGKey(3)
  batch = {'image': scaler(s['images'])}
  jitted = jax.jit(loss_fn)
  loss, bpd = jitted(rng, s['state'].params, s['score_params'], {}, batch)

  # Independently: the noise from u, its bin, log q by brute force, the one-sample bound.
  u_rng, _, bound_rng = jax.random.split(rng, 3)
  u = jax.random.normal(u_rng, SHAPE)
  noise, _ = s['deq_model'].apply({'params': s['state'].params}, u, s['images'])
  y = (s['images'] * 255. + noise) / 256.
  assert np.all(np.floor(np.asarray(y, np.float64) * 256.) == np.round(s['images'] * 255.))
  log_q = brute_log_q(s['deq_model'], s['state'].params, u, s['images'])
  nll = jax.jit(lambda r, y: bound_likelihood.likelihood_bound(
    r, s['data'].score_fn(s['sde']), y, s['sde'], dsm=True, eps=1e-5, importance_weighting=True,
    offset=True, N=1))(bound_rng, scaler(y))
  expected = np.asarray(nll, np.float64) + log_q
  # float32 sums of terms of a few hundred nats each that cancel to a few nats
  scale = np.mean(np.abs(np.asarray(nll)) + np.abs(log_q))
  np.testing.assert_allclose(loss, expected.mean(), rtol=0, atol=2e-5 * scale)
  # Centered data: log2(d inverse_scaler / dx) + 8 = 7.
  np.testing.assert_allclose(bpd, (expected / (DIM * np.log(2.)) + 7.).mean(), rtol=0,
                             atol=2e-5 * scale / (DIM * np.log(2.)))
  assert np.isfinite(loss)
  # The loss depends on the score params (which the training step must leave alone).
  loss2, _ = jitted(rng, s['state'].params, {'scale': jnp.asarray(2.)}, {}, batch)
  assert abs(float(loss2) - float(loss)) > 1.


def test_step_trains_only_the_dequantizer(setup):
  s = setup
  step_fn = deq_lib.get_deq_step_fn(s['sde'], s['score_model'], s['deq_model'], scaler,
                                    inverse_scaler, s['tx'], train=True, ema_rate=0.9)
  batch = {'image': scaler(s['images'])}
  new_state, metrics = jax.jit(step_fn)(s['state'], batch, s['score_params'], {})
  assert bool(metrics['finite']) and np.isfinite(float(metrics['loss']))
  assert int(new_state.step) == 1
  # The score params are an input only (the loss depends on them: see the test above); every
  # dequantizer leaf moves by Adam's first step (lr * sign(g), at most lr).
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params,
                                 s['state'].params)
  leaves = jax.tree_util.tree_leaves(moved)
  assert max(leaves) <= 1e-3 * 1.001 and np.mean(np.asarray(leaves) > 0) > 0.9
  ema = jax.tree_util.tree_map(lambda e, p0, p1: float(jnp.max(jnp.abs(e - (0.9 * p0 + 0.1 * p1)))),
                               new_state.params_ema, s['state'].params, new_state.params)
  assert max(jax.tree_util.tree_leaves(ema)) < 1e-6


def test_dequantize_fn_bins_and_correction(setup):
  """y stays in x's 8-bit bin; bpd_correction = log q / (D ln 2) with the brute-force log q; its
  mean is KL(q || uniform) / (D ln 2) >= 0 (the freshly initialised flow is far from uniform)."""
  s = setup
  fn = deq_lib.make_dequantize_fn(s['deq_model'], s['state'].params)
  rng = jax.random.PRNGKey(7)
  y, corr = fn(rng, s['images'])
  assert corr.shape == (4,)
  k = np.round(np.asarray(s['images']) * 255.)
  y = np.asarray(y, np.float64)
  assert np.all((y * 256. >= k) & (y * 256. <= k + 1.))
  u = jax.random.normal(rng, SHAPE)
  np.testing.assert_allclose(corr, brute_log_q(s['deq_model'], s['state'].params, u,
                                               s['images']) / (DIM * np.log(2.)),
                             rtol=1e-4, atol=1e-4)
  many = np.concatenate([np.asarray(fn(jax.random.PRNGKey(i), s['images'])[1])
                         for i in range(16)])
  se = many.std(ddof=1) / np.sqrt(many.size)
  assert many.mean() > 0.05 and many.mean() > 4 * se, (many.mean(), se)


def test_deq_optimizer_and_dirs():
  config = tiny_config()
  config.deq.lr, config.deq.warmup, config.deq.grad_clip = 0.5, 4, 1e-3
  config.optim.lr, config.optim.warmup = 123., 0
  tx = deq_lib.get_deq_optimizer(config)
  params = {'w': jnp.ones(3)}
  opt_state = tx.init(params)
  lrs = []
  for _ in range(6):  # Adam's first steps move each weight by lr; clipping does not matter
    updates, opt_state = tx.update({'w': jnp.array([1e3, -1e3, 1e3])}, opt_state, params)
    lrs.append(float(jnp.abs(updates['w'][0])))
  np.testing.assert_allclose(lrs, [0., 0.125, 0.25, 0.375, 0.5, 0.5], rtol=1e-3)
  assert config.optim.lr == 123.  # the config is not modified
  assert names.deq_dir('/w', 'deq') == '/w/deq'
  assert names.deq_dir('w', os.path.join('sub', 'deq')) == os.path.join('w', 'sub', 'deq')
  assert names.deq_dir('w', '/abs/deq') == '/abs/deq'
  assert isinstance(tx, optax.GradientTransformation)


def test_deq_cosine_schedule_ends_at_deq_n_iters():
  """A cosine schedule decays over the dequantizer's steps, not the score model's."""
  import optim
  config = tiny_config()
  config.optim.schedule = 'cosine'
  config.training.n_iters, config.deq.n_iters, config.deq.warmup = 1000, 40, 4
  schedule = optim.get_lr_schedule(deq_lib.deq_optim_config(config))
  lr = float(config.deq.lr)
  np.testing.assert_allclose([schedule(4), schedule(22), schedule(40)], [lr, lr / 2, 0.],
                             atol=1e-6 * lr)


def test_bad_input(tmp_path):
  config = tiny_config()
  config.deq.model = 'huge'
  with pytest.raises(ValueError, match='deq.model'):
    deq_lib.check_config(config)
  config = tiny_config()
  config.deq.n_iters = 0
  with pytest.raises(ValueError, match='deq.n_iters'):
    deq_lib.check_config(config)
  with pytest.raises(FileNotFoundError, match='train_deq'):
    deq_lib.load_dequantizer(tiny_config(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match='train the score model'):
    deq_lib.load_score_model(tiny_config(), str(tmp_path), None)
  config = tiny_config()
  config.data.dataset = 'DIGITS'
  config.deq.model = 'auto'  # score_flow built no dequantizer for DIGITS
  with pytest.raises(ValueError, match='config.deq.model'):
    deq_lib.check_config(config)


def test_score_checkpoint_is_the_one_eval_ckpt_id_names(tmp_path):
  """train_deq takes checkpoint_{eval.ckpt_id} (score_flow's field), never the newest; a missing
  one is refused in one line naming the field, before the data, the model or the deq folder."""
  ckpts = tmp_path / 'checkpoints'
  for n in (1, 2):
    (ckpts / f'checkpoint_{n}').mkdir(parents=True)
  (ckpts / 'checkpoint_3.orbax-checkpoint-tmp-1').mkdir()  # an unfinished save is not one
  config = tiny_config()
  assert config.eval.ckpt_id == 1 and 'score_ckpt' not in config.deq
  found = deq_lib._score_checkpoint(config, str(tmp_path))
  assert found == (1, str(ckpts / 'checkpoint_1'))
  config.eval.ckpt_id = 26  # the original's default
  with pytest.raises(FileNotFoundError) as err:
    deq_lib.check_config(config, str(tmp_path))
  msg = str(err.value)
  assert '\n' not in msg and '--config.eval.ckpt_id' in msg and 'checkpoint_26' in msg
  assert 'holds checkpoint_1, checkpoint_2)' in msg
  with pytest.raises(FileNotFoundError, match='--config.eval.ckpt_id'):
    deq_lib.train_deq(config, str(tmp_path), 'deq')
  assert not (tmp_path / 'deq').exists()
  with pytest.raises(FileNotFoundError, match='train the score model first'):
    deq_lib.load_score_model(config, str(tmp_path / 'empty'), None)

