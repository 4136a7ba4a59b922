"""checkpoints.py: orbax round trip, latest-only pre-emption dir, fallback past a damaged
checkpoint, and import of a legacy score_sde flax-msgpack State (written here in that layout)."""
import glob
import logging
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoints
import restore_from


class _Net(nn.Module):
  """Conv + GroupNorm + Dense: the kinds of arrays NCSN++ holds."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.GroupNorm(num_groups=2)(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  model_state: dict
  params_ema: dict
  rng: jax.Array


def _state(seed=0, step=0):
  params = _Net().init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, 4, 3)))['params']
  tx = optax.chain(optax.clip_by_global_norm(1.), optax.adam(1e-3))
  return _State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                model_state={}, params_ema=jax.tree_util.tree_map(lambda p: p + 1., params),
                rng=jax.random.PRNGKey(seed + 100))


def _assert_same(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_numbering(tmp_path):
  d = checkpoints.CheckpointDir(tmp_path / 'checkpoints')
  s1, s2 = _state(1, step=10), _state(2, step=20)
  d.save(1, s1)
  d.save(2, s2)
  assert d.numbers() == [1, 2]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['checkpoint_1', 'checkpoint_2']
  assert d.training_step(2) == 20
  restored = d.restore(1, _state(7))
  _assert_same(restored, s1)
  assert isinstance(restored, _State)
  # Same number again overwrites (the original's overwrite=True).
  d.save(2, s1)
  assert d.numbers() == [1, 2] and d.training_step(2) == 10


# Restoring the truncated checkpoint fails inside orbax; tensorstore's pending reads then call back
# into orbax's closed asyncio loop, which Python reports as ignored exceptions (not ours to handle).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_latest_only_and_fallback_past_damaged(tmp_path, caplog):
  meta = checkpoints.CheckpointDir(tmp_path / 'checkpoints-meta', latest_only=True)
  periodic = checkpoints.CheckpointDir(tmp_path / 'checkpoints')
  periodic.save(1, _state(1, step=4))
  meta.save(1, _state(2, step=2))
  meta.save(2, _state(3, step=6))
  assert meta.numbers() == [2]
  state, path = checkpoints.restore_latest([meta, periodic], _state(9))
  assert path.endswith(os.path.join('checkpoints-meta', 'checkpoint_2'))
  assert int(state.step) == 6
  # Truncate every data file of the newest: restore falls back to the periodic one (step 4).
  for f in glob.glob(str(tmp_path / 'checkpoints-meta' / 'checkpoint_2' / 'state' / '**' / 'd' / '*'),
                     recursive=True):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)
  with caplog.at_level(logging.ERROR):
    state, path = checkpoints.restore_latest([meta, periodic], _state(9))
  assert path.endswith(os.path.join('checkpoints', 'checkpoint_1'))
  _assert_same(state, _state(1, step=4))
  bad = [r.getMessage() for r in caplog.records if 'corrupted or truncated' in r.getMessage()]
  assert len(bad) == 1 and os.path.join('checkpoints-meta', 'checkpoint_2') in bad[0]
  # Nothing to restore: the target comes back.
  empty = checkpoints.CheckpointDir(tmp_path / 'none')
  state, path = checkpoints.restore_latest([empty], _state(5))
  assert path is None and int(state.step) == 0


def _legacy_bytes(params, params_ema, step):
  """A State in the exact layout of score_sde/score_flow (flax.optim + Flax < 0.3.6 GroupNorm)."""

  def legacy(tree):
    tree = flax.serialization.to_state_dict(tree)
    def fix(path, v):
      name = jax.tree_util.keystr(path)
      v = np.asarray(v)
      return v.reshape(1, 1, 1, -1) if 'GroupNorm' in name and v.ndim == 1 else v
    return jax.tree_util.tree_map_with_path(fix, tree)

  state = {
    'step': np.asarray(step),
    'optimizer': {
      'target': legacy(params),
      'state': {'step': np.asarray(step), 'param_states': jax.tree_util.tree_map(
        lambda v: {'grad_ema': np.zeros_like(v), 'grad_sq_ema': np.zeros_like(v)}, legacy(params))},
    },
    'lr': np.float32(2e-4),
    'model_state': {},
    'ema_rate': np.float32(0.9999),
    'params_ema': legacy(params_ema),
    'rng': np.zeros(2, np.uint32),
  }
  return flax.serialization.msgpack_serialize(state)


def test_legacy_msgpack_import(tmp_path):
  src = _state(3)
  raw = _legacy_bytes(src.params, src.params_ema, step=1234)
  path = tmp_path / 'checkpoint_26'
  path.write_bytes(raw)
  # The file really holds 4-D GroupNorm arrays and optimizer.target.
  restored = flax.serialization.msgpack_restore(raw)
  assert restored['optimizer']['target']['GroupNorm_0']['scale'].shape == (1, 1, 1, 8)
  target = _state(0)
  params, params_ema, model_state, report = restore_from.load_weights(str(path), target, None)
  _assert_same(params, src.params)
  _assert_same(params_ema, src.params_ema)
  assert model_state == {}
  assert 'legacy flax msgpack' in report and '1234' in report
  assert '2 GroupNorm arrays per tree reshaped' in report


def test_orbax_checkpoint_import(tmp_path):
  src = _state(4, step=33)
  d = checkpoints.CheckpointDir(tmp_path / 'checkpoints')
  d.save(5, src)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for p in (tmp_path / 'checkpoints', tmp_path / 'checkpoints' / 'checkpoint_5'):
    params, params_ema, _, report = restore_from.load_weights(str(p), _state(0), sharding)
    _assert_same(params, src.params)
    _assert_same(params_ema, src.params_ema)
    assert 'orbax checkpoint' in report and '33' in report


def test_legacy_mismatch_lists_paths(tmp_path):
  src = _state(3)
  params = flax.serialization.to_state_dict(src.params)
  params = dict(params, Dense_0={'kernel': np.zeros((8, 5), np.float32)})  # bias gone, bad shape
  params['Extra_0'] = {'w': np.zeros(2, np.float32)}
  path = tmp_path / 'legacy.msgpack'
  path.write_bytes(_legacy_bytes(params, params, 0))
  with pytest.raises(ValueError) as e:
    restore_from.load_weights(str(path), _state(0), None)
  msg = str(e.value)
  assert '\n' not in msg
  assert 'missing in checkpoint: Dense_0/bias' in msg
  assert 'not in model: Extra_0/w' in msg
  assert 'Dense_0/kernel: checkpoint (8, 5) vs model (8, 3)' in msg


def test_check_readable(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    restore_from.check_readable(str(tmp_path / 'nope'))
  junk = tmp_path / 'junk.txt'
  junk.write_text('hello')
  with pytest.raises(ValueError, match='not a flax msgpack'):
    restore_from.check_readable(str(junk))
  with pytest.raises(ValueError, match='holds no checkpoint_N'):
    restore_from.check_readable(str(tmp_path))
