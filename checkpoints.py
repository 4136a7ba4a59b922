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

Also imports legacy flax-msgpack checkpoints of score_sde / score_flow / mle_score_ode (a State
whose `optimizer.target` holds the params) for fine-tuning.
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

import layout

PREFIX = 'checkpoint'
_NAME_RE = re.compile(r'^' + PREFIX + r'_(\d+)$')
FORMAT = 'mle_score_ode_jax/1'


# ------------------------------------------------------------------------------------------------
# pytree <-> plain nested dict of arrays
# ------------------------------------------------------------------------------------------------

def _is_key(x):
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_tree(state):
  """The state as a nested dict of arrays (typed PRNG keys stored as their raw key data)."""
  tree = flax.serialization.to_state_dict(state)
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_tree(target, tree):
  """Inverse of to_tree: restore `tree` (a nested dict) into the structure of `target`."""
  target_tree = flax.serialization.to_state_dict(target)
  tree = jax.tree_util.tree_map(
    lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
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
      except Exception as e:  # pylint: disable=broad-except
        logging.error('Checkpoint %s is unreadable (%s: %s); falling back to the previous one.',
                      d.path(n), type(e).__name__, _short(e))
        damaged.append(d.path(n))
        continue
      candidates.append((step, -rank, n, d))
  candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
  for step, _, n, d in candidates:
    try:
      state = d.restore(n, target)
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Checkpoint %s is corrupted or truncated (%s: %s); falling back to the '
                    'previous one.', d.path(n), type(e).__name__, _short(e))
      damaged.append(d.path(n))
      continue
    return state, d.path(n)
  if damaged:
    raise ValueError(f'No readable checkpoint: {", ".join(damaged)} are damaged (see the log): '
                     'restore them from a copy, or move them out of the workdir to start afresh.')
  return target, None


def _short(e, n=300):
  s = ' '.join(str(e).split())
  return s if len(s) <= n else s[:n] + '...'


# ------------------------------------------------------------------------------------------------
# Loading weights to start from (fine-tuning, evaluation): ours or legacy
# ------------------------------------------------------------------------------------------------

def check_readable(path):
  """Raise FileNotFoundError / ValueError (one line, with the fix) if `path` cannot be a
  checkpoint to start from; cheap, reads no arrays except a legacy file's header."""
  flag = '--config.training.restore_from'
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint to restore from '{path}' does not exist: set {flag} to a "
                            'checkpoint_N directory, a checkpoints/ directory or a legacy '
                            'score_sde/score_flow checkpoint file.')
  if os.path.isfile(path):
    if not os.access(path, os.R_OK):
      raise ValueError(f"Checkpoint file '{path}' is not readable: fix its permissions or set "
                       f'{flag} to another file.')
    with open(path, 'rb') as f:
      head = f.read(1)
    # A msgpack map starts with 0x80-0x8f (fixmap), 0xde or 0xdf.
    if not head or not (0x80 <= head[0] <= 0x8f or head[0] in (0xde, 0xdf)):
      raise ValueError(f"'{path}' is not a flax msgpack checkpoint: set {flag} to a legacy "
                       'score_sde/score_flow checkpoint file or one of our checkpoint_N '
                       'directories.')
    return
  if checkpoint_number(path) is None and not _step_dirs(path):
    raise ValueError(f"Directory '{path}' holds no checkpoint_N: set {flag} to a checkpoint_N "
                     'directory, a directory that contains them, or a legacy checkpoint file.')


def _step_dirs(directory):
  return layout.checkpoint_numbers(directory)[::-1]


def restore_raw(step_dir, sharding):
  """Our checkpoint_N as a nested dict (structure from its own metadata), arrays on `sharding`;
  ValueError if its arrays do not match the CRC32 in its meta item."""
  ckptr = ocp.StandardCheckpointer()
  item_dir = os.path.join(os.path.abspath(step_dir), 'state')
  # The item's tree metadata (the checkpointer's own metadata() looks for a step-level file the
  # item folder does not have, and warns).
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  meta = getattr(meta, 'tree', meta)
  abstract = jax.tree_util.tree_map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
  tree = ckptr.restore(item_dir, abstract)
  meta_file = os.path.join(os.path.abspath(step_dir), 'meta', 'metadata')
  if os.path.isfile(meta_file):
    with open(meta_file) as f:
      _check_crc(tree, json.load(f), step_dir)
  return tree


def _read_source(path, sharding):
  """(parts, kind, path) of a checkpoint to start from: parts holds host arrays of params,
  params_ema, model_state, step and, where stored, opt_state (ours), param_states (flax.optim's
  Adam moments), rng and nonfinite_count."""
  check_readable(path)
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      try:
        raw = flax.serialization.msgpack_restore(f.read())
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"'{path}' cannot be read as flax msgpack ({type(e).__name__}: "
                         f'{_short(e, 120)}): the file is damaged or not a checkpoint; set '
                         '--config.training.restore_from to another file.') from e
    return legacy_state_parts(raw, path), 'legacy flax msgpack', path
  step_dirs = [path] if checkpoint_number(path) is not None else [
    os.path.join(path, f'{PREFIX}_{n}') for n in _step_dirs(path)]
  for i, d in enumerate(step_dirs):
    try:
      raw = jax.tree_util.tree_map(to_host, restore_raw(d, sharding))
      break
    except Exception as e:  # pylint: disable=broad-except
      if i == len(step_dirs) - 1:
        raise ValueError(f"Checkpoint '{d}' cannot be read ({type(e).__name__}: {_short(e, 200)})"
                         ': point --config.training.restore_from at another checkpoint.') from e
      logging.error('Checkpoint %s is corrupted or truncated (%s); falling back to the previous '
                    'one.', d, _short(e))
  parts = {k: raw.get(k) for k in ('params', 'params_ema', 'step', 'opt_state', 'rng',
                                    'nonfinite_count')}
  parts['model_state'] = raw.get('model_state', {})
  return parts, 'orbax checkpoint', d


def _matched(src, target_state, names):
  """{name: src[name] matched (match_tree) and restored into target_state's tree}, notes."""
  out, notes = {}, {}
  for k in names:
    target = getattr(target_state, k)
    tree, notes[k] = match_tree(src[k], jax.tree_util.tree_map(
      to_host, flax.serialization.to_state_dict(target)), name=k)
    out[k] = flax.serialization.from_state_dict(target, tree)
  return out, notes


def _report(kind, path, src, out, notes, tail):
  n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(out['params']))
  n_reshaped = len(notes['params'])
  step = src.get('step')
  return (f'Loaded {kind} {path} (trained {int(step) if step is not None else "?"} steps): '
          f'params ({len(jax.tree_util.tree_leaves(out["params"]))} arrays, {n_params:,} values), '
          f'params_ema, model_state ({len(jax.tree_util.tree_leaves(out["model_state"]))} arrays)'
          + (f'; {n_reshaped} GroupNorm arrays per tree reshaped from (1, 1, 1, C) to (C,)'
             if n_reshaped else '') + f'. {tail}')


def load_weights(path, target_state, sharding):
  """(params, params_ema, model_state, report) from `path`, matched to target_state's trees.

  `path`: a legacy flax msgpack file (score_sde / score_flow / mle_score_ode State), one of our
  checkpoint_N directories, or a directory of checkpoint_N (the newest good one is used).
  Every path and shape is checked against our model; GroupNorm scale/bias stored as (1, 1, 1, C)
  by Flax < 0.3.6 are reshaped to (C,). Returned arrays are host numpy arrays.
  """
  src, kind, path = _read_source(path, sharding)
  out, notes = _matched(src, target_state, ('params', 'params_ema', 'model_state'))
  report = _report(kind, path, src, out, notes, 'Optimizer state and step start fresh.')
  return out['params'], out['params_ema'], out['model_state'], report


def load_state(path, target_state, tx, sharding):
  """(host TrainState, report): the whole training state of `path` (as load_weights reads it) in
  target_state's structure: params, EMA, model state, the step and the Adam moments (ours: the
  optax state; flax.optim: grad_ema / grad_sq_ema and optimizer.state.step as optax's mu, nu and
  counts, so Adam and the learning-rate schedule continue), the rng where stored."""
  import optax  # pylint: disable=import-outside-toplevel
  src, kind, path = _read_source(path, sharding)
  out, notes = _matched(src, target_state, ('params', 'params_ema', 'model_state'))
  if src.get('step') is None:
    raise ValueError(f"'{path}' stores no training step: restore its weights only with "
                     '--config.training.restore_optimizer=False.')
  step = np.asarray(src['step'], np.int32).reshape(())
  if src.get('opt_state') is not None:
    opt, _ = _matched(src, target_state, ('opt_state',))
    opt_state = opt['opt_state']
  elif src.get('param_states') is not None:
    moments = {}
    for name, key in (('mu', 'grad_ema'), ('nu', 'grad_sq_ema')):
      tree = _leaf_field(src['param_states'], key)
      moments[name] = _matched({'params': tree}, target_state, ('params',))[0]['params']
    count = np.asarray(src.get('opt_step', step), np.int32).reshape(())
    opt_state = optax.tree_utils.tree_set(tx.init(out['params']), count=count, **moments)
  else:
    raise ValueError(f"'{path}' stores no optimizer state: restore its weights only with "
                     '--config.training.restore_optimizer=False.')
  rng = src.get('rng')
  if rng is None or np.shape(rng) != np.shape(target_state.rng):
    rng = target_state.rng
  state = target_state.replace(
    step=step, opt_state=opt_state, rng=np.asarray(rng, np.uint32),
    nonfinite_count=np.asarray(src.get('nonfinite_count', 0), np.int32).reshape(()), **out)
  report = _report(kind, path, src, out, notes,
                   f'Adam moments and step {int(step)} continue (the learning-rate schedule too).')
  return state, report


def _leaf_field(tree, key):
  """flax.optim's param_states (a dict per parameter) -> the tree of their `key` arrays."""
  if isinstance(tree, dict) and key in tree and not isinstance(tree[key], dict):
    return tree[key]
  if not isinstance(tree, dict):
    raise ValueError(f'flax.optim param_states lack {key}: not an Adam checkpoint; use '
                     '--config.training.restore_optimizer=False.')
  return {k: _leaf_field(v, key) for k, v in tree.items()}


def legacy_state_parts(raw, path='<legacy>'):
  """params / params_ema / model_state / step out of a restored legacy State dict."""
  if not isinstance(raw, dict):
    raise ValueError(f"'{path}' does not hold a State dict: give a score_sde/score_flow checkpoint.")
  opt = raw.get('optimizer')
  if isinstance(opt, dict) and 'target' in opt:
    params = opt['target']
  elif 'params' in raw:
    params = raw['params']
  else:
    raise ValueError(f"'{path}' has neither optimizer.target nor params (keys: "
                     f"{', '.join(sorted(raw))}): give a score_sde/score_flow checkpoint.")
  params_ema = raw.get('params_ema')
  if params_ema is None:
    logging.warning('%s has no params_ema; using its params for the EMA too.', path)
    params_ema = params
  state = opt.get('state') if isinstance(opt, dict) else None
  state = state if isinstance(state, dict) else {}
  return {'params': params, 'params_ema': params_ema, 'model_state': raw.get('model_state') or {},
          'step': raw.get('step'), 'param_states': state.get('param_states'),
          'opt_step': state.get('step'), 'rng': raw.get('rng')}


def _is_groupnorm_affine(path):
  parts = path.split('/')
  return parts[-1] in ('scale', 'bias') and len(parts) > 1 and 'GroupNorm' in parts[-2]


def match_tree(src, target, name='params'):
  """`src` arranged as `target` (nested dicts): every path and shape must agree, except that a
  GroupNorm scale/bias of shape (1, 1, 1, C) becomes (C,). A single 'params' wrapper level on
  either side is tolerated. Raises ValueError listing all mismatches. Returns (tree, notes)."""
  src = src if src is not None else {}
  src_flat, tgt_flat = flatten(dict(src)), flatten(dict(target))
  # Tolerate {'params': {...}} on one side only.
  if src_flat and tgt_flat:
    s_wrapped = all(p.startswith('params/') for p in src_flat)
    t_wrapped = all(p.startswith('params/') for p in tgt_flat)
    if s_wrapped and not t_wrapped:
      src_flat = {p[len('params/'):]: v for p, v in src_flat.items()}
    elif t_wrapped and not s_wrapped:
      src_flat = {'params/' + p: v for p, v in src_flat.items()}
  missing = sorted(set(tgt_flat) - set(src_flat))
  unexpected = sorted(set(src_flat) - set(tgt_flat))
  out, notes, bad_shape = {}, [], []
  for p in sorted(set(tgt_flat) & set(src_flat)):
    v = np.asarray(src_flat[p])
    want = tuple(np.shape(tgt_flat[p]))
    if v.shape != want:
      if (_is_groupnorm_affine(p) and v.size == int(np.prod(want)) and v.ndim > len(want)
          and all(d == 1 for d in v.shape[:v.ndim - len(want)])
          and v.shape[v.ndim - len(want):] == want):
        notes.append(p)
        v = v.reshape(want)
      else:
        bad_shape.append(f'{p}: checkpoint {v.shape} vs model {want}')
        continue
    out[p] = v.astype(np.asarray(tgt_flat[p]).dtype)
  if missing or unexpected or bad_shape:
    problems = ([f'missing in checkpoint: {p}' for p in missing]
                + [f'not in model: {p}' for p in unexpected] + [f'shape {s}' for s in bad_shape])
    shown = '; '.join(problems[:12]) + (f'; ... ({len(problems) - 12} more)' if len(problems) > 12 else '')
    raise ValueError(f'Checkpoint {name} do not match the model ({len(missing)} missing, '
                     f'{len(unexpected)} unexpected, {len(bad_shape)} wrong shapes): {shown}. '
                     'Use the config the checkpoint was trained with (model.* and data.* fields).')
  tree = unflatten(out)
  # Restore empty sub-dicts the target has (e.g. model_state {} collections).
  return _fill_empty(tree, dict(target)), notes


def _fill_empty(tree, target):
  if not isinstance(target, dict):
    return tree
  out = dict(tree)
  for k, v in target.items():
    if isinstance(v, dict):
      out[k] = _fill_empty(out.get(k, {}), v)
  return out

