"""Checkpoints of the TrainState in the score_sde layout, written with orbax.

workdir/checkpoints/checkpoint_N       periodic snapshots, N = step // snapshot_freq, all kept
workdir/checkpoints-meta/checkpoint_N  pre-emption snapshots, N = step // snapshot_freq_for_preemption,
                                       latest only

Each checkpoint_N holds two orbax items: `state` (the TrainState as a nested dict of arrays) and
`meta` (JSON: the training step and a CRC32 of every array). Orbax writes into a temporary
directory and renames it when complete, so a crash never leaves a half-written checkpoint_N (the
stale temporary directories of killed saves are removed when the directory is next opened for
writing). A checkpoint damaged afterwards (unreadable, truncated, or arrays whose bytes no longer
match the CRC32: orbax itself restores garbled bytes silently) is skipped on restore, with a log
line naming it, in favour of the previous good one.

The checkpoint a run starts from (training.restore_from: ours or a legacy flax msgpack of
score_sde / score_flow / mle_score_ode) is read and matched to the model in restore_from.py.
"""
import json
import logging
import os
import re
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
import orbax.checkpoint as ocp


PREFIX = 'checkpoint'
_NAME_RE = re.compile(r'^' + PREFIX + r'_(\d+)$')
FORMAT = 'mle_score_ode_jax/1'


# ------------------------------------------------------------------------------------------------
# pytree <-> plain nested dict of arrays
# ------------------------------------------------------------------------------------------------

def is_key(x):
  """Whether x is a typed PRNG key array (stored as its raw key data)."""
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_tree(state):
  """The state as a nested dict of arrays (typed PRNG keys stored as their raw key data)."""
  tree = flax.serialization.to_state_dict(state)
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def from_tree(target, tree):
  """Inverse of to_tree: restore `tree` (a nested dict) into the structure of `target`."""
  target_tree = flax.serialization.to_state_dict(target)
  tree = jax.tree_util.tree_map(
    lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if is_key(t) else x,
    target_tree, tree)
  return flax.serialization.from_state_dict(target, tree)


def _abstract(tree):
  """ShapeDtypeStructs (with sharding) describing a tree of concrete arrays."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def flatten(tree, prefix=''):
  """{'a/b/c': leaf} for a nested dict (empty dicts vanish)."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def unflatten(flat):
  out = {}
  for path, v in flat.items():
    node = out
    keys = path.split('/')
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return out


def to_host(x):
  """A numpy copy of a (possibly multi-process, replicated) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def tree_crc32(tree):
  """CRC32 over the paths, dtypes, shapes and bytes of every array of a nested dict (host copy)."""
  crc = 0
  for path, leaf in sorted(flatten(tree).items()):
    x = np.ascontiguousarray(to_host(leaf))
    crc = zlib.crc32(f'{path}:{x.dtype.str}:{x.shape};'.encode(), crc)
    crc = zlib.crc32(x.view(np.uint8).reshape(-1) if x.size else b'', crc)
  return crc


def _check_crc(tree, meta, path):
  """ValueError if `tree` does not match the CRC32 saved in `meta` (absent in old checkpoints)."""
  want = (meta or {}).get('crc32')
  if want is not None and tree_crc32(tree) != int(want):
    raise ValueError(f'Checkpoint {path} is corrupted: its arrays do not match the CRC32 stored '
                     'when it was written (bytes changed on disk).')


def checkpoint_number(path):
  """N from a path ending in checkpoint_N, else None."""
  m = _NAME_RE.match(os.path.basename(os.path.normpath(str(path))))
  return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------
# A directory of numbered checkpoints
# ------------------------------------------------------------------------------------------------

class CheckpointDir:
  """A directory of numbered checkpoints checkpoint_N of a TrainState (collective in multi-host:
  every process calls save/restore; orbax writes each array once)."""

  def __init__(self, directory, latest_only=False, create=True):
    self.directory = os.path.abspath(directory)
    self.latest_only = latest_only
    options = ocp.CheckpointManagerOptions(
      step_prefix=PREFIX, create=create, enable_async_checkpointing=False,
      read_only=not create, cleanup_tmp_directories=create)
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def numbers(self):
    """Numbers of the complete checkpoints, ascending (orbax ignores unfinished temp dirs)."""
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def path(self, number):
    return os.path.join(self.directory, f'{PREFIX}_{number}')

  def save(self, number, state):
    """Write checkpoint_<number> atomically; replaces an existing one with that number (as the
    original's overwrite=True); with latest_only, removes every other checkpoint afterwards."""
    step = int(to_host(state.step)) if hasattr(state, 'step') else None
    tree = to_tree(state)
    meta = {'step': step, 'format': FORMAT, 'crc32': tree_crc32(tree)}
    if number in self.numbers():
      self._mgr.delete(number)
    self._mgr.save(number, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    self._mgr.wait_until_finished()
    if self.latest_only:
      for n in self.numbers():
        if n != number:
          self._mgr.delete(n)
    return self.path(number)

  def training_step(self, number):
    """The training step stored with checkpoint_<number> (raises if the JSON is unreadable)."""
    meta = self._mgr.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return int(meta['step'])

  def restore(self, number, target):
    """checkpoint_<number> restored into the structure, dtypes and shardings of `target`;
    ValueError if its arrays do not match the CRC32 stored at save time."""
    out = self._mgr.restore(number, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(to_tree(target))), meta=ocp.args.JsonRestore()))
    _check_crc(out['state'], out['meta'], self.path(number))
    return from_tree(target, out['state'])

  def close(self):
    self._mgr.close()


def restore_latest(ckpt_dirs, target):
  """Restore the newest good checkpoint among `ckpt_dirs` (by training step; earlier dirs win
  ties). A damaged one is logged and skipped. Returns (state, path), or (target, None) if there
  is no checkpoint; ValueError if there are some but none is readable (starting afresh would
  overwrite them)."""
  candidates, damaged = [], []
  for rank, d in enumerate(ckpt_dirs):
    for n in d.numbers():
      try:
        step = d.training_step(n)
      except Exception as e:
        logging.error('Checkpoint %s is unreadable (%s: %s); falling back to the previous one.',
                      d.path(n), type(e).__name__, short(e))
        damaged.append(d.path(n))
        continue
      candidates.append((step, -rank, n, d))
  candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
  for step, _, n, d in candidates:
    try:
      state = d.restore(n, target)
    except Exception as e:
      logging.error('Checkpoint %s is corrupted or truncated (%s: %s); falling back to the '
                    'previous one.', d.path(n), type(e).__name__, short(e))
      damaged.append(d.path(n))
      continue
    return state, d.path(n)
  if damaged:
    raise ValueError(f'No readable checkpoint: {", ".join(damaged)} are damaged (see the log): '
                     'restore them from a copy, or move them out of the workdir to start afresh.')
  return target, None


def short(e, n=300):
  """str(e) on one line, cut at n characters."""
  s = ' '.join(str(e).split())
  return s if len(s) <= n else s[:n] + '...'


def read_metadata(step_dir):
  """(tree of array metadata with .shape / .dtype, meta JSON dict or None) of our checkpoint_N,
  read without its arrays."""
  item_dir = os.path.join(os.path.abspath(step_dir), 'state')
  # The item's tree metadata (the checkpointer's own metadata() looks for a step-level file the
  # item folder does not have, and warns).
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  meta_file = os.path.join(os.path.abspath(step_dir), 'meta', 'metadata')
  meta = None
  if os.path.isfile(meta_file):
    with open(meta_file) as f:
      meta = json.load(f)
  return getattr(tree, 'tree', tree), meta


def restore_raw(step_dir, sharding):
  """Our checkpoint_N as a nested dict (structure from its own metadata), arrays on `sharding`;
  ValueError if its arrays do not match the CRC32 in its meta item."""
  tree_meta, meta = read_metadata(step_dir)
  abstract = jax.tree_util.tree_map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree_meta)
  tree = ocp.StandardCheckpointer().restore(
    os.path.join(os.path.abspath(step_dir), 'state'), abstract)
  _check_crc(tree, meta, step_dir)
  return tree
