"""Training (and, later, evaluation) pipelines of score_sde / score_flow / mle_score_ode in current
JAX: one jitted function runs n_jitted_steps training steps (lax.scan) data-parallel over every
device of every process (1-D mesh 'data'; batch sharded on its batch axis, state replicated).

Workdir layout (train):
  stdout.txt                    console log (process 0)
  tensorboard/                  TensorBoard events: training_loss[1-3], eval_loss[1-3]
  checkpoints/checkpoint_N      periodic, N = step // snapshot_freq (all kept)
  checkpoints-meta/checkpoint_N pre-emption, N = step // snapshot_freq_for_preemption (latest)
  samples/iter_STEP/sample.png, sample.npz   snapshot samples (EMA params) at each checkpoint

Eval folder layout (evaluate; workdir/eval_folder):
  stdout.txt, settings.json     log; the settings the stored results were made with
  ckpt_N/loss.npz               eval loss per batch of the eval split (EMA params)
  ckpt_N/bpd/batch_R_I.npz      per-example bpd (nll nats for toy data) and nfe of repeat R, batch I
  ckpt_N/samples/samples_R.npz  sampling round R: uint8 samples, Inception pool_3 and logits
  ckpt_N/summary.json           the checkpoint's means; summary.csv: one row per checkpoint
Every file is written to a temporary name and renamed, and every batch / round draws its noise
from fold_in(seed, checkpoint, part, repeat, batch), so a killed evaluation rerun with the same
command skips what is stored and ends with exactly the results of an uninterrupted run.
"""
import functools
import json
import logging
import math
import os
import time
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import checkpoints
import config_checks

DATA_AXIS = 'data'


class NonFiniteError(RuntimeError):
  """Training met a non-finite loss or gradient with training.nonfinite='stop'."""


# ------------------------------------------------------------------------------------------------
# Data parallelism
# ------------------------------------------------------------------------------------------------

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


def host_batch(ds_iter, scaler):
  """The next host batch of a tf.data iterator, scaled to the model's range, as numpy."""
  batch = next(ds_iter)
  image = batch['image']
  image = image._numpy() if hasattr(image, '_numpy') else np.asarray(image)  # pylint: disable=protected-access
  return {'image': np.asarray(scaler(image), np.float32)}


def get_multi_step_fn(step_fn, mesh, donate=True):
  """jit(lax.scan(step_fn)) over a [n_jitted_steps, batch, ...] batch: state replicated, batch
  sharded along its batch axis; returns (new_state, metrics stacked over the scanned steps)."""
  repl = replicated(mesh)

  def multi_step(state, batch):
    return jax.lax.scan(step_fn, state, batch)

  return jax.jit(multi_step, in_shardings=(repl, batch_sharding(mesh)), out_shardings=(repl, repl),
                 donate_argnums=(0,) if donate else ())


def get_multi_eval_fn(eval_step_fn, mesh):
  """Like get_multi_step_fn for evaluation: metrics only, the state untouched (its rng is
  folded so eval noise differs from the next training step's)."""
  repl = replicated(mesh)

  def multi_eval(state, batch):
    state = state.replace(rng=jax.random.fold_in(state.rng, 0x5eed))
    return jax.lax.scan(eval_step_fn, state, batch)[1]

  return jax.jit(multi_eval, in_shardings=(repl, batch_sharding(mesh)), out_shardings=repl)


# ------------------------------------------------------------------------------------------------
# Building blocks shared by train and the tests
# ------------------------------------------------------------------------------------------------

def build_state(config, rng):
  """(model, optimizer, host TrainState) freshly initialised from config."""
  import losses  # pylint: disable=import-outside-toplevel
  import train_state as ts  # pylint: disable=import-outside-toplevel
  from models import utils as mutils  # pylint: disable=import-outside-toplevel
  rng, init_rng = jax.random.split(rng)
  model = mutils.get_model(config.model.name)(config=config)
  # jit: eager flax init dispatches hundreds of small ops (seconds on a busy CPU); the jitted one
  # is compiled once and then served from the persistent compilation cache.
  init_model_state, initial_params = jax.jit(
    lambda r: tuple(mutils.init_model(r, config)[1:]))(init_rng)
  tx = losses.get_optimizer(config)
  state = ts.create_train_state(rng, config, model, initial_params, init_model_state, tx)
  return model, tx, state


def get_step_fns(config, sde, model, tx):
  """(train_step_fn, eval_step_fn) of losses.get_step_fn for this config and optimizer tx."""
  import losses  # pylint: disable=import-outside-toplevel
  t = config.training
  kwargs = dict(
    reduce_mean=t.reduce_mean, continuous=t.continuous,
    likelihood_weighting=t.likelihood_weighting, importance_weighting=t.importance_weighting,
    smallest_time=t.smallest_time, score_matching_order=t.score_matching_order,
    loss_weights=tuple(t.loss_weights), exact_jacobian=t.exact_jacobian,
    ema_rate=config.model.ema_rate, ema_start=config.model.get('ema_start', 0),
    nonfinite=t.nonfinite)
  train_fn = losses.get_step_fn(sde, model, train=True, optimize_fn=tx, **kwargs)
  eval_fn = losses.get_step_fn(sde, model, train=False, optimize_fn=tx, **kwargs)
  return train_fn, eval_fn


def _fmt_metrics(metrics, prefix):
  return ', '.join(f'{prefix}{k}: {v:.5e}' for k, v in metrics.items())


def _mean_metrics(metrics):
  """Mean over the scanned steps of every loss metric, as Python floats."""
  return {k: float(np.mean(checkpoints.to_host(v))) for k, v in metrics.items()
          if k.startswith('loss')}


def _first_nonfinite(metrics):
  """Index of the first scanned step whose metrics are non-finite, or None."""
  finite = checkpoints.to_host(metrics['finite']) if 'finite' in metrics else None
  losses_ = np.stack([np.atleast_1d(checkpoints.to_host(v)) for k, v in metrics.items()
                      if k.startswith('loss')])
  ok = np.all(np.isfinite(losses_), axis=0)
  if finite is not None:
    ok = ok & np.atleast_1d(finite).astype(bool)
  bad = np.flatnonzero(~ok)
  return int(bad[0]) if bad.size else None


class _Writer:
  """TensorBoard scalars on process 0 (no-op elsewhere)."""

  def __init__(self, tb_dir):
    self._w = None
    if jax.process_index() == 0:
      from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
      self._w = tensorboard.SummaryWriter(tb_dir)

  def scalars(self, metrics, step, prefix):
    if self._w is not None:
      for k, v in metrics.items():
        self._w.scalar(f'{prefix}_{k}', v, step)
      self._w.flush()

  def close(self):
    if self._w is not None:
      self._w.close()


def save_samples(sample, directory):
  """sample (B, H, W, C) in [0, 1] (or flat (B, D)) -> directory/sample.npz and sample.png."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  sample = np.asarray(sample)
  np.savez_compressed(os.path.join(directory, 'sample.npz'), samples=sample)
  if sample.ndim != 4:
    return
  images = np.clip(sample * 255. + 0.5, 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  nrow = max(1, int(np.sqrt(n)))
  ncol = int(np.ceil(n / nrow))
  pad = 2
  grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
  for k in range(n):
    y, x = divmod(k, nrow)
    grid[pad + y * (h + pad):pad + y * (h + pad) + h, pad + x * (w + pad):pad + x * (w + pad) + w] = images[k]
  Image.fromarray(grid).save(os.path.join(directory, 'sample.png'))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def resume_data(config, train_ds, eval_ds, step):
  """Iterators over train_ds / eval_ds where a run that trained `step` steps left them.

  The toy and in-memory (DIGITS, NPZ) streams are deterministic given config.seed, so skipping
  the batches already consumed makes a resumed run see the batches of an uninterrupted one (its
  parameters are then bitwise equal on CPU). TFDS and local-ImageNet streams restart, as in
  score_sde: skipping would decode every example seen so far.
  """
  import datasets  # pylint: disable=import-outside-toplevel
  t = config.training
  if step and config.data.dataset in datasets.TOY_DATASETS + datasets.LOCAL_DATASETS:
    logging.info('Resuming the data streams: skipping %d training and %d evaluation batches.',
                 step // t.n_jitted_steps, step // t.eval_freq)
    train_ds = train_ds.skip(step // t.n_jitted_steps)
    eval_ds = eval_ds.skip(step // t.eval_freq)
  return iter(train_ds), iter(eval_ds)


def train(config, workdir, progress_desc='train', progress_position=None):
  """Runs the training pipeline; resumes from workdir's latest good checkpoint if any.

  progress_desc / progress_position: the label and terminal row of the tqdm bar (callers that
  train several stages side by side give each its own row).

  Without a checkpoint in workdir and with config.training.restore_from set, fine-tunes from that
  checkpoint (ours or a legacy score_sde / score_flow msgpack): its params, EMA params and model
  state, with a fresh optimizer and step 0.
  """
  config_checks.validate_config(config, 'train', workdir)
  import datasets  # pylint: disable=import-outside-toplevel
  import sampling  # pylint: disable=import-outside-toplevel
  import sde_lib  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  t = config.training
  is_main = jax.process_index() == 0
  sample_dir = os.path.join(workdir, 'samples')
  tb_dir = os.path.join(workdir, 'tensorboard')
  if is_main:
    os.makedirs(sample_dir, exist_ok=True)
    os.makedirs(tb_dir, exist_ok=True)
  writer = _Writer(tb_dir)

  sde, sampling_eps = sde_lib.get_sde(config)
  tf.random.set_seed(config.seed + jax.process_index())
  train_ds, eval_ds, _ = datasets.get_dataset(
    config, additional_dim=t.n_jitted_steps,
    uniform_dequantization=config.data.uniform_dequantization)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)

  mesh = make_mesh()
  model, tx, state = build_state(config, jax.random.PRNGKey(config.seed))
  state = replicate(state, mesh)

  ckpt_dir = checkpoints.CheckpointDir(os.path.join(workdir, 'checkpoints'))
  meta_dir = checkpoints.CheckpointDir(os.path.join(workdir, 'checkpoints-meta'), latest_only=True)
  state, restored_from = checkpoints.restore_latest([meta_dir, ckpt_dir], state)
  if restored_from is not None:
    logging.info('Resuming training from %s at step %d.', restored_from, int(checkpoints.to_host(state.step)))
    if t.restore_from:
      logging.info('training.restore_from=%s is ignored: this workdir already has checkpoints.',
                   t.restore_from)
  elif t.restore_from:
    params, params_ema, model_state, report = checkpoints.load_weights(
      t.restore_from, state, replicated(mesh))
    fresh = state.replace(step=jnp.zeros_like(checkpoints.to_host(state.step)), params=params,
                          params_ema=params_ema, model_state=model_state, opt_state=tx.init(params))
    state = replicate(fresh, mesh)
    logging.info('Fine-tuning: %s', report)
  initial_step = int(checkpoints.to_host(state.step))
  train_iter, eval_iter = resume_data(config, train_ds, eval_ds,
                                      initial_step if restored_from is not None else 0)

  train_step_fn, eval_step_fn = get_step_fns(config, sde, model, tx)
  p_train_step = get_multi_step_fn(train_step_fn, mesh)
  p_eval_step = get_multi_eval_fn(eval_step_fn, mesh)

  if t.snapshot_sampling:
    from models import utils as mutils  # pylint: disable=import-outside-toplevel
    n_snap = min(t.batch_size, 64)
    sampling_shape = (n_snap,) + tuple(mutils.get_data_shape(config))
    sampling_fn = sampling.get_sampling_fn(config, sde, model, sampling_shape, inverse_scaler,
                                           sampling_eps)

  n_jit = t.n_jitted_steps
  num_train_steps = t.n_iters
  if is_main:
    logging.info('Starting training loop at step %d (%d devices, %d processes, global batch %d).',
                 initial_step, jax.device_count(), jax.process_count(), t.batch_size)
  step = initial_step
  tic = time.time()
  progress = tqdm.tqdm(total=num_train_steps, initial=initial_step, desc=progress_desc, unit='step',
                       position=progress_position, dynamic_ncols=True,
                       disable=not is_main or not t.get('progress_bar', True), leave=False)
  while step < num_train_steps:
    batch = global_batch(host_batch(train_iter, scaler), mesh)
    state, metrics = p_train_step(state, batch)
    bad = _first_nonfinite(metrics)
    if bad is not None and t.nonfinite == 'stop':
      values = {k: float(np.atleast_1d(checkpoints.to_host(v))[bad]) for k, v in metrics.items()
                if k.startswith('loss')}
      raise NonFiniteError(
        f'Non-finite loss at step {step + bad + 1} ({_fmt_metrics(values, "")}); stopped without '
        'saving this state. Resume from the last checkpoint with a lower optim.lr or '
        "optim.grad_clip, or set training.nonfinite='skip' to skip such steps.")
    step += n_jit
    progress.update(n_jit)

    if step % t.log_freq == 0 or step == initial_step + n_jit:
      m = _mean_metrics(metrics)
      if is_main:
        rate = (step - initial_step) / max(time.time() - tic, 1e-9)
        extra = ''
        if t.nonfinite == 'skip' and hasattr(state, 'nonfinite_count'):
          extra = f', skipped non-finite steps: {int(checkpoints.to_host(state.nonfinite_count))}'
        logging.info('step: %d, %s (%.2f steps/s%s)', step, _fmt_metrics(m, 'training_'), rate, extra)
        writer.scalars(m, step, 'training')

    if step % t.snapshot_freq_for_preemption == 0:
      meta_dir.save(step // t.snapshot_freq_for_preemption, state)

    if step % t.eval_freq == 0:
      eval_metrics = _mean_metrics(p_eval_step(state, global_batch(host_batch(eval_iter, scaler), mesh)))
      if is_main:
        logging.info('step: %d, %s', step, _fmt_metrics(eval_metrics, 'eval_'))
        writer.scalars(eval_metrics, step, 'eval')

    if step % t.snapshot_freq == 0 or step >= num_train_steps:
      path = ckpt_dir.save(step // t.snapshot_freq, state)
      if is_main:
        logging.info('Saved checkpoint %s (step %d).', path, step)
      if t.snapshot_sampling:
        sample_rng = jax.random.fold_in(state.rng, step)
        sample, _ = sampling_fn(sample_rng, state.params_ema, state.model_state)
        sample = checkpoints.to_host(sample)
        if is_main:
          this_dir = os.path.join(sample_dir, f'iter_{step}')
          save_samples(sample, this_dir)
          logging.info('Saved %d samples to %s.', len(sample), this_dir)
  # Every process logs what it holds, so multi-host runs can be checked for agreement.
  logging.info('Training done: process %d/%d at step %d, params checksum %.10e.',
               jax.process_index(), jax.process_count(), step, params_checksum(state.params))
  progress.close()
  ckpt_dir.close()
  meta_dir.close()
  writer.close()
  return state


def params_checksum(params):
  """sum |p| over all parameters (float64 on the host): a cheap fingerprint of a state."""
  return float(sum(np.abs(checkpoints.to_host(p).astype(np.float64)).sum()
                   for p in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

# Fields whose change alters stored eval results: a rerun into the same eval folder must match.
_RESULT_FIELDS = {
  'seed': None, 'data': None, 'model': None, 'sampling': None,
  'training': ('sde', 'continuous', 'smallest_time', 'reduce_mean', 'likelihood_weighting',
               'importance_weighting', 'score_matching_order', 'loss_weights', 'exact_jacobian'),
  'eval': ('batch_size', 'bpd_dataset', 'bound', 'dsm', 'offset', 'bound_num_times', 'dequantizer',
           'rtol', 'atol', 'hutchinson_type', 'likelihood_solver', 'inception_handle',
           'ode_score_nt'),
}


class BatchPart(NamedTuple):
  """One per-batch evaluation of the bits/dim loop.

  fn(rng, params, model_state, batch) -> dict of arrays, per example (B,) or per batch (scalar);
  batch = {'image': dequantized data in the model's space (B, ...), 'deq_bpd': (B,) the
  dequantizer's bits/dim correction}. Saved to ckpt_N/<name>/batch_R_I.npz, skipped when stored,
  and averaged into the summary (keys prefixed '<name>_' unless name is 'bpd').
  """
  name: str
  fn: Callable[..., Any]


def eval_key(seed, ckpt, kind, *indices):
  """The key of one unit of eval work: PRNGKey(seed + 1) folded with ckpt, crc32(kind) and the
  indices; a rerun draws exactly the noise of an uninterrupted run, whatever was skipped."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), ckpt)
  key = jax.random.fold_in(key, zlib.crc32(kind.encode()) & 0x7fffffff)
  for i in indices:
    key = jax.random.fold_in(key, i)
  return key


def _host(x):
  """A global array (sharded or replicated, possibly over processes) -> numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _save_npz(path, **arrays):
  """np.savez_compressed to a temporary file, then an atomic rename onto path."""
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def _write_text(path, text):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _load_npz(path):
  with np.load(path) as data:
    return {k: np.asarray(data[k]) for k in data.files}


def _images(batch):
  image = batch['image']
  # pylint: disable-next=protected-access
  return image._numpy() if hasattr(image, '_numpy') else np.asarray(image)


def _result_settings(config):
  """The config fields that the stored results depend on (_RESULT_FIELDS), JSON-normalised."""
  out = {}
  for section, fields in _RESULT_FIELDS.items():
    node = config[section]
    if fields is None:
      out[section] = node.to_dict() if hasattr(node, 'to_dict') else node
    else:
      out[section] = {f: node[f] for f in fields if f in node}
  return json.loads(json.dumps(out, default=str, sort_keys=True))


def _flat(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else k))
  return out


def _check_settings(eval_dir, config, is_main):
  """Refuse to mix results of different settings in one eval folder; record them on first use."""
  path = os.path.join(eval_dir, 'settings.json')
  now = _result_settings(config)
  if os.path.exists(path):
    with open(path) as f:
      before, after = _flat(json.load(f)), _flat(now)
    diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if diff:
      raise ValueError(f'{eval_dir} holds results made with other settings ({", ".join(diff[:6])}'
                       f'{" ..." if len(diff) > 6 else ""} differ): pass another --eval_folder, or '
                       'delete that folder to start over.')
  elif is_main:
    _write_text(path, json.dumps(now, indent=2, sort_keys=True))


def get_dequantize_fn(config, workdir, deq_folder):
  """dequantize_fn(rng, images in [0, 1]) -> (dequantized images in [0, 1], bpd correction (B,)).

  With eval.dequantizer, the Flow++ dequantizer trained by --mode train_deq (deq_lib.py);
  otherwise uniform dequantization as score_flow's evaluation: (x * 255 + u) / 256, u ~ U[0, 1), no
  correction; flat toy data are used as they are.
  """
  import datasets  # pylint: disable=import-outside-toplevel
  if config.eval.dequantizer:
    import deq_lib  # pylint: disable=import-outside-toplevel
    return deq_lib.get_dequantize_fn(config, workdir, deq_folder)
  if datasets.is_toy(config):
    return lambda rng, x: (x, jnp.zeros(x.shape[:1], x.dtype))

  @jax.jit
  def uniform(rng, images):
    u = jax.random.uniform(rng, images.shape, images.dtype)
    return (images * 255. + u) / 256., jnp.zeros(images.shape[:1], images.dtype)

  return uniform


def get_batch_parts(config, sde, model, inverse_scaler):
  """The per-batch evaluations of the bits/dim loop (see BatchPart), in the order they run."""
  import bound_likelihood  # pylint: disable=import-outside-toplevel
  import datasets  # pylint: disable=import-outside-toplevel
  import likelihood  # pylint: disable=import-outside-toplevel
  e = config.eval
  images = not datasets.is_toy(config)
  eps = config.training.smallest_time
  parts = []
  if e.enable_bpd:
    if e.bound:
      bound_fn = bound_likelihood.get_bound_fn(
        sde, model, inverse_scaler, dsm=e.dsm, eps=eps, importance_weighting=True, offset=e.offset,
        N=e.bound_num_times, hutchinson_type=e.hutchinson_type, data_is_images=images,
        return_nll=True)

      def bpd_fn(rng, params, model_state, batch):
        bpd, nll = bound_fn(rng, params, model_state, batch['image'])
        return _bpd_outputs(bpd + batch['deq_bpd'], nll, None, images)
    else:
      method = str(e.likelihood_solver).lower()
      lik_fn = likelihood.get_likelihood_fn(
        sde, model, inverse_scaler, hutchinson_type=e.hutchinson_type, rtol=e.rtol, atol=e.atol,
        method=method, eps=eps, exact_div=likelihood.use_exact_div(config), data_is_images=images,
        return_nll=True)

      def bpd_fn(rng, params, model_state, batch):
        data = batch['image'] if method == 'jax' else _host(batch['image'])
        bpd, _, nfe, nll = lik_fn(rng, params, model_state, data)
        return _bpd_outputs(bpd + batch['deq_bpd'], nll, nfe, images)
    parts.append(BatchPart('bpd', bpd_fn))
  if e.enable_ode_score:
    import ode_score  # pylint: disable=import-outside-toplevel
    score_gap_fn = ode_score.get_ode_score_fn_from_config(config, sde, model)

    def ode_score_fn(rng, params, model_state, batch):
      # (nt,) batch means of the ScoreODE score diagnostics on the same dequantized batches.
      return score_gap_fn(rng, params, model_state, batch['image'])
    parts.append(BatchPart('ode_score', ode_score_fn))
  return parts


def _ode_score_summary(per_batch, ckpt_dir, is_main):
  """Per-time means over batches of the ode_score part -> ckpt_N/ode_score.{npz,csv}; the
  summary keeps the mean over t of each diagnostic."""
  import ode_score  # pylint: disable=import-outside-toplevel
  means = {k: np.mean(np.stack(v), axis=0) for k, v in per_batch.items() if k != 'seconds'}
  if is_main:
    _save_npz(os.path.join(ckpt_dir, 'ode_score.npz'), **means)
    keys = ['ts'] + [k for k in ode_score.DIAGNOSTICS if k in means]
    lines = [','.join(keys)] + [','.join(f'{means[k][i]:.8g}' for k in keys)
                                for i in range(len(means['ts']))]
    _write_text(os.path.join(ckpt_dir, 'ode_score.csv'), '\n'.join(lines) + '\n')
  return {f'ode_score_{k}': float(np.mean(means[k])) for k in ode_score.DIAGNOSTICS
          if k in means}


def _bpd_outputs(bpd, nll, nfe, images):
  out = {'bpd': bpd}
  if not images:
    out['nll'] = nll  # nats, for flat toy data (whose published numbers are NLLs)
  if nfe is not None:
    out['nfe'] = jnp.asarray(nfe)
  return out


def _mean_results(per_batch, prefix=''):
  """{key: [arrays per batch]} -> means over examples (per-example keys) or batches (scalars),
  with the count and standard error of the per-example ones."""
  out = {}
  for k, arrays in per_batch.items():
    name = f'{prefix}{k}'
    if all(np.ndim(a) == 0 for a in arrays):
      out[name] = float(np.mean(arrays))
    else:
      v = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
      out[name] = float(v.mean())
      out[f'{name}_n'] = int(v.size)
      out[f'{name}_sem'] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float('nan')
  return out


def _wait_for_checkpoint(config, workdir, ckpt, is_main):
  """workdir/checkpoints/checkpoint_<ckpt>: fail fast if missing, or with eval.wait_for_ckpt poll
  every eval.wait_poll s for at most eval.wait_timeout s (0: forever)."""
  e = config.eval
  path = config_checks.checkpoint_path(workdir, ckpt)
  if os.path.isdir(path):
    return path
  if not e.wait_for_ckpt:
    raise FileNotFoundError(f'{path} not found: set --config.eval.begin_ckpt / end_ckpt to '
                            'existing checkpoints, or --config.eval.wait_for_ckpt=True to wait.')
  if is_main:
    logging.warning('Waiting for %s (looking every %g s, %s).', path, e.wait_poll,
                    f'at most {e.wait_timeout:g} s' if e.wait_timeout > 0 else 'no time limit')
  start = time.time()
  while not os.path.isdir(path):
    waited = time.time() - start
    if e.wait_timeout > 0 and waited >= e.wait_timeout:
      raise FileNotFoundError(
        f'{path} did not appear within eval.wait_timeout={e.wait_timeout:g} s: check that training '
        f'writes to {workdir}, or raise --config.eval.wait_timeout (0 waits forever).')
    time.sleep(max(0.01, min(e.wait_poll, e.wait_timeout - waited if e.wait_timeout > 0 else
                             e.wait_poll)))
  return path


def _progress(total, desc, unit, is_main):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit=unit, disable=not is_main, dynamic_ncols=True)


def _eval_loss(ckpt, ckpt_dir, config, eval_ds, get_state, p_eval_step, scaler, mesh, is_main):
  """Eval loss (EMA params) over the whole eval split, ckpt_N/loss.npz; reused when stored."""
  path = os.path.join(ckpt_dir, 'loss.npz')
  if not os.path.exists(path):
    state = get_state()
    deq = config.data.uniform_dequantization and not _is_toy(config)
    rows = []
    for i, batch in enumerate(eval_ds):
      images = _images(batch)
      if deq:  # the training data's dequantization, with per-batch noise
        u = np.asarray(jax.random.uniform(eval_key(config.seed, ckpt, 'loss_dequantize', i),
                                          images.shape, jnp.float32))
        images = (images * 255. + u) / 256.
      x = global_batch({'image': np.asarray(scaler(images), np.float32)[None]}, mesh)
      st = state.replace(rng=replicate(eval_key(config.seed, ckpt, 'loss', i), mesh))
      metrics = p_eval_step(st, x)
      rows.append({k: float(_host(v)[0]) for k, v in metrics.items() if k.startswith('loss')})
    if not rows:
      raise ValueError('the eval split yielded no batch: lower --config.eval.batch_size.')
    arrays = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    if is_main:
      _save_npz(path, **arrays)
  else:
    arrays = _load_npz(path)
  return {f'eval_{k}': float(np.mean(v)) for k, v in arrays.items()}


def _is_toy(config):
  import datasets  # pylint: disable=import-outside-toplevel
  return datasets.is_toy(config)


def _eval_batches(ckpt, ckpt_dir, config, ds, repeats, parts, dequantize_fn, get_state, scaler,
                  mesh, is_main):
  """The per-batch parts (bits/dim, ...) over `repeats` passes of ds, one file per batch and part;
  stored batches are skipped (the data are read in the same order and the noise of every batch is
  fixed by eval_key), so a resumed run stores exactly the batches of an uninterrupted one."""
  e = config.eval
  dirs = {p.name: os.path.join(ckpt_dir, p.name) for p in parts}
  done = {}
  for name, d in dirs.items():
    if is_main:
      os.makedirs(d, exist_ok=True)
    done[name] = set(os.listdir(d)) if os.path.isdir(d) else set()
  _sync(f'eval_batches_{ckpt}')  # every process decided what is stored before anyone writes
  limit = e.num_bpd_batches or None
  try:
    per_pass = len(ds)
  except TypeError:
    per_pass = None
  per_pass = min(per_pass, limit) if per_pass and limit else (per_pass or limit)
  results = {p.name: {} for p in parts}
  bar = _progress(repeats * per_pass if per_pass else None, f'ckpt {ckpt} bits/dim', 'batch',
                  is_main)
  n_seen = 0
  for r in range(repeats):
    for i, batch in enumerate(ds):
      if limit and i >= limit:
        break
      fname = f'batch_{r}_{i}.npz'
      prepared = None
      for p in parts:
        path = os.path.join(dirs[p.name], fname)
        if fname in done[p.name]:
          out = _load_npz(path)
        else:
          state = get_state()
          if prepared is None:
            images = global_batch(_images(batch).astype(np.float32), mesh, batch_axis=0)
            data, deq_bpd = dequantize_fn(eval_key(config.seed, ckpt, 'dequantize', r, i), images)
            prepared = {'image': scaler(data), 'deq_bpd': deq_bpd}
          tic = time.time()
          out = p.fn(eval_key(config.seed, ckpt, p.name, r, i), state.params_ema,
                     state.model_state, prepared)
          out = {k: _host(v) for k, v in out.items()}
          out['seconds'] = np.asarray(time.time() - tic)
          if is_main:
            _save_npz(path, **out)
        for k, v in out.items():
          results[p.name].setdefault(k, []).append(v)
      n_seen += 1
      if is_main and 'bpd' in results and 'bpd' in results['bpd']:
        logging.info('ckpt: %d, repeat: %d, batch: %d, mean bpd: %.6f', ckpt, r, i,
                     float(np.mean(np.concatenate([np.ravel(a) for a in results['bpd']['bpd']]))))
      bar.update(1)
  bar.close()
  if n_seen == 0:
    raise ValueError(f'the {e.bpd_dataset} split yielded no batch: lower --config.eval.batch_size.')
  summary = {}
  for p in parts:
    if p.name == 'ode_score':
      summary.update(_ode_score_summary(results[p.name], ckpt_dir, is_main))
    else:
      summary.update(_mean_results(results[p.name], '' if p.name == 'bpd' else f'{p.name}_'))
  if 'seconds' in summary:
    summary['seconds_per_batch'] = summary.pop('seconds')
  return summary


def _eval_samples(ckpt, ckpt_dir, config, sample_fn, inception, data_pools, get_state, is_main):
  """ceil(num_samples / batch_size) sampling rounds (ckpt_N/samples/samples_R.npz with uint8
  samples and their Inception pool_3 / logits; stored rounds are skipped), then IS/FID/KID of
  the first num_samples against the dataset stats."""
  import evaluation  # pylint: disable=import-outside-toplevel
  e = config.eval
  sdir = os.path.join(ckpt_dir, 'samples')
  if is_main:
    os.makedirs(sdir, exist_ok=True)
  done = set(os.listdir(sdir)) if os.path.isdir(sdir) else set()
  _sync(f'eval_samples_{ckpt}')
  n_rounds = math.ceil(e.num_samples / e.batch_size)
  bar = _progress(n_rounds, f'ckpt {ckpt} sampling', 'round', is_main)
  for r in range(n_rounds):
    path = os.path.join(sdir, f'samples_{r}.npz')
    if f'samples_{r}.npz' not in done:
      state = get_state()
      samples, nfe = sample_fn(eval_key(config.seed, ckpt, 'sample', r), state.params_ema,
                               state.model_state)
      images = np.clip(_host(samples) * 255., 0, 255).astype(np.uint8)  # as score_flow
      if is_main:
        latents = evaluation.run_inception(images, inception, batch_size=min(e.batch_size, 256))
        _save_npz(path, samples=images, pool_3=latents['pool_3'], logits=latents['logits'],
                  nfe=_host(nfe))
        logging.info('sampling -- ckpt: %d, round: %d', ckpt, r)
    bar.update(1)
  bar.close()
  _sync(f'eval_samples_done_{ckpt}')
  if not is_main:
    return {}
  rounds = [_load_npz(os.path.join(sdir, f'samples_{r}.npz')) for r in range(n_rounds)]
  pools = np.concatenate([d['pool_3'] for d in rounds])[:e.num_samples]
  logits = np.concatenate([d['logits'] for d in rounds])[:e.num_samples]
  metrics = evaluation.compute_metrics(logits, pools, data_pools)
  return {'IS': float(metrics['IS']), 'fid': float(metrics['fid']), 'kid': float(metrics['kid']),
          'num_samples': int(pools.shape[0]),
          'sampling_nfe': float(np.mean([d['nfe'] for d in rounds]))}


def _write_summary_csv(eval_dir):
  """summary.csv rebuilt from every ckpt_N/summary.json: one row per checkpoint (idempotent, so a
  rerun never duplicates a row)."""
  import csv  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  rows = []
  for name in os.listdir(eval_dir):
    path = os.path.join(eval_dir, name, 'summary.json')
    if name.startswith('ckpt_') and os.path.isfile(path):
      with open(path) as f:
        rows.append(json.load(f))
  rows.sort(key=lambda r: r['ckpt'])
  keys = ['ckpt', 'step'] + sorted({k for r in rows for k in r} - {'ckpt', 'step'})
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys)
  writer.writeheader()
  writer.writerows(rows)
  _write_text(os.path.join(eval_dir, 'summary.csv'), buf.getvalue())


class _NoReadOnlyNotes(logging.Filter):
  def filter(self, record):
    msg = record.getMessage()
    return 'read_only' not in msg and 'read only' not in msg


def _read_only_ckpt_dir(directory):
  """CheckpointDir opened read-only, without orbax's two warnings that it is read-only."""
  logger, quiet = logging.getLogger('absl'), _NoReadOnlyNotes()
  logger.addFilter(quiet)
  try:
    return checkpoints.CheckpointDir(directory, create=False)
  finally:
    logger.removeFilter(quiet)


def evaluate(config, workdir, eval_folder='eval', deq_folder='deq'):
  """Evaluates checkpoints eval.begin_ckpt..eval.end_ckpt of workdir/checkpoints (EMA params):
  eval loss (eval.enable_loss), bits/dim by the probability-flow ODE or the variational bound
  (eval.enable_bpd, eval.bound) and IS/FID/KID of samples (eval.enable_sampling). Results go to
  workdir/eval_folder (layout in the module docstring); pre-emption safe (rerun to resume).
  """
  config_checks.validate_config(config, 'eval', workdir)
  import datasets  # pylint: disable=import-outside-toplevel
  import evaluation  # pylint: disable=import-outside-toplevel
  import sampling  # pylint: disable=import-outside-toplevel
  import sde_lib  # pylint: disable=import-outside-toplevel
  from models import utils as mutils  # pylint: disable=import-outside-toplevel

  e = config.eval
  is_main = jax.process_index() == 0
  eval_dir = os.path.join(workdir, eval_folder)
  if is_main:
    os.makedirs(eval_dir, exist_ok=True)
  _check_settings(eval_dir, config, is_main)
  sde, sampling_eps = sde_lib.get_sde(config)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)

  # Everything that can fail on user input comes before the model and the data.
  _wait_for_checkpoint(config, workdir, e.begin_ckpt, is_main)
  dequantize_fn = None
  if e.enable_bpd or e.enable_ode_score:
    dequantize_fn = get_dequantize_fn(config, workdir, deq_folder)
  mesh = make_mesh()
  inception = data_pools = sample_fn = None
  if e.enable_sampling:
    data_pools = evaluation.load_dataset_stats(config)['pool_3']
    inception = evaluation.get_inception_model(e.inception_handle)

  model, tx, host_state = build_state(config, jax.random.PRNGKey(config.seed))
  target = replicate(host_state, mesh)
  parts = get_batch_parts(config, sde, model, inverse_scaler)
  if e.enable_sampling:
    shape = (e.batch_size,) + tuple(mutils.get_data_shape(config))
    sampler = sampling.get_sampler(config, sde, shape, inverse_scaler, sampling_eps)
    sample_fn = jax.jit(lambda rng, params, ms: sampler(rng, (model, params, ms)),
                        out_shardings=(NamedSharding(mesh, P(DATA_AXIS)), replicated(mesh)))
  p_eval_step = None
  if e.enable_loss:
    p_eval_step = get_multi_eval_fn(get_step_fns(config, sde, model, tx)[1], mesh)
  train_ds = eval_ds = bpd_ds = None
  repeats = 1
  if e.enable_loss or parts:
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=None,
                                                uniform_dequantization=False, evaluation=True,
                                                shuffle=False)
    # As score_flow: the training split once, the test split eval.num_repeats times.
    train_bpd = str(e.bpd_dataset).lower() == 'train'
    bpd_ds, repeats = (train_ds, 1) if train_bpd else (eval_ds, e.num_repeats)

  for ckpt in range(e.begin_ckpt, e.end_ckpt + 1):
    ckpt_path = _wait_for_checkpoint(config, workdir, ckpt, is_main)
    ckpt_dir = os.path.join(eval_dir, f'ckpt_{ckpt}')
    if is_main:
      os.makedirs(ckpt_dir, exist_ok=True)
    ckpts = _read_only_ckpt_dir(os.path.join(workdir, 'checkpoints'))
    holder = {}

    def get_state(ckpts=ckpts, ckpt=ckpt, holder=holder, ckpt_path=ckpt_path):
      if 'state' not in holder:  # restored only when some result is not stored yet
        holder['state'] = ckpts.restore(ckpt, target)
        if is_main:
          logging.info('Restored %s (step %d).', ckpt_path, int(checkpoints.to_host(
            holder['state'].step)))
      return holder['state']

    summary = {'ckpt': ckpt, 'step': ckpts.training_step(ckpt)}
    tic = time.time()
    if e.enable_loss:
      summary.update(_eval_loss(ckpt, ckpt_dir, config, eval_ds, get_state, p_eval_step, scaler,
                                mesh, is_main))
    if parts:
      summary.update(_eval_batches(ckpt, ckpt_dir, config, bpd_ds, repeats, parts, dequantize_fn,
                                   get_state, scaler, mesh, is_main))
    if e.enable_sampling:
      summary.update(_eval_samples(ckpt, ckpt_dir, config, sample_fn, inception, data_pools,
                                   get_state, is_main))
    ckpts.close()
    if is_main:
      summary['seconds_this_run'] = time.time() - tic
      _write_text(os.path.join(ckpt_dir, 'summary.json'), json.dumps(summary, indent=2))
      _write_summary_csv(eval_dir)
      logging.info('ckpt-%d --- %s', ckpt, ', '.join(
        f'{k}: {v:.6e}' if isinstance(v, float) else f'{k}: {v}' for k, v in summary.items()
        if k != 'ckpt'))
    _sync(f'eval_ckpt_{ckpt}')
  return summary


def train_deq(config, workdir, deq_workdir):
  """Train the Flow++ variational dequantizer for the score model of workdir (deq_lib.py)."""
  import deq_lib  # pylint: disable=import-outside-toplevel
  return deq_lib.train_deq(config, workdir, deq_workdir)


def fid_stats(config, workdir):
  """Inception pool_3 statistics of the training split -> config.eval.stats_dir/<name>_stats.npz
  (evaluation.stats_path), the file that eval.enable_sampling compares samples with. Refuses to
  replace an existing file unless eval.overwrite_stats. Run it as a single process."""
  del workdir  # the stats belong to the dataset, not to a run
  config_checks.validate_config(config, 'fid_stats')
  import evaluation  # pylint: disable=import-outside-toplevel
  e = config.eval
  inception = evaluation.get_inception_model(e.inception_handle)
  path = evaluation.compute_dataset_stats(config, inception, max_images=e.stats_num_images or None)
  logging.info('Inception stats of %s written to %s.', config.data.dataset, path)
  return path
