"""Data parallelism over every device of every process: a 1-D mesh 'data', states replicated,
batches sharded along their batch axis, and the jitted multi-step functions of the loops."""
import jax
import jax.numpy as jnp
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
    if checkpoints.is_key(x):
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
  return x._numpy() if hasattr(x, '_numpy') else np.asarray(x)


def host_batch(ds_iter, scaler):
  """The next host batch of a tf.data iterator, scaled to the model's range, as numpy."""
  return {'image': np.asarray(scaler(to_numpy(next(ds_iter)['image'])), np.float32)}


# Backends that run the loops around a gradient outside the compiled program. XLA:CPU gives the
# transposed convolutions of a loop body (lax.scan, while_loop) a kernel layout its fast (Eigen)
# convolution does not take: the tiny DDPM++ train step ran 10-17x slower inside a one-step scan
# than bare (benchmarks/loops.py). There the steps of one call run as a Python loop over one
# jitted step, and the microbatches of a step are unrolled in it; elsewhere a lax.scan keeps one
# copy of the step to compile.
UNROLLED_BACKENDS = ('cpu',)
# Models without convolutions keep their speed in a compiled loop on every backend; the toy MLP's
# order-3 steps are 18% faster as a lax.scan on XLA:CPU, order 1 the same (benchmarks/loops.py
# --toy_only, Intel Xeon).
SCANNED_MODELS = ('mlp',)


def loops_unrolled(model=None):
  """True where loops around a gradient of `model` (config.model.name; None: a convolutional
  one) run outside the compiled program: on UNROLLED_BACKENDS, whose compiled loops give the
  transposed convolutions of a gradient a slow layout, for every model but SCANNED_MODELS."""
  return jax.default_backend() in UNROLLED_BACKENDS and model not in SCANNED_MODELS


def _over_steps(step_fn, mesh, n_consts, donate, model, start=None):
  """fn(state, batch, *consts) -> (state, metrics stacked over the steps): step_fn(state, row,
  *consts) on each row of the [n_jitted_steps, batch, ...] batch in turn, after start(state).

  One jitted lax.scan, or, where loops_unrolled(model), a Python loop over one jitted step that
  takes the row index as an argument (one compilation whatever n_jitted_steps)."""
  repl = replicated(mesh)
  consts = (repl,) * n_consts
  donated = (0,) if donate else ()
  if not loops_unrolled(model):
    def scanned(state, batch, *args):
      state = state if start is None else start(state)
      return jax.lax.scan(lambda s, b: step_fn(s, b, *args), state, batch)
    return jax.jit(scanned, in_shardings=(repl, batch_sharding(mesh)) + consts,
                   out_shardings=(repl, repl), donate_argnums=donated)

  def row_step(state, batch, i, *args):
    row = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False),
                                 batch)
    state, metrics = step_fn(state, row, *args)
    return state, jax.tree_util.tree_map(lambda m: m[None], metrics)

  row_step = jax.jit(row_step, in_shardings=(repl, batch_sharding(mesh), repl) + consts,
                     out_shardings=(repl, repl), donate_argnums=donated)
  start = start and jax.jit(start, in_shardings=repl, out_shardings=repl)
  stack = jax.jit(lambda rows: jax.tree_util.tree_map(lambda *m: jnp.concatenate(m), *rows),
                  out_shardings=repl)

  def looped(state, batch, *args):
    if start is not None:
      state = start(state)
    rows = []
    for i in range(jax.tree_util.tree_leaves(batch)[0].shape[0]):
      state, metrics = row_step(state, batch, np.int32(i), *args)
      rows.append(metrics)
    return state, rows[0] if len(rows) == 1 else stack(rows)

  return looped


def get_multi_step_fn(step_fn, mesh, donate=True, n_consts=0, model=None):
  """multi_step(state, batch, *consts) -> (new_state, metrics stacked over the steps): the
  n_jitted_steps rows of a [n_jitted_steps, batch, ...] batch, one training step each, with
  step_fn(state, batch, *consts); state and the n_consts constants (e.g. a frozen model's
  params) replicated, batch sharded along its batch axis. A jitted lax.scan, or a Python loop
  over the jitted step where loops_unrolled(model) (model: config.model.name)."""
  return _over_steps(step_fn, mesh, n_consts, donate, model)


def get_multi_eval_fn(eval_step_fn, mesh, n_consts=0, model=None):
  """Like get_multi_step_fn for evaluation: metrics only, the state untouched (its rng is
  folded so eval noise differs from the next training step's)."""
  fn = _over_steps(eval_step_fn, mesh, n_consts, donate=False, model=model,
                   start=lambda state: state.replace(rng=jax.random.fold_in(state.rng, 0x5eed)))
  return lambda state, batch, *consts: fn(state, batch, *consts)[1]


def host(x):
  """A global array (sharded or replicated, possibly over processes) -> numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sync(name):
  """A barrier of every process (no-op on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
