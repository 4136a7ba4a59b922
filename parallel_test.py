"""The multi-step functions run the same steps whether the loop is compiled (lax.scan, as on
accelerators) or a Python loop over the jitted step (parallel.loops_unrolled(), XLA:CPU): same
metrics, parameters, optimizer state, EMA, rng and step count, up to float rounding."""
import jax
import numpy as np
import pytest

import parallel
import sde_lib
import train_lib
from configs.tiny import digits_ddpmpp
from configs.toy import checkerboard_ve

CALLS = 1


def _digits_config():
  config = digits_ddpmpp.get_config()
  config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 8, (1,), ()
  config.data.image_size = 8
  config.training.batch_size = 8
  config.training.n_jitted_steps = 2
  config.training.likelihood_weighting = config.training.importance_weighting = True
  return config


def _toy_config():
  config = checkerboard_ve.get_config()
  config.training.batch_size = 64
  config.training.n_jitted_steps = 5
  config.training.score_matching_order = 3
  return config


def _run(config, scanned, monkeypatch):
  """(train metrics of each call, eval metrics, final state): CALLS training calls of
  n_jitted_steps steps each, then one evaluation call, on fixed random batches."""
  monkeypatch.setattr(parallel, 'UNROLLED_BACKENDS', () if scanned else ('cpu',))
  monkeypatch.setattr(parallel, 'SCANNED_MODELS', ())  # the toy MLP's loop too
  assert parallel.loops_unrolled(config.model.name) != scanned
  t = config.training
  sde, _ = sde_lib.get_sde(config)
  model, tx, state = train_lib.build_state(config, jax.random.PRNGKey(0))
  train_fn, eval_fn = train_lib.get_step_fns(config, sde, model, tx)
  mesh = parallel.make_mesh()
  state = parallel.replicate(state, mesh)
  train = parallel.get_multi_step_fn(train_fn, mesh, model=config.model.name)
  evaluate = parallel.get_multi_eval_fn(eval_fn, mesh, model=config.model.name)
  shape = (t.n_jitted_steps, t.batch_size) + tuple(
    [config.data.image_size, config.data.image_size, config.data.num_channels]
    if config.data.dataset == 'DIGITS' else [config.data.dim])
  rng = np.random.RandomState(1)
  metrics = []
  for _ in range(CALLS):
    batch = parallel.global_batch({'image': rng.uniform(-1, 1, shape).astype(np.float32)}, mesh)
    state, m = train(state, batch)
    metrics.append(jax.device_get(m))
  batch = parallel.global_batch({'image': rng.uniform(-1, 1, shape).astype(np.float32)}, mesh)
  return metrics, jax.device_get(evaluate(state, batch)), jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize('make_config', [_digits_config, _toy_config], ids=['digits', 'toy'])
def test_looped_steps_equal_the_scanned_steps(make_config, monkeypatch):
  looped = _run(make_config(), False, monkeypatch)
  scanned = _run(make_config(), True, monkeypatch)
  (m_loop, e_loop, s_loop), (m_scan, e_scan, s_scan) = looped, scanned
  for a, b in zip(m_loop + [e_loop], m_scan + [e_scan]):
    assert a.keys() == b.keys()
    for k in a:
      assert np.shape(a[k]) == np.shape(b[k])
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert int(s_loop.step) == int(s_scan.step) == CALLS * make_config().training.n_jitted_steps
  np.testing.assert_array_equal(s_loop.rng, s_scan.rng)
  for a, b in zip(jax.tree_util.tree_leaves((s_loop.params, s_loop.params_ema, s_loop.opt_state)),
                  jax.tree_util.tree_leaves((s_scan.params, s_scan.params_ema, s_scan.opt_state))):
    # Adam divides by sqrt(nu): a rounding difference in a near-zero gradient moves that
    # parameter's update by a fraction of a step.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_only_convolutional_models_unroll_on_cpu(monkeypatch):
  monkeypatch.setattr(parallel, 'UNROLLED_BACKENDS', (jax.default_backend(),))
  assert parallel.loops_unrolled() and parallel.loops_unrolled('ncsnpp')
  assert not parallel.loops_unrolled('mlp')
  monkeypatch.setattr(parallel, 'UNROLLED_BACKENDS', ())
  assert not parallel.loops_unrolled('ncsnpp')
