"""Data parallelism over every device of every process: a 1-D mesh 'data', states replicated,
batches sharded along their batch axis, and the jitted multi-step functions of the loops."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import checkpoints

DATA_AXIS = 'data'


def make_mesh():
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, batch_axis=1):
  """Sharding of [n_jitted_steps, batch, ...] arrays along the batch axis."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicate(tree, mesh):
  """Host values (identical on every process) -> global arrays replicated over the mesh."""
  sharding = replicated(mesh)

  def put(x):
    if checkpoints._is_key(x):  # pylint: disable=protected-access
      data = put(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = checkpoints.to_host(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree)


def global_batch(local_batch, mesh, batch_axis=1):
  """This process's [n_jitted_steps, per_host_batch, ...] -> the global array sharded along the
  batch axis (processes contribute their rows in process order)."""
  sharding = batch_sharding(mesh, batch_axis)
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_numpy(x):
  """A tf.Tensor (without a copy through TF's Python API) or array-like -> numpy."""
  return x._numpy() if hasattr(x, '_numpy') else np.asarray(x)  # pylint: disable=protected-access


def host_batch(ds_iter, scaler):
  """The next host batch of a tf.data iterator, scaled to the model's range, as numpy."""
  return {'image': np.asarray(scaler(to_numpy(next(ds_iter)['image'])), np.float32)}


def get_multi_step_fn(step_fn, mesh, donate=True, n_consts=0):
  """jit(lax.scan(step_fn)) over a [n_jitted_steps, batch, ...] batch: multi_step(state, batch,
  *consts) -> (new_state, metrics stacked over the scanned steps), with step_fn(state, batch,
  *consts); state and the n_consts constants (e.g. a frozen model's params) replicated, batch
  sharded along its batch axis."""
  repl = replicated(mesh)

  def multi_step(state, batch, *consts):
    return jax.lax.scan(lambda s, b: step_fn(s, b, *consts), state, batch)

  return jax.jit(multi_step, in_shardings=(repl, batch_sharding(mesh)) + (repl,) * n_consts,
                 out_shardings=(repl, repl), donate_argnums=(0,) if donate else ())


def get_multi_eval_fn(eval_step_fn, mesh, n_consts=0):
  """Like get_multi_step_fn for evaluation: metrics only, the state untouched (its rng is
  folded so eval noise differs from the next training step's)."""
  repl = replicated(mesh)

  def multi_eval(state, batch, *consts):
    state = state.replace(rng=jax.random.fold_in(state.rng, 0x5eed))
    return jax.lax.scan(lambda s, b: eval_step_fn(s, b, *consts), state, batch)[1]

  return jax.jit(multi_eval, in_shardings=(repl, batch_sharding(mesh)) + (repl,) * n_consts,
                 out_shardings=repl)


def host(x):
  """A global array (sharded or replicated, possibly over processes) -> numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sync(name):
  """A barrier of every process (no-op on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
