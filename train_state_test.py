"""TrainState: built from the real optimizer, it round-trips through orbax and flax serialization."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import optim
from configs.base_config import get_base_config
from train_state import TrainState, create_train_state


def _state(rng):
  config = get_base_config()
  config.optim.weight_decay = 1e-3
  params = {'dense': {'kernel': jnp.arange(6.).reshape(2, 3), 'bias': jnp.ones(3)}}
  tx = optim.get_optimizer(config)
  state = create_train_state(rng, config, None, params, {}, tx)
  updates, opt_state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state.opt_state,
                                 params)
  return state.replace(step=state.step + 3, opt_state=opt_state,
                       params=jax.tree_util.tree_map(lambda p, u: p + u + 1., params, updates),
                       nonfinite_count=state.nonfinite_count + 2), tx


def _assert_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fresh_state():
  state, _ = _state(jax.random.key(0))  # a typed key is stored as raw uint32 data
  fresh = create_train_state(jax.random.PRNGKey(0), get_base_config(), None, state.params, None,
                             optim.get_optimizer(get_base_config()))
  assert fresh.rng.dtype == jnp.uint32 and state.rng.dtype == jnp.uint32
  np.testing.assert_array_equal(fresh.rng, state.rng)
  assert int(fresh.step) == 0 and int(fresh.nonfinite_count) == 0 and fresh.model_state == {}
  _assert_equal(fresh.params_ema, fresh.params)
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(fresh))


def test_orbax_round_trip(tmp_path):
  state, tx = _state(jax.random.PRNGKey(3))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'ckpt', state)
  ckptr.wait_until_finished()
  target = create_train_state(jax.random.PRNGKey(0), None, None,
                              jax.tree_util.tree_map(jnp.zeros_like, state.params), {}, tx)
  restored = ckptr.restore(tmp_path / 'ckpt', target)
  assert isinstance(restored, TrainState)
  _assert_equal(restored, state)


def test_flax_state_dict_round_trip():
  import flax.serialization
  state, tx = _state(jax.random.PRNGKey(4))
  tree = flax.serialization.to_state_dict(state)
  assert set(tree) == {'step', 'params', 'opt_state', 'model_state', 'params_ema', 'rng',
                       'nonfinite_count'}
  target = create_train_state(jax.random.PRNGKey(0), None, None, state.params, {}, tx)
  _assert_equal(flax.serialization.from_state_dict(target, tree), state)
