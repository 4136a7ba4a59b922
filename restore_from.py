"""A checkpoint read from a path the user gives: the one a training run starts from
(training.restore_from) and the one an evaluation or the dequantizer scores (eval.restore_from).
Ours (an orbax checkpoint_N or a folder of them) or a legacy flax msgpack of score_sde / score_flow
/ mle_score_ode (a State whose flax.optim `optimizer.target` holds the params), matched path for
path and shape for shape to the model of the config. `check_fits` does the matching on shapes
only, so that main.py can refuse a damaged or foreign file before any folder is made or data read;
`load_state` / `load_weights` load it for train_lib, `load_ema` for eval_lib and deq_lib.
"""
import logging
import os

import flax
import jax
import numpy as np

import checkpoints
import names
import parallel

FLAG = '--config.training.restore_from'
EVAL_FLAG = '--config.eval.restore_from'
WEIGHTS = ('params', 'params_ema', 'model_state')  # what training starts from
EMA = ('params_ema', 'model_state')  # what an evaluation scores, as score_sde's eval


def check_readable(path, flag=FLAG, one=False):
  """Raise FileNotFoundError / ValueError (one line, with the fix, naming `flag`) if `path` cannot
  be a checkpoint to read; cheap, reads no arrays except a legacy file's header. one: a directory
  must be a checkpoint_N itself (not a folder of them)."""
  dirs = 'a checkpoint_N directory' if one else 'a checkpoint_N directory, a checkpoints/ directory'
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint '{path}' does not exist: set {flag} to {dirs} or a "
                            'legacy score_sde/score_flow checkpoint file.')
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
  if checkpoints.checkpoint_number(path) is None and (one or not _step_dirs(path)):
    raise ValueError(f"Directory '{path}' {'is not a' if one else 'holds no'} checkpoint_N: set "
                     f'{flag} to {dirs} or a legacy checkpoint file.')


def _step_dirs(path):
  """Our checkpoint_N folders at `path` (itself one, or a folder of them), newest first."""
  if checkpoints.checkpoint_number(path) is not None:
    return [path]
  return [os.path.join(path, f'{checkpoints.PREFIX}_{n}')
          for n in names.checkpoint_numbers(path)[::-1]]


def _read_legacy(path, flag=FLAG):
  """legacy_state_parts of a flax msgpack file (ValueError, one line, if it cannot be read)."""
  with open(path, 'rb') as f:
    try:
      raw = flax.serialization.msgpack_restore(f.read())
    except Exception as e:
      raise ValueError(f"'{path}' cannot be read as flax msgpack ({type(e).__name__}: "
                       f'{checkpoints.short(e, 120)}): the file is damaged or not a checkpoint; '
                       f'set {flag} to another file.') from e
  return legacy_state_parts(raw, path)


def _read_source(path, sharding, shapes_only=False, flag=FLAG):
  """(parts, kind, path) of a checkpoint: parts holds host arrays of params, params_ema,
  model_state, step and, where stored, opt_state (ours), param_states (flax.optim's Adam
  moments), rng and nonfinite_count. shapes_only: for ours, array metadata (shapes) read without
  the arrays, and the step from its meta item."""
  check_readable(path, flag)
  if os.path.isfile(path):
    return _read_legacy(path, flag), 'legacy flax msgpack', path
  step_dirs = _step_dirs(path)
  for i, d in enumerate(step_dirs):
    try:
      if shapes_only:
        raw, meta = checkpoints.read_metadata(d)
        raw = dict(raw, step=(meta or {}).get('step'))
      else:
        raw = jax.tree_util.tree_map(checkpoints.to_host, checkpoints.restore_raw(d, sharding))
      break
    except Exception as e:
      if i == len(step_dirs) - 1:
        raise ValueError(f"Checkpoint '{d}' cannot be read ({type(e).__name__}: "
                         f'{checkpoints.short(e, 200)}): point {flag} at another checkpoint.') from e
      logging.error('Checkpoint %s is corrupted or truncated (%s); falling back to the previous '
                    'one.', d, checkpoints.short(e))
  parts = {k: raw.get(k) for k in ('params', 'params_ema', 'step', 'opt_state', 'rng',
                                    'nonfinite_count')}
  parts['model_state'] = raw.get('model_state', {})
  return parts, 'orbax checkpoint', d


def _source_step(src, path):
  """The training step `src` stores (ValueError when it stores none: weights only then)."""
  if src.get('step') is None:
    raise ValueError(f"'{path}' stores no training step: restore its weights only with "
                     '--config.training.restore_optimizer=False.')
  return int(np.asarray(src['step']).reshape(()))


def _adam_moments(src, path):
  """{'mu': tree, 'nu': tree} of a flax.optim file's per-parameter grad_ema / grad_sq_ema."""
  if src.get('param_states') is None:
    raise ValueError(f"'{path}' stores no optimizer state: restore its weights only with "
                     '--config.training.restore_optimizer=False.')
  return {name: _leaf_field(src['param_states'], key)
          for name, key in (('mu', 'grad_ema'), ('nu', 'grad_sq_ema'))}


def check_steps_left(path, step, n_iters):
  """ValueError unless training.n_iters is above the step `path` was trained (fine-tuning
  continues its step count)."""
  if step >= n_iters:
    raise ValueError(f'{path} was trained {step} steps, training.n_iters is {n_iters}: fine-tuning '
                     'continues its step count, so set --config.training.n_iters above it (or '
                     'restore_optimizer=False).')


def check_trees(src, target_state, keys=WEIGHTS):
  """ValueError (one line naming the first mismatch) unless the trees `keys` of `src` (parts as
  _read_source / legacy_state_parts give them) fit target_state's, on shapes only."""
  for k in keys:
    match_tree(src[k], flax.serialization.to_state_dict(getattr(target_state, k)), k, plan_only=True)


def check_fits(path, target_state, restore_optimizer=True, n_iters=None, keys=WEIGHTS, flag=FLAG):
  """ValueError (one line naming the first mismatch) unless `path` fits `target_state` (a
  TrainState of arrays or ShapeDtypeStructs, e.g. jax.eval_shape of the initial state) as
  load_state / load_weights (keys WEIGHTS) or load_ema (keys EMA, restore_optimizer=False) would
  load it: the same trees, on shapes only, no model built; messages name `flag`."""
  src, _, path = _read_source(path, None, shapes_only=True, flag=flag)
  check_trees(src, target_state, keys)
  if not restore_optimizer:
    return
  step = _source_step(src, path)
  if src.get('opt_state') is not None:
    match_tree(src['opt_state'], flax.serialization.to_state_dict(target_state.opt_state),
               'opt_state', plan_only=True)
  else:
    for tree in _adam_moments(src, path).values():
      match_tree(tree, flax.serialization.to_state_dict(target_state.params), 'params',
                 plan_only=True)
  if n_iters is not None:
    check_steps_left(path, step, n_iters)


def check_ema_fits(path, target_state, flag=EVAL_FLAG):
  """check_fits of what load_ema loads (a file or one checkpoint_N): the up-front check of a
  checkpoint to score, for eval_lib and deq_lib."""
  check_readable(path, flag, one=True)
  check_fits(path, target_state, restore_optimizer=False, keys=EMA, flag=flag)


def _matched(src, target_state, keys):
  """{key: src[key] matched (match_tree) and restored into target_state's tree}, notes."""
  out, notes = {}, {}
  for k in keys:
    target = getattr(target_state, k)
    tree, notes[k] = match_tree(src[k], jax.tree_util.tree_map(
      checkpoints.to_host, flax.serialization.to_state_dict(target)), name=k)
    out[k] = flax.serialization.from_state_dict(target, tree)
  return out, notes


def _report(kind, path, src, out, notes, tail):
  """The one log line saying what was loaded from where (out: params and params_ema, or
  params_ema alone)."""
  first = 'params' if 'params' in out else 'params_ema'
  n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(out[first]))
  n_reshaped = len(notes[first])
  step = src.get('step')
  no_ema = 'start the EMA' if first == 'params' else 'stand in for it'
  return (f'Loaded {kind} {path} (trained {int(step) if step is not None else "?"} steps): '
          f'{first} ({len(jax.tree_util.tree_leaves(out[first]))} arrays, {n_params:,} values), '
          + ('params_ema, ' if first == 'params' else '')
          + f'model_state ({len(jax.tree_util.tree_leaves(out["model_state"]))} arrays)'
          + (f'; {n_reshaped} GroupNorm arrays per tree reshaped from (1, 1, 1, C) to (C,)'
             if n_reshaped else '')
          + (f'; no params_ema in the file: its params {no_ema}' if src.get('no_ema') else '')
          + (f'. {tail}' if tail else '.'))


def load_weights(path, target_state, sharding):
  """(params, params_ema, model_state, report) from `path`, matched to target_state's trees.

  `path`: a legacy flax msgpack file (score_sde / score_flow / mle_score_ode State), one of our
  checkpoint_N directories, or a directory of checkpoint_N (the newest good one is used).
  Every path and shape is checked against our model; GroupNorm scale/bias stored as (1, 1, 1, C)
  by Flax < 0.3.6 are reshaped to (C,). Returned arrays are host numpy arrays.
  """
  src, kind, path = _read_source(path, sharding)
  out, notes = _matched(src, target_state, WEIGHTS)
  report = _report(kind, path, src, out, notes, 'Optimizer state and step start fresh.')
  return out['params'], out['params_ema'], out['model_state'], report


def load_ema(path, target_state, mesh, flag=EVAL_FLAG):
  """target_state (host) with the EMA params, model state and step of `path`, replicated over
  mesh: the weights an evaluation or the dequantizer scores, as score_sde's eval (params_ema; a
  legacy file without it: its params). `path` as load_weights reads it; what was loaded is
  logged on process 0."""
  src, kind, path = _read_source(path, parallel.replicated(mesh), flag=flag)
  out, notes = _matched(src, target_state, EMA)
  step = src.get('step')
  step = np.asarray(0 if step is None else step, np.int32).reshape(())
  if jax.process_index() == 0:
    logging.info('%s', _report(kind, path, src, out, notes, ''))
  return parallel.replicate(target_state.replace(step=step, **out), mesh)


def load_state(path, target_state, tx, sharding):
  """(host TrainState, report): the whole training state of `path` (as load_weights reads it) in
  target_state's structure: params, EMA, model state, the step and the Adam moments (ours: the
  optax state; flax.optim: grad_ema / grad_sq_ema and optimizer.state.step as optax's mu, nu and
  counts, so Adam and the learning-rate schedule continue), the rng where stored."""
  import optax
  src, kind, path = _read_source(path, sharding)
  out, notes = _matched(src, target_state, WEIGHTS)
  step = np.asarray(_source_step(src, path), np.int32)
  if src.get('opt_state') is not None:
    opt, _ = _matched(src, target_state, ('opt_state',))
    opt_state = opt['opt_state']
  else:
    moments = {name: _matched({'params': tree}, target_state, ('params',))[0]['params']
               for name, tree in _adam_moments(src, path).items()}
    count = np.asarray(src.get('opt_step', step), np.int32).reshape(())
    opt_state = optax.tree_utils.tree_set(tx.init(out['params']), count=count, **moments)
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
  """params / params_ema (its params where it has none: no_ema) / model_state / step, flax.optim's
  param_states and step, rng out of a restored legacy State dict."""
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
  state = opt.get('state') if isinstance(opt, dict) else None
  state = state if isinstance(state, dict) else {}
  return {'params': params, 'params_ema': params if params_ema is None else params_ema,
          'no_ema': params_ema is None, 'model_state': raw.get('model_state') or {},
          'step': raw.get('step'), 'param_states': state.get('param_states'),
          'opt_step': state.get('step'), 'rng': raw.get('rng')}


def _is_groupnorm_affine(path):
  """Whether a flat path names a GroupNorm scale / bias (stored (1, 1, 1, C) by Flax < 0.3.6)."""
  parts = path.split('/')
  return parts[-1] in ('scale', 'bias') and len(parts) > 1 and 'GroupNorm' in parts[-2]


def match_tree(src, target, name='params', plan_only=False):
  """`src` arranged as `target` (nested dicts): every path and shape must agree, except that a
  GroupNorm scale/bias of shape (1, 1, 1, C) becomes (C,). A single 'params' wrapper level on
  either side is tolerated. Raises ValueError listing all mismatches. Returns (tree, notes); with
  plan_only (leaves need only a .shape: metadata, ShapeDtypeStructs) checks and returns None."""
  src = src if src is not None else {}
  src_flat, tgt_flat = checkpoints.flatten(dict(src)), checkpoints.flatten(dict(target))
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
    shape, want = tuple(np.shape(src_flat[p])), tuple(np.shape(tgt_flat[p]))
    lead = len(shape) - len(want)
    if shape != want:
      if (_is_groupnorm_affine(p) and lead > 0 and all(d == 1 for d in shape[:lead])
          and shape[lead:] == want):
        notes.append(p)
      else:
        bad_shape.append(f'{p}: checkpoint {shape} vs model {want}')
        continue
    if not plan_only:
      out[p] = np.asarray(src_flat[p]).reshape(want).astype(np.asarray(tgt_flat[p]).dtype)
  if missing or unexpected or bad_shape:
    problems = ([f'missing in checkpoint: {p}' for p in missing]
                + [f'not in model: {p}' for p in unexpected] + [f'shape {s}' for s in bad_shape])
    shown = '; '.join(problems[:12]) + (f'; ... ({len(problems) - 12} more)' if len(problems) > 12 else '')
    raise ValueError(f'Checkpoint {name} do not match the model ({len(missing)} missing, '
                     f'{len(unexpected)} unexpected, {len(bad_shape)} wrong shapes): {shown}. '
                     'Use the config the checkpoint was trained with (model.* and data.* fields).')
  if plan_only:
    return None
  tree = checkpoints.unflatten(out)
  # Restore empty sub-dicts the target has (e.g. model_state {} collections).
  return _fill_empty(tree, dict(target)), notes


def _fill_empty(tree, target):
  """tree with the empty sub-dicts of target added (flatten drops them)."""
  if not isinstance(target, dict):
    return tree
  out = dict(tree)
  for k, v in target.items():
    if isinstance(v, dict):
      out[k] = _fill_empty(out.get(k, {}), v)
  return out
