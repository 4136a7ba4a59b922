"""training.restore_from continues a checkpoint whole (as the original resumed released ones): a
flax.optim msgpack written here in score_sde's layout gives Adam moments, step and schedule that
the first update continues, checked against Adam computed by hand; bad files are refused (by the
CLI before the workdir is made: tests/train_test.py), and so are bad files to score
(eval.restore_from); the released checkpoints' trees fit their configs, on shapes."""
import gzip
import json
import os

import flax
import jax
import numpy as np
import pytest

import checkpoints
import configs
import deq_lib
import eval_lib
import restore_from
import train_lib
from configs.tiny import digits_ddpmpp, digits_deq
from configs.toy import mog1d_ve

STEP, WARMUP, LR, B1, B2 = 7, 10, 1e-2, 0.9, 0.999


def _config(tmp_path, legacy, **training):
  config = mog1d_ve.get_config()
  config.optim.warmup = WARMUP
  config.optim.lr = LR
  config.optim.beta1 = B1
  t = config.training
  t.batch_size = 64
  t.n_iters = STEP + 1
  t.n_jitted_steps = 1
  t.log_freq = 1
  t.snapshot_freq = t.snapshot_freq_for_preemption = t.eval_freq = 1000  # the final save only
  t.snapshot_sampling = False
  t.progress_bar = False
  t.restore_from = str(legacy)
  for k, v in training.items():
    setattr(t, k, v)
  return config


def write_flax_optim(path, params, seed, step=STEP):
  """score_sde's State, as flax.optim wrote it: optimizer.{target, state.{step,
  param_states.*.{grad_ema, grad_sq_ema}}}, with random float32 Adam moments (numpy: no JAX op
  to compile per shape); returns (mu, nu)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  r = np.random.RandomState(seed)
  mu = [(0.01 * r.randn(*np.shape(x))).astype(np.float32) for x in leaves]
  nu = [(1e-4 * r.rand(*np.shape(x)) + 1e-6).astype(np.float32) for x in leaves]
  per_param = jax.tree_util.tree_unflatten(
    treedef, [{'grad_ema': m, 'grad_sq_ema': n} for m, n in zip(mu, nu)])
  host = jax.tree_util.tree_map(np.asarray, params)
  state = {'step': np.asarray(step),
           'optimizer': {'target': host, 'state': {'step': np.asarray(step),
                                                   'param_states': per_param}},
           'lr': np.float32(LR), 'model_state': {}, 'ema_rate': np.float32(0.999),
           'params_ema': host, 'rng': np.asarray([3, 4], np.uint32)}
  path.write_bytes(flax.serialization.msgpack_serialize(state))
  return (jax.tree_util.tree_unflatten(treedef, mu), jax.tree_util.tree_unflatten(treedef, nu))


def _adam(opt_state):
  states = [s for s in jax.tree_util.tree_leaves(
    opt_state, is_leaf=lambda s: hasattr(s, 'mu')) if hasattr(s, 'mu')]
  assert len(states) == 1
  return states[0]


def test_flax_optim_checkpoint_continues_adam_and_step(tmp_path):
  config = _config(tmp_path, tmp_path / 'checkpoint_7')
  _, _, fresh = train_lib.build_state(config, jax.random.PRNGKey(1))
  mu, nu = write_flax_optim(tmp_path / 'checkpoint_7', fresh.params, 2)
  state = train_lib.train(config, str(tmp_path / 'wd'))
  adam = _adam(state.opt_state)
  assert int(state.step) == STEP + 1 and int(adam.count) == STEP + 1
  # The gradient g of that step, from the first moment; the second moment must then be the
  # continued one, and the update Adam's at t = STEP + 1 with the warm-up lr of step STEP.
  lr = LR * STEP / WARMUP
  t = STEP + 1

  def check(p0, m0, v0, m1, v1, p1):
    p0, m0, v0, m1, v1, p1 = (np.asarray(x, np.float64) for x in (p0, m0, v0, m1, v1, p1))
    g = (m1 - B1 * m0) / (1 - B1)
    np.testing.assert_allclose(v1, B2 * v0 + (1 - B2) * g ** 2, rtol=2e-4, atol=1e-9)
    step = (m1 / (1 - B1 ** t)) / (np.sqrt(v1 / (1 - B2 ** t)) + config.optim.eps)
    # float32 steps: agreement to 1e-4 of the update's size (lr), far below the update itself.
    np.testing.assert_allclose(p1, p0 - lr * (step + config.optim.weight_decay * p0), rtol=0,
                               atol=1e-4 * lr)
    assert np.max(np.abs(g)) > 0

  jax.tree_util.tree_map(check, fresh.params, mu, nu, adam.mu, adam.nu, state.params)


def test_weights_only_starts_a_fresh_optimizer(tmp_path):
  config = _config(tmp_path, tmp_path / 'checkpoint_7', restore_optimizer=False, n_iters=1)
  _, _, fresh = train_lib.build_state(config, jax.random.PRNGKey(1))
  write_flax_optim(tmp_path / 'checkpoint_7', fresh.params, 2)
  state = train_lib.train(config, str(tmp_path / 'wd'))
  assert int(state.step) == 1 and int(_adam(state.opt_state).count) == 1
  # lr 0 at the first warm-up step: the weights are the loaded ones.
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, fresh.params)


def test_own_checkpoint_restores_the_whole_state(tmp_path):
  base = train_lib.train(_config(tmp_path, '', n_iters=3), str(tmp_path / 'base'))
  config = _config(tmp_path, tmp_path / 'base' / 'checkpoints', n_iters=4)
  _, tx, target = train_lib.build_state(config, jax.random.PRNGKey(5))
  loaded, report = restore_from.load_state(str(tmp_path / 'base' / 'checkpoints'), target, tx, None)
  assert 'step 3 continue' in report
  # The up-front check reads the same trees from the orbax metadata (shapes) and the step.
  restore_from.check_fits(str(tmp_path / 'base' / 'checkpoints'), target, True, 4)
  with pytest.raises(ValueError, match='trained 3 steps, training.n_iters is 3'):
    restore_from.check_fits(str(tmp_path / 'base' / 'checkpoints'), target, True, 3)
  want, got = checkpoints.to_tree(base), checkpoints.to_tree(loaded)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  state = train_lib.train(config, str(tmp_path / 'wd'))
  assert int(state.step) == 4 and int(_adam(state.opt_state).count) == 4


def test_bad_files_are_refused_in_one_line(tmp_path):
  config = _config(tmp_path, tmp_path / 'checkpoint_7')
  _, _, fresh = train_lib.build_state(config, jax.random.PRNGKey(1))
  path = tmp_path / 'checkpoint_7'
  write_flax_optim(path, fresh.params, 2)
  good = path.read_bytes()
  path.write_bytes(good[:len(good) // 2])  # truncated
  with pytest.raises(ValueError, match='cannot be read as flax msgpack') as e:
    restore_from.load_state(str(path), fresh, None, None)
  assert '\n' not in str(e.value)
  other = {'step': np.asarray(1), 'optimizer': {'target': {'Dense_9': {'kernel': np.ones(3)}}}}
  path.write_bytes(flax.serialization.msgpack_serialize(other))  # another model's tree
  with pytest.raises(ValueError, match='do not match the model') as e:
    restore_from.load_state(str(path), fresh, None, None)
  assert '\n' not in str(e.value)
  path.write_bytes(good)
  config.training.n_iters = STEP  # nothing left to train after the checkpoint's step
  with pytest.raises(ValueError, match='n_iters'):
    train_lib.train(config, str(tmp_path / 'wd'))


def _tiny_params(**model):
  """Zero params of the DIGITS DDPM++ that the end-to-end tests shrink (with `model` overrides), from
  jax.eval_shape: nothing compiled."""
  config = digits_ddpmpp.get_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  for k, v in model.items():
    setattr(config.model, k, v)
  state = jax.eval_shape(lambda r: train_lib.build_state(config, r)[2], jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), state.params)


def foreign_file(path, damage):
  """A start checkpoint at path: 'truncated' (a flax.optim file cut short), 'another model' (a
  State of a one-layer net) or 'wrong config' (the DIGITS model at nf 16 instead of 32)."""
  if damage == 'another model':
    path.write_bytes(flax.serialization.msgpack_serialize(
      {'step': np.asarray(1), 'optimizer': {'target': {'Dense_9': {'kernel': np.ones(3)}}}}))
    return
  write_flax_optim(path, _tiny_params(nf=16 if damage == 'wrong config' else 32),
                   2)
  if damage == 'truncated':
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize('damage,words', [
  ('truncated', ['cannot be read as flax msgpack']),
  ('another model', ['do not match the model', 'missing in checkpoint: AttnBlockpp_0/']),
  ('wrong config', ['do not match the model', 'shape AttnBlockpp_0/GroupNorm_0/bias: '
                    'checkpoint (16,) vs model (32,)'])])
def test_foreign_start_refused_by_shapes(tmp_path, damage, words):
  """train_lib.check_restore_from, what main.py runs before it makes the workdir."""
  path = tmp_path / 'checkpoint_26'
  foreign_file(path, damage)
  config = digits_ddpmpp.get_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.training.restore_from = str(path)
  with pytest.raises(ValueError) as e:
    train_lib.check_restore_from(config, str(tmp_path / 'wd'))
  assert '\n' not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
  assert not (tmp_path / 'wd').exists()
  # A workdir with checkpoints resumes them and ignores restore_from: nothing to refuse.
  (tmp_path / 'resume' / 'checkpoints' / 'checkpoint_1').mkdir(parents=True)
  train_lib.check_restore_from(config, str(tmp_path / 'resume'))



@pytest.mark.parametrize('mode', ['eval', 'train_deq'])
@pytest.mark.parametrize('damage,words', [
  ('truncated', ['cannot be read as flax msgpack', '--config.eval.restore_from']),
  ('another model', ['Checkpoint params_ema do not match the model',
                     'missing in checkpoint: AttnBlockpp_0/']),
  ('wrong config', ['do not match the model', 'shape AttnBlockpp_0/GroupNorm_0/bias: '
                    'checkpoint (16,) vs model (32,)'])])
def test_foreign_file_to_score_refused_by_shapes(tmp_path, mode, damage, words):
  """eval.restore_from: eval_lib.check_restore_from / deq_lib.check_config, what main.py runs
  before it makes the eval or dequantizer folder; a fitting file passes."""
  path = tmp_path / 'checkpoint_26'
  foreign_file(path, damage)
  config = digits_deq.get_config()  # the DIGITS DDPM++ of _tiny_params
  config.eval.restore_from = str(path)
  check = eval_lib.check_restore_from if mode == 'eval' else deq_lib.check_config
  with pytest.raises(ValueError) as e:
    check(config, str(tmp_path / 'wd'))
  assert '\n' not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
  write_flax_optim(path, _tiny_params(), 2)
  check(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


RELEASED = ('configs/ve/cifar10_ncsnpp_continuous.py',  # score_sde's checkpoint_26
            'configs/vp/cifar10_ddpmpp_deep_continuous.py')  # score_flow's checkpoint_19
TREES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models', 'testdata',
                     'param_trees.json.gz')


def _released_state(config_path):
  """The score_sde State of a released checkpoint as ShapeDtypeStructs: the original param tree
  (models/testdata) as optimizer.target and params_ema, GroupNorm stored (1, 1, 1, C)."""
  with gzip.open(TREES, 'rt') as f:
    arrays = json.load(f)[config_path]['arrays']
  flat = {}
  for p, shape in arrays.items():
    p = p[len('params/'):]
    if restore_from._is_groupnorm_affine(p):
      shape = [1, 1, 1, *shape]
    flat[p] = jax.ShapeDtypeStruct(tuple(shape), np.float32)
  tree = checkpoints.unflatten(flat)
  return {'step': np.asarray(1), 'optimizer': {'target': tree}, 'params_ema': tree,
          'model_state': {}}


@pytest.mark.parametrize('config_path', RELEASED)
def test_released_trees_fit_their_configs(config_path):
  """What check_fits matches a released file against, on shapes only (jax.eval_shape): its
  trees fit the config to fine-tune (WEIGHTS) and to score (EMA); the other one's do not."""
  target = train_lib.abstract_state(configs.load(config_path))
  parts = restore_from.legacy_state_parts(_released_state(config_path))
  restore_from.check_trees(parts, target, restore_from.WEIGHTS)
  restore_from.check_trees(parts, target, restore_from.EMA)
  other = RELEASED[1 - RELEASED.index(config_path)]
  with pytest.raises(ValueError, match='params_ema do not match the model'):
    restore_from.check_trees(restore_from.legacy_state_parts(_released_state(other)), target,
                             restore_from.EMA)
