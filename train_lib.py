"""Training: the one guarded loop (resume, checkpoints, non-finite stop/skip, logging, progress)
that the score model (`train`) and the variational dequantizer (deq_lib.train_deq) share.

Each call runs training.n_jitted_steps steps (a jitted lax.scan, or on a CPU a Python loop over
the jitted step), data-parallel over every device of every process (parallel.py). Workdir
layout: names.py.
"""
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import checkpoints
import config_checks
import names
import optim
import parallel
import restore_from


class NonFiniteError(RuntimeError):
  """Training met a non-finite loss or gradient with training.nonfinite='stop'."""


# ------------------------------------------------------------------------------------------------
# Building blocks shared by train, eval, the dequantizer and the tests
# ------------------------------------------------------------------------------------------------

def build_state(config, rng):
  """(model, optimizer, host TrainState) freshly initialised from config."""
  import train_state as ts
  from models import utils as mutils
  rng, init_rng = jax.random.split(rng)
  model = mutils.get_model(config.model.name)(config=config)
  # jit: eager flax init dispatches hundreds of small ops (seconds on a busy CPU); the jitted one
  # is compiled once and then served from the persistent compilation cache.
  init_model_state, initial_params = jax.jit(
    lambda r: tuple(mutils.init_model(r, config)[1:]))(init_rng)
  tx = optim.get_optimizer(config)
  state = ts.create_train_state(rng, config, model, initial_params, init_model_state, tx)
  return model, tx, state


def abstract_state(config):
  """build_state's TrainState as ShapeDtypeStructs (jax.eval_shape): the trees a checkpoint must
  fit, with no weights made."""
  return jax.eval_shape(lambda rng: build_state(config, rng)[2], jax.random.PRNGKey(0))


def get_step_fns(config, sde, model, tx):
  """(train_step_fn, eval_step_fn) of losses.get_train_step_fn for this config and optimizer tx."""
  import losses
  options = losses.LossOptions.from_config(config)
  return (losses.get_train_step_fn(sde, model, True, tx, options),
          losses.get_train_step_fn(sde, model, False, tx, options))


def params_checksum(params):
  """sum |p| over all parameters (float64 on the host): a cheap fingerprint of a state."""
  return float(sum(np.abs(checkpoints.to_host(p).astype(np.float64)).sum()
                   for p in jax.tree_util.tree_leaves(params)))


class Writer:
  """TensorBoard scalars on process 0 (no-op elsewhere), written with TensorBoard's record writer
  (tf.summary's events, without TensorFlow: a toy run never imports it)."""

  def __init__(self, tb_dir):
    self._f = None
    if jax.process_index() == 0:
      import socket
      from tensorboard.summary.writer.record_writer import RecordWriter
      os.makedirs(tb_dir, exist_ok=True)
      name = f'events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}'
      self._f = open(os.path.join(tb_dir, name), 'wb')
      self._w = RecordWriter(self._f)
      self._event(file_version='brain.Event:2')

  def _event(self, **fields):
    from tensorboard.compat.proto import event_pb2
    self._w.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
    self._f.flush()

  def scalars(self, metrics, step, prefix):
    if self._f is not None:
      from tensorboard.compat.proto import summary_pb2
      from tensorboard.plugins.scalar import summary_v2
      summary = summary_pb2.Summary(value=[
        v for k, x in metrics.items()
        for v in summary_v2.scalar_pb(f'{prefix}_{k}', float(x)).value])
      self._event(step=int(step), summary=summary)

  def close(self):
    if self._f is not None:
      self._f.close()


def save_samples(sample, directory):
  """sample (B, H, W, C) in [0, 1] (or flat (B, D)) -> directory/sample.npz and sample.png."""
  from PIL import Image
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
# The guarded loop
# ------------------------------------------------------------------------------------------------

def _fmt_metrics(metrics, prefix):
  return ', '.join(f'{prefix}{k}: {v:.5e}' for k, v in metrics.items())


def _mean_metrics(metrics):
  """Mean over the scanned steps of every metric but 'finite', as Python floats, 'loss' first."""
  return {k: float(np.mean(checkpoints.to_host(metrics[k])))
          for k in sorted(metrics, key=lambda k: (k != 'loss', k)) if k != 'finite'}


def _first_nonfinite(metrics):
  """Index of the first scanned step whose metrics are non-finite, or None."""
  values = np.stack([np.atleast_1d(checkpoints.to_host(v)) for k, v in metrics.items()
                     if k != 'finite'])
  ok = np.all(np.isfinite(values), axis=0)
  if 'finite' in metrics:
    ok = ok & np.atleast_1d(checkpoints.to_host(metrics['finite'])).astype(bool)
  bad = np.flatnonzero(~ok)
  return int(bad[0]) if bad.size else None


def _named(what, noun):
  return f'{what} {noun}' if what else noun


@dataclasses.dataclass
class Loop:
  """What the guarded loop runs: jitted multi-step functions (parallel.get_multi_step_fn /
  get_multi_eval_fn) and the iterators of global batches they consume, under `folder` (layout)."""
  folder: str
  n_iters: int
  train_step: Callable[[Any, Any], Any]      # (state, batch) -> (state, metrics)
  train_batches: Iterator[Any]
  eval_step: Callable[[Any, Any], Any]       # (state, batch) -> metrics
  eval_batches: Iterator[Any]
  what: str = ''                             # what is trained, in messages ('' = the model)
  lr_flag: str = 'optim.lr'                  # the option a non-finite stop suggests lowering
  on_checkpoint: Optional[Callable[[Any, int], None]] = None  # (state, step) after each save
  progress_desc: str = 'train'
  progress_position: Optional[int] = None


def open_checkpoints(folder):
  """(periodic, pre-emption) CheckpointDirs of a run folder."""
  return (checkpoints.CheckpointDir(os.path.join(folder, names.CHECKPOINTS)),
          checkpoints.CheckpointDir(os.path.join(folder, names.CHECKPOINTS_META),
                                    latest_only=True))


def run_loop(config, loop, state, ckpt_dir, meta_dir):
  """Runs loop.train_step from state.step to loop.n_iters with config.training's log, eval and
  snapshot frequencies; returns the final state. A non-finite step stops (NonFiniteError, nothing
  saved) or, with training.nonfinite='skip', was skipped by the step function and is counted."""
  t = config.training
  is_main = jax.process_index() == 0
  writer = Writer(os.path.join(loop.folder, names.TENSORBOARD))
  n_jit = t.n_jitted_steps
  initial_step = step = int(checkpoints.to_host(state.step))
  progress = tqdm.tqdm(total=loop.n_iters, initial=initial_step, desc=loop.progress_desc,
                       unit='step', position=loop.progress_position, dynamic_ncols=True,
                       disable=not is_main or not t.get('progress_bar', True), leave=False)
  timed = [0, 0.]  # steps and seconds in train calls since the last log line
  try:
    while step < loop.n_iters:
      tic = time.perf_counter()
      state, metrics = loop.train_step(state, next(loop.train_batches))
      bad = _first_nonfinite(metrics)  # waits for the step
      if step > initial_step:  # the first call compiles
        timed = [timed[0] + n_jit, timed[1] + time.perf_counter() - tic]
      if bad is not None and t.nonfinite == 'stop':
        values = {k: float(np.atleast_1d(checkpoints.to_host(v))[bad]) for k, v in metrics.items()
                  if k != 'finite'}
        raise NonFiniteError(
          f'Non-finite {_named(loop.what, "loss")} at step {step + bad + 1} ({_fmt_metrics(values, "")}); '
          f'stopped without saving this state. Resume from the last checkpoint with a lower '
          f"--config.{loop.lr_flag} or optim.grad_clip, or set training.nonfinite='skip' to skip "
          'such steps.')
      step += n_jit
      progress.update(n_jit)
      if step % t.log_freq == 0 or step == initial_step + n_jit:
        m = _mean_metrics(metrics)
        if is_main:
          extra = f', {timed[0] / timed[1]:.2f} steps/s' if timed[1] else ', compiled the step'
          if t.nonfinite == 'skip' and hasattr(state, 'nonfinite_count'):
            extra += f', skipped non-finite steps: {int(checkpoints.to_host(state.nonfinite_count))}'
          logging.info('step: %d, %s (%s)', step, _fmt_metrics(m, 'training_'), extra[2:])
          writer.scalars(m, step, 'training')
        timed = [0, 0.]
      if step % t.snapshot_freq_for_preemption == 0:
        meta_dir.save(step // t.snapshot_freq_for_preemption, state)
      if step % t.eval_freq == 0:
        m = _mean_metrics(loop.eval_step(state, next(loop.eval_batches)))
        if is_main:
          logging.info('step: %d, %s', step, _fmt_metrics(m, 'eval_'))
          writer.scalars(m, step, 'eval')
      if step % t.snapshot_freq == 0 or step >= loop.n_iters:
        path = ckpt_dir.save(max(step // t.snapshot_freq, 1), state)
        if is_main:
          logging.info('Saved %s %s (step %d).', _named(loop.what, 'checkpoint'), path, step)
        if loop.on_checkpoint is not None:
          loop.on_checkpoint(state, step)
  finally:
    progress.close()
    writer.close()
  # Every process logs what it holds, so multi-host runs can be checked for agreement.
  logging.info('%s done: process %d/%d at step %d, params checksum %.10e.',
               _named(loop.what, 'training').capitalize(),
               jax.process_index(), jax.process_count(), step, params_checksum(state.params))
  return state


# ------------------------------------------------------------------------------------------------
# The score model
# ------------------------------------------------------------------------------------------------

def resume_data(config, train_ds, eval_ds, step):
  """Iterators over train_ds / eval_ds where a run that trained `step` steps left them.

  The toy and in-memory (DIGITS, NPZ) streams are deterministic given config.seed, so skipping
  the batches already consumed makes a resumed run see the batches of an uninterrupted one (its
  parameters are then bitwise equal on CPU). TFDS and local-ImageNet streams restart, as in
  score_sde: skipping would decode every example seen so far.
  """
  t = config.training
  if step and config.data.dataset in names.TOY_DATASETS + names.LOCAL_DATASETS:
    logging.info('Resuming the data streams: skipping %d training and %d evaluation batches.',
                 step // t.n_jitted_steps, step // t.eval_freq)
    train_ds = train_ds.skip(step // t.n_jitted_steps)
    eval_ds = eval_ds.skip(step // t.eval_freq)
  return iter(train_ds), iter(eval_ds)


def global_batches(ds_iter, scaler, mesh):
  """Global batches (parallel.global_batch) of the host batches of a tf.data iterator."""
  while True:
    yield parallel.global_batch(parallel.host_batch(ds_iter, scaler), mesh)


def restore_or_fine_tune(config, state, tx, mesh, ckpt_dir, meta_dir):
  """(state, resumed): the workdir's latest good checkpoint; else, with training.restore_from,
  that checkpoint's whole state (Adam moments and step continue), or with
  training.restore_optimizer=False its params, EMA and model state with a fresh optimizer."""
  t = config.training
  state, restored_from = checkpoints.restore_latest([meta_dir, ckpt_dir], state)
  if restored_from is not None:
    logging.info('Resuming training from %s at step %d.', restored_from,
                 int(checkpoints.to_host(state.step)))
    if t.restore_from:
      logging.info('training.restore_from=%s is ignored: this workdir already has checkpoints.',
                   t.restore_from)
  elif t.restore_from and t.get('restore_optimizer', True):
    loaded, report = restore_from.load_state(t.restore_from, state, tx, parallel.replicated(mesh))
    restore_from.check_steps_left(t.restore_from, int(loaded.step), t.n_iters)
    state = parallel.replicate(loaded, mesh)
    logging.info('Fine-tuning: %s', report)
  elif t.restore_from:
    params, params_ema, model_state, report = restore_from.load_weights(
      t.restore_from, state, parallel.replicated(mesh))
    fresh = state.replace(step=jnp.zeros_like(checkpoints.to_host(state.step)), params=params,
                          params_ema=params_ema, model_state=model_state, opt_state=tx.init(params))
    state = parallel.replicate(fresh, mesh)
    logging.info('Fine-tuning: %s', report)
  return state, restored_from is not None


def check_restore_from(config, workdir):
  """ValueError (one line naming the first mismatch) if training.restore_from cannot start this
  config's model, before any folder is made or data read: its trees are matched on shapes to
  jax.eval_shape of the initial state (no model built). Nothing to check when the workdir has
  checkpoints already (the run resumes them and ignores restore_from)."""
  t = config.training
  if not t.restore_from or any(names.checkpoint_numbers(os.path.join(workdir, d))
                               for d in (names.CHECKPOINTS, names.CHECKPOINTS_META)):
    return
  restore_from.check_fits(t.restore_from, abstract_state(config), t.get('restore_optimizer', True),
                          t.n_iters)


def train(config, workdir, progress_desc='train', progress_position=None, check=True):
  """Trains the score model of config in workdir; resumes from its latest good checkpoint.

  progress_desc / progress_position: the label and terminal row of the tqdm bar (callers that
  train several stages side by side give each its own row). Without a checkpoint in workdir and
  with config.training.restore_from set, fine-tunes from that checkpoint (ours or a legacy
  score_sde / score_flow msgpack; restore_or_fine_tune): its whole state, or with
  training.restore_optimizer=False its weights and a fresh optimizer. check=False skips
  config_checks.validate_config when the caller has run it (main.py).
  """
  if check:
    config_checks.validate_config(config, 'train', workdir)
  import datasets
  import sampling
  import sde_lib
  from models import utils as mutils

  t = config.training
  sde, sampling_eps = sde_lib.get_sde(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  sampler = None
  if t.snapshot_sampling:  # built first: an unsupported sampler fails before any work
    shape = (min(t.batch_size, 64),) + tuple(mutils.get_data_shape(config))
    sampler = sampling.get_sampler(config, sde, shape, inverse_scaler, sampling_eps)

  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(os.path.join(workdir, names.TENSORBOARD), exist_ok=True)
  datasets.seed_pipeline(config, config.seed + jax.process_index())
  train_ds, eval_ds, _ = datasets.get_dataset(
    config, additional_dim=t.n_jitted_steps,
    uniform_dequantization=config.data.uniform_dequantization)
  scaler = datasets.get_data_scaler(config)

  mesh = parallel.make_mesh()
  model, tx, state = build_state(config, jax.random.PRNGKey(config.seed))
  state = parallel.replicate(state, mesh)
  ckpt_dir, meta_dir = open_checkpoints(workdir)
  state, resumed = restore_or_fine_tune(config, state, tx, mesh, ckpt_dir, meta_dir)
  initial_step = int(checkpoints.to_host(state.step))
  train_iter, eval_iter = resume_data(config, train_ds, eval_ds, initial_step if resumed else 0)
  train_step_fn, eval_step_fn = get_step_fns(config, sde, model, tx)

  sample_fn = jax.jit(lambda rng, params, ms: sampler(rng, (model, params, ms)))

  def snapshot(state, step):
    sample, _ = sample_fn(jax.random.fold_in(state.rng, step), state.params_ema, state.model_state)
    sample = checkpoints.to_host(sample)
    if is_main:
      this_dir = os.path.join(workdir, names.SAMPLES, f'iter_{step}')
      save_samples(sample, this_dir)
      logging.info('Saved %d samples to %s.', len(sample), this_dir)

  loop = Loop(folder=workdir, n_iters=t.n_iters,
              train_step=parallel.get_multi_step_fn(train_step_fn, mesh, model=config.model.name),
              train_batches=global_batches(train_iter, scaler, mesh),
              eval_step=parallel.get_multi_eval_fn(eval_step_fn, mesh, model=config.model.name),
              eval_batches=global_batches(eval_iter, scaler, mesh),
              on_checkpoint=snapshot if sampler is not None else None,
              progress_desc=progress_desc, progress_position=progress_position)
  if is_main:
    logging.info('Starting training loop at step %d (%d devices, %d processes, global batch %d).',
                 initial_step, jax.device_count(), jax.process_count(), t.batch_size)
  try:
    return run_loop(config, loop, state, ckpt_dir, meta_dir)
  finally:
    ckpt_dir.close()
    meta_dir.close()


class QuietLibraries(logging.Filter):
  """Drop the per-save INFO chatter of orbax (dozens of lines per checkpoint); keep warnings."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def log_to_file(directory):
  """Log to directory/stdout.txt as well as the console (process 0 only, as the original), unless a
  handler writes there already. Returns the handler it added (or None), which the caller removes
  and closes when its job ends, so that jobs run in one process each log to their own file."""
  if jax.process_index() != 0:
    return None
  target = os.path.abspath(os.path.join(directory, names.LOG_FILE))
  root = logging.getLogger()
  for h in root.handlers:
    if os.path.abspath(getattr(getattr(h, 'stream', None), 'name', '') or '') == target:
      return None
  handler = logging.StreamHandler(open(target, 'a'))
  handler.setFormatter(logging.Formatter(
    '%(levelname)s - %(filename)s - %(asctime)s - %(message)s'))
  handler.addFilter(QuietLibraries())
  root.addHandler(handler)
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  return handler


def close_log(handler):
  """Remove and close a handler of log_to_file (None: nothing to do)."""
  if handler is not None:
    logging.getLogger().removeHandler(handler)
    handler.close()
