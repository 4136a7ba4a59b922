"""train_lib's training step and samples.

training.n_microbatches: one update from microbatches equals the whole-batch update. The step draws t, z and v for the whole batch and sums the microbatches' gradients (lax.scan), so
parameters after several updates agree with the unsplit step's to float rounding, for orders 1-3,
with and without importance-sampled time and exact Jacobians, over n_jitted_steps scanned steps,
also under a remat policy. The 8-device mesh with microbatches is checked by
tests/train_test.py (test_eight_devices_same_losses).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import losses
import parallel
import sde_lib
import train_lib
from configs.toy import checkerboard_vp

STEPS = 2  # updates per jitted call, compared after all of them


def _config(order, importance, exact=False, n_micro=1, remat='none'):
  config = checkerboard_vp.get_config()
  t = config.training
  t.batch_size, t.n_jitted_steps = 64, STEPS
  config.model.encoder_layers, config.model.temb_dim, config.model.decoder_layers = (32,), 16, (64,)
  t.score_matching_order, t.exact_jacobian = order, exact
  t.likelihood_weighting = t.importance_weighting = importance
  t.n_microbatches, t.remat = n_micro, remat
  config.model.ema_rate = 0.9
  return config


def _train(config, built):
  """(state, metrics) after one jitted call of n_jitted_steps updates from built = build_state."""
  model, tx, state = built
  sde, _ = sde_lib.get_sde(config)
  step_fn = train_lib.get_step_fns(config, sde, model, tx)[0]
  multi = parallel.get_multi_step_fn(step_fn, parallel.make_mesh(), donate=False)
  batch = {'image': jax.random.uniform(jax.random.PRNGKey(1), (STEPS, 64, 2), minval=-4, maxval=4)}
  return multi(state, batch)


@pytest.mark.parametrize('order,importance,exact,remat,scan', [
  (1, True, False, 'none', False), (2, False, False, 'none', False),
  (3, True, False, 'none', True), (3, False, False, 'convs', False),
  (2, True, False, 'nothing', True), (3, False, True, 'nothing', False)])
def test_microbatches_give_the_whole_batch_update(order, importance, exact, remat, scan,
                                                  monkeypatch):
  """2 microbatches (and a remat policy, which changes memory only) = the whole-batch step; as
  a lax.scan (accelerators) and unrolled (CPU)."""
  if scan:
    monkeypatch.setattr(parallel, 'UNROLLED_BACKENDS', ())
  built = train_lib.build_state(_config(order, importance, exact), jax.random.PRNGKey(0))
  whole, m1 = _train(_config(order, importance, exact), built)
  split, m2 = _train(_config(order, importance, exact, n_micro=2, remat=remat), built)
  for key in ('loss', 'loss1', 'loss2', 'loss3'):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves((split.params, split.params_ema, split.opt_state)),
                  jax.tree_util.tree_leaves((whole.params, whole.params_ema, whole.opt_state))):
    # Adam divides by sqrt(nu): where a gradient is near 0 a rounding difference moves the update
    # by a fraction of a step (a few 1e-6 here, against updates of 1e-3).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  assert int(split.step) == int(whole.step) == STEPS
  # The updates moved the parameters far more than the tolerance above.
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
    jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(built[2].params)))
  assert moved > 1e-3


def test_microbatch_rows_are_strided():
  x = jnp.arange(12).reshape(12, 1)
  parts = losses.microbatches(x, 3)
  assert parts.shape == (3, 4, 1)
  np.testing.assert_array_equal(parts[1, :, 0], [1, 4, 7, 10])


def test_split_that_does_not_divide_is_refused():
  config = _config(1, False, n_micro=5)
  with pytest.raises(ValueError, match='n_microbatches=5'):
    _train(config, train_lib.build_state(config, jax.random.PRNGKey(0)))


def test_save_samples_grid(tmp_path):
  x = np.random.default_rng(0).uniform(size=(5, 3, 4, 1))
  train_lib.save_samples(x, str(tmp_path))
  png = np.asarray(Image.open(tmp_path / 'sample.png'))
  # 5 images, 2 per row -> 3 rows; 2 px padding; grey images become RGB.
  assert png.shape == (3 * (3 + 2) + 2, 2 * (4 + 2) + 2, 3)
  np.testing.assert_array_equal(png[2:5, 2:6, 0], np.clip(x[0, ..., 0] * 255 + .5, 0, 255).astype(np.uint8))
  np.testing.assert_allclose(np.load(tmp_path / 'sample.npz')['samples'], x)
