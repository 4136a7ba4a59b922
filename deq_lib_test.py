"""Variational dequantization: the loss (losses.get_dequantization_loss_fn), the training step and
dequantize_fn of deq_lib on the 'tiny' Flow++ (4x4x3 images) with an analytic Gaussian score,
and the pipeline end to end on the tiny DIGITS config (slow).

Truths used: log q(noise | x) by brute force (log N(u) - log |det d noise / d u| from the full
Jacobian), the bound of bound_likelihood (tested against its closed form there), the 8-bit bins
of y, and E_q[log q] = KL(q || uniform) >= 0 on the unit cube.
"""
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bound_likelihood
import deq_lib
import losses
import sde_lib
from configs.base_config import get_base_config
from likelihood_test import Gaussian, GaussianScoreNet
from models import flowpp

ROOT = os.path.dirname(os.path.abspath(__file__))
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
  (new_state, score_params, _), metrics = jax.jit(step_fn)((s['state'], s['score_params'], {}),
                                                           batch)
  assert bool(metrics['finite']) and np.isfinite(float(metrics['loss']))
  assert int(new_state.step) == 1
  # The score params come back untouched (the loss depends on them: see the test above), and
  # every dequantizer leaf moves by Adam's first step (lr * sign(g), at most lr).
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
  assert deq_lib.deq_dir_of('/w', 'deq') == '/w/deq'
  assert deq_lib.deq_dir_of('w', os.path.join('w', 'deq')) == os.path.abspath('w/deq')
  assert deq_lib.deq_dir_of('w', '/abs/deq') == '/abs/deq'
  assert isinstance(tx, optax.GradientTransformation)


def test_bad_input(tmp_path):
  config = tiny_config()
  config.deq.model = 'huge'
  with pytest.raises(ValueError, match='deq.model'):
    deq_lib._check_config(config)  # pylint: disable=protected-access
  config = tiny_config()
  config.deq.n_iters = 0
  with pytest.raises(ValueError, match='deq.n_iters'):
    deq_lib._check_config(config)  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match='train_deq'):
    deq_lib.load_dequantizer(tiny_config(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match='train the score model'):
    deq_lib.load_score_model(tiny_config(), str(tmp_path), None)


CACHE = os.path.join(tempfile.gettempdir(), f'mle_score_ode_test_jax_cache_{os.getuid()}')


@pytest.mark.slow
def test_end_to_end_tiny_digits(tmp_path):
  """scripts/deq_demo.py at its smallest: run_lib.train (8 steps), train_deq (10 steps), a
  resumed rerun (+2 steps), dequantize_fn and ODE bits/dim, in one subprocess (its reruns then
  reuse the compiled programs through the persistent compilation cache).

  Not asserted: dequantized bpd < uniform bpd. For a score model trained a few steps the density
  is flat at the scale of one 8-bit bin, where the uniform q is optimal (E[bpd_correction] =
  KL(q || U) / (D ln 2) >= 0); the trained q approaches it (scripts/deq_demo.py, 60 score and 500
  dequantizer steps: correction 0.29 -> 0.005 bits/dim, deq - uniform = +0.004 +- 0.005)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', TF_CPP_MIN_LOG_LEVEL='2')
  wd = tmp_path / 'wd'
  r = subprocess.run([sys.executable, 'scripts/deq_demo.py', f'--workdir={wd}', '--score_steps=8',
                      '--deq_steps=10', '--resume_steps=2', '--n_eval=4'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  line = [l for l in r.stdout.splitlines() if l.startswith('RESULT ')][-1]
  res = json.loads(line[len('RESULT '):])
  print(res)
  log = (wd / 'deq' / 'stdout.txt').read_text()
  assert 'Resuming dequantizer training from' in log and 'at step 10.' in log
  assert 'step: 12, training_loss:' in log and 'eval_bpd' in log
  assert sorted(os.listdir(wd / 'deq' / 'checkpoints')) == ['checkpoint_1', 'checkpoint_6']
  assert np.isfinite(res['uniform_bpd']) and np.isfinite(res['deq_bpd'])
  # Training moves q toward the model's optimum; for a model this briefly trained that is close
  # to uniform, so the KL to uniform (the mean correction) drops.
  assert 0 < res['correction_trained'] < res['correction_init']
