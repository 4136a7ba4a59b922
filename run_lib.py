"""Training (and, later, evaluation) pipelines of score_sde / score_flow / mle_score_ode in current
JAX: one jitted function runs n_jitted_steps training steps (lax.scan) data-parallel over every
device of every process (1-D mesh 'data'; batch sharded on its batch axis, state replicated).

Workdir layout (train):
  stdout.txt                    console log (process 0)
  tensorboard/                  TensorBoard events: training_loss[1-3], eval_loss[1-3]
  checkpoints/checkpoint_N      periodic, N = step // snapshot_freq (all kept)
  checkpoints-meta/checkpoint_N pre-emption, N = step // snapshot_freq_for_preemption (latest)
  samples/iter_STEP/sample.png, sample.npz   snapshot samples (EMA params) at each checkpoint
"""
import functools
import logging
import os
import time

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


def train(config, workdir):
  """Runs the training pipeline; resumes from workdir's latest good checkpoint if any.

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
  progress = tqdm.tqdm(total=num_train_steps, initial=initial_step, desc='train', unit='step',
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
# Entry points still being built
# ------------------------------------------------------------------------------------------------

def evaluate(config, workdir, eval_folder='eval', deq_folder='deq'):
  """Sample quality (FID/IS/KID), losses and bits/dim of the checkpoints in workdir."""
  raise NotImplementedError('evaluate is being built')


def train_deq(config, workdir, deq_workdir):
  """Train the Flow++ variational dequantizer for the score model of workdir."""
  raise NotImplementedError('train_deq is being built')


def fid_stats(config, workdir):
  """Inception statistics of the training set (the stats files of assets/stats)."""
  raise NotImplementedError('fid_stats is being built')
