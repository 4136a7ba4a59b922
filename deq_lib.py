"""Variational dequantization (score_flow): train a Flow++ dequantizer q(u | x) for a trained score
model, and dequantize images with it for bits/dim.

  python main.py --config CONFIG --workdir W --mode train_deq --deq_folder deq

Workdir layout (under W/deq):
  stdout.txt                    console log (process 0)
  tensorboard/                  training_loss, training_bpd, eval_loss, eval_bpd
  checkpoints/checkpoint_N      periodic, N = step // training.snapshot_freq (all kept)
  checkpoints-meta/checkpoint_N pre-emption, N = step // training.snapshot_freq_for_preemption

The dequantizer's state is a train_state.TrainState (params, opt_state, params_ema, rng; an empty
model_state). As in score_flow the loop reuses training.{batch_size, n_jitted_steps, log_freq,
eval_freq, snapshot_freq, snapshot_freq_for_preemption} and runs deq.n_iters steps; the score
model (EMA params of W/checkpoints/checkpoint_{eval.ckpt_id}, the field score_flow's train_deq
read, or of the file eval.restore_from) stays fixed. config.deq.model 'auto' picks the Flow++
variant score_flow built for the dataset (CIFAR10: 'cifar10', ImageNet 32 / 64: 'imagenet32' /
'imagenet64').

Bits/dim with the dequantizer (score_flow's evaluate): for an 8-bit image x = k / 255, u ~ N(0, I),
(noise, sldj) = dequantizer(u, x), y = (255 x + noise) / 256 in bin k,
  bpd = bpd_model(y) + log q(noise | x) / (D ln 2),   log q = log N(u; 0, I) - sldj,
with bpd_model(y) the ODE (or bound) bits/dim of scaler(y) including the 8-bit offset
log2(d inverse_scaler / dx) + 8 (likelihood.get_likelihood_fn). Uniform dequantization is the
case q = 1 (correction 0). get_dequantize_fn returns y and that correction.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import checkpoints
import config_checks
import likelihood
import names
import optim
import parallel
import train_lib


def deq_optim_config(config):
  """config with config.deq.{lr, warmup, grad_clip} in place of config.optim's and deq.n_iters as
  training.n_iters, so that a cosine schedule decays over the dequantizer's own steps."""
  cfg = config.copy_and_resolve_references()
  cfg.unlock()
  cfg.optim.lr = float(config.deq.lr)
  cfg.optim.warmup = config.deq.warmup
  cfg.optim.grad_clip = float(config.deq.grad_clip)
  cfg.training.n_iters = int(config.deq.n_iters)
  return cfg


def get_deq_optimizer(config):
  """optim.get_optimizer of deq_optim_config: the dequantizer's Adam and schedule."""
  return optim.get_optimizer(deq_optim_config(config))


def check_config(config, workdir=None):
  """Refuse in one line what train_deq cannot run, before any work: bad deq fields, a dataset
  'auto' has no dequantizer for, and (given workdir) a missing score checkpoint eval.ckpt_id or
  an eval.restore_from file that is damaged or does not fit the config's model."""
  deq = config.deq
  if deq.n_iters < 1:
    raise ValueError(f'deq.n_iters is {deq.n_iters}: set --config.deq.n_iters to 1 or more.')
  if not 0. <= deq.ema_rate < 1.:
    raise ValueError(f'deq.ema_rate is {deq.ema_rate}: set --config.deq.ema_rate in [0, 1).')
  if names.is_toy(config):
    raise ValueError(f'dequantization needs 8-bit images; {config.data.dataset} is a toy '
                     'dataset: use an image config.')
  t = config.training
  for name in ('log_freq', 'eval_freq', 'snapshot_freq', 'snapshot_freq_for_preemption'):
    v = getattr(t, name)
    if v < 1 or v % t.n_jitted_steps:
      raise ValueError(f'training.{name}={v} is not a positive multiple of '
                       f'training.n_jitted_steps={t.n_jitted_steps}: change one of them.')
  from models import flowpp
  flowpp.model_name(config)
  if workdir is not None and config.eval.restore_from:
    import restore_from
    restore_from.check_ema_fits(config.eval.restore_from, train_lib.abstract_state(config))
  elif workdir is not None:
    _score_checkpoint(config, workdir)


def _score_checkpoint(config, workdir):
  """workdir/checkpoints/checkpoint_{eval.ckpt_id}, or FileNotFoundError naming the field."""
  number = config.eval.ckpt_id
  path = names.checkpoint_path(workdir, number)
  if not os.path.isdir(path):
    root = os.path.join(workdir, names.CHECKPOINTS)
    have = names.checkpoint_numbers(root)
    held = ', '.join(f'checkpoint_{n}' for n in have) or 'none: train the score model first'
    raise FileNotFoundError(f"score checkpoint '{path}' not found ({root} holds {held}): set "
                            '--config.eval.ckpt_id to the score checkpoint to train the '
                            'dequantizer for.')
  return number, path


def load_score_model(config, workdir, mesh):
  """(sde, model, params_ema, model_state, path) of the file eval.restore_from, else of
  workdir/checkpoints/checkpoint_{eval.ckpt_id} (as score_flow's train_deq; never another one),
  replicated over the mesh."""
  import restore_from
  import sde_lib
  path = config.eval.restore_from
  if not path:
    number, path = _score_checkpoint(config, workdir)
  sde, _ = sde_lib.get_sde(config)
  model, _, state = train_lib.build_state(config, jax.random.PRNGKey(config.seed))
  if config.eval.restore_from:
    state = restore_from.load_ema(path, state, mesh)
    return sde, model, state.params_ema, state.model_state, path
  ckpt_dir = checkpoints.CheckpointDir(os.path.join(workdir, names.CHECKPOINTS), create=False)
  state = parallel.replicate(state, mesh)
  try:
    state = ckpt_dir.restore(number, state)
  finally:
    ckpt_dir.close()
  return sde, model, state.params_ema, state.model_state, path


def init_deq_state(config, rng, init_images, mesh=None):
  """(deq_model, tx, host TrainState) with a data-dependent init on images in [0, 1]."""
  import train_state as ts
  from models import flowpp
  rng, init_rng = jax.random.split(rng)
  init_images = None if init_images is None else np.asarray(init_images, np.float32)
  deq_model, params = flowpp.init_dequantizer(init_rng, config, batch=init_images,
                                              jit=flowpp.model_name(config) == 'tiny')
  tx = get_deq_optimizer(config)
  state = ts.create_train_state(rng, config, deq_model, params, {}, tx)
  return deq_model, tx, state


def get_deq_step_fn(sde, score_model, deq_model, scaler, inverse_scaler, tx, train=True,
                    eps=1e-5, offset=True, ema_rate=0.99, bits=8):
  """step_fn(state, batch, score_params, score_state) -> (new_state, metrics).

  Train: Adam on the dequantizer params (the score model is an input, never updated), EMA of the
  params, a fresh rng; a non-finite loss or gradient keeps params, opt_state and EMA (and counts
  it in nonfinite_count). Eval (train=False): the loss of the EMA params.
  metrics: 'loss' (nats per example), 'bpd', 'finite'.
  """
  import losses
  loss_fn = losses.get_dequantization_loss_fn(sde, score_model, deq_model, scaler, inverse_scaler,
                                              train=train, importance_weighting=True, eps=eps,
                                              offset=offset, bits=bits)

  def step_fn(state, batch, score_params, score_state):
    rng, step_rng = jax.random.split(state.rng)
    if train:
      (loss, bpd), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        step_rng, state.params, score_params, score_state, batch)
      finite = jnp.logical_and(jnp.isfinite(loss), losses.all_finite(grads))
      updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
      new_ema = jax.tree_util.tree_map(lambda e, p: e * ema_rate + p * (1. - ema_rate),
                                       state.params_ema, new_params)
      updated = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                              params_ema=new_ema, rng=rng)
      failed = state.replace(step=state.step + 1, rng=rng,
                             nonfinite_count=state.nonfinite_count + 1)
      new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), updated, failed)
    else:
      loss, bpd = loss_fn(step_rng, state.params_ema, score_params, score_state, batch)
      finite = jnp.isfinite(loss)
      new_state = state.replace(rng=rng)
    return new_state, {'loss': loss, 'bpd': bpd, 'finite': finite}

  return step_fn


def train_deq(config, workdir, deq_folder=names.DEQ_FOLDER, check=True):
  """Train the Flow++ dequantizer of config.deq for checkpoint eval.ckpt_id of workdir's score
  model (or for the file eval.restore_from) in workdir/deq_folder, logging to its stdout.txt;
  resumes from the newest checkpoint there. Returns the final (replicated) state. check=False
  skips the config checks when the caller has run them (main.py)."""
  if check:
    config_checks.validate_config(config, 'train_deq', workdir)
    check_config(config, workdir)
  import datasets
  from models import flowpp

  deq_dir = names.deq_dir(workdir, deq_folder)
  if jax.process_index() == 0:
    os.makedirs(deq_dir, exist_ok=True)
  handler = train_lib.log_to_file(deq_dir)
  try:
    t = config.training
    mesh = parallel.make_mesh()
    sde, score_model, score_params, score_state, score_path = load_score_model(
      config, workdir, mesh)
    logging.info('Loaded the score model (EMA params) from %s.', score_path)

    datasets.seed_pipeline(config, config.seed + jax.process_index())
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=t.n_jitted_steps,
                                                uniform_dequantization=False)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)

    # Data-dependent init on the first training batch (images in [0, 1]), as the original.
    init_images = np.asarray(next(iter(train_ds))['image'])[0]
    deq_model, tx, state = init_deq_state(config, jax.random.PRNGKey(config.seed), init_images)
    state = parallel.replicate(state, mesh)
    ckpt_dir, meta_dir = train_lib.open_checkpoints(deq_dir)
    state, restored_from = checkpoints.restore_latest([meta_dir, ckpt_dir], state)
    initial_step = int(checkpoints.to_host(state.step))
    if restored_from is not None:
      logging.info('Resuming dequantizer training from %s at step %d.', restored_from,
                   initial_step)

    kw = dict(eps=t.smallest_time, offset=config.deq.offset, ema_rate=config.deq.ema_rate,
              bits=likelihood.num_bits(config))
    step_fns = [get_deq_step_fn(sde, score_model, deq_model, scaler, inverse_scaler, tx,
                                train=train, **kw) for train in (True, False)]
    p_train = parallel.get_multi_step_fn(step_fns[0], mesh, n_consts=2)
    p_eval = parallel.get_multi_eval_fn(step_fns[1], mesh, n_consts=2)
    loop = train_lib.Loop(
      folder=deq_dir, n_iters=config.deq.n_iters,
      train_step=lambda s, b: p_train(s, b, score_params, score_state),
      train_batches=train_lib.global_batches(iter(train_ds), scaler, mesh),
      eval_step=lambda s, b: p_eval(s, b, score_params, score_state),
      eval_batches=train_lib.global_batches(iter(eval_ds), scaler, mesh),
      what='dequantizer', lr_flag='deq.lr', progress_desc='dequantizer')
    if jax.process_index() == 0:
      logging.info('Starting dequantizer training at step %d of %d (%s, %d devices, batch %d).',
                   initial_step, config.deq.n_iters, flowpp.model_name(config),
                   jax.device_count(),
                   t.batch_size)
    try:
      return train_lib.run_loop(config, loop, state, ckpt_dir, meta_dir)
    finally:
      ckpt_dir.close()
      meta_dir.close()
  finally:
    train_lib.close_log(handler)


def load_dequantizer(config, workdir, deq_folder=names.DEQ_FOLDER, number=None):
  """(deq_model, EMA params, path) of the newest dequantizer checkpoint under workdir/deq_folder
  (checkpoints/ or checkpoints-meta/), or of checkpoints/checkpoint_<number>."""
  deq_dir = names.deq_dir(workdir, deq_folder)
  ckpt_root = os.path.join(deq_dir, names.CHECKPOINTS)
  meta_root = os.path.join(deq_dir, names.CHECKPOINTS_META)
  dirs = [checkpoints.CheckpointDir(d, create=False) for d in (meta_root, ckpt_root)
          if os.path.isdir(d)]
  if not dirs:
    raise FileNotFoundError(f"No dequantizer checkpoints under '{deq_dir}': train one first "
                            f'(--mode train_deq --workdir {workdir}), or set --deq_folder.')
  deq_model, _, state = init_deq_state(config, jax.random.PRNGKey(config.seed), None)
  if number:
    d = dirs[-1]
    if d.directory != os.path.abspath(ckpt_root) or number not in d.numbers():
      raise FileNotFoundError(f"'{os.path.join(ckpt_root, f'checkpoint_{number}')}' does not "
                              'exist: pick an existing dequantizer checkpoint.')
    state, path = d.restore(number, state), d.path(number)
  else:
    state, path = checkpoints.restore_latest(dirs, state)
    if path is None:
      raise FileNotFoundError(f"No readable dequantizer checkpoint under '{deq_dir}'.")
  for d in dirs:
    d.close()
  return deq_model, state.params_ema, path


def get_dequantize_fn(config, workdir, deq_folder=names.DEQ_FOLDER, number=None):
  """dequantize_fn(rng, images) -> (y, bpd_correction).

  images: 8-bit images in [0, 1] (k / 255, NHWC, unscaled: as datasets.get_dataset with
  uniform_dequantization=False). y = (255 images + noise) / 256 in [0, 1] with noise ~ q(. | x)
  of the trained dequantizer (EMA params), and bpd_correction (B,) = log q(noise | x) / (D ln 2)
  = (log N(u) - sldj) / (D ln 2), so that
    bits/dim = likelihood_fn(rng, params, state, scaler(y))[0] + bpd_correction
  (score_flow's evaluate: bpd + (-logpd) / (D ln 2) with its logpd = -log q).
  Jitted; shard `images` over devices on the batch axis to run data-parallel.
  """
  deq_model, params, path = load_dequantizer(config, workdir, deq_folder, number)
  logging.info('Loaded the variational dequantizer from %s.', path)
  return make_dequantize_fn(deq_model, params, likelihood.num_bits(config))


def make_dequantize_fn(deq_model, params, bits=8):
  """get_dequantize_fn's dequantize_fn(rng, images) -> (y, bpd_correction) for given params."""
  from models import flowpp

  @jax.jit
  def apply(params, rng, images):
    images = jnp.asarray(images, jnp.float32)
    u = jax.random.normal(rng, images.shape, images.dtype)
    noise, sldj = flowpp.get_dequantizer(deq_model, params, train=False)(u, images)
    dim = int(np.prod(images.shape[1:]))
    correction = flowpp.log_q(u, sldj) / (dim * np.log(2.))
    return likelihood.dequantize(images, noise, bits), correction

  def dequantize_fn(rng, images):
    return apply(params, rng, images)

  return dequantize_fn


def compare_bpd(config, workdir, images, rng, deq_folder=names.DEQ_FOLDER, repeats=1, bound=False,
                N=100):
  """(uniform bpd (B,), dequantized bpd (B,)) of the EMA score model checkpoint eval.ckpt_id of
  workdir on 8-bit `images` in [0, 1], averaged over `repeats` draws of the dequantization noise.

  bound=False: the probability-flow ODE (likelihood.get_likelihood_fn, config.eval.rtol/atol,
  one Hutchinson probe per repeat shared by both routes); bound=True: score_flow's variational
  bound with N time samples. Both include the 8-bit offset; the dequantized bpd adds
  get_dequantize_fn's bpd_correction.
  """
  import bound_likelihood
  import datasets
  mesh = parallel.make_mesh()
  sde, model, params, model_state, _ = load_score_model(config, workdir, mesh)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  eps = config.training.smallest_time
  if bound:
    fn = bound_likelihood.get_bound_fn(sde, model, inverse_scaler, dsm=config.eval.dsm, eps=eps,
                                       offset=config.eval.offset, N=N,
                                       bits=likelihood.num_bits(config))
  else:
    ode = likelihood.get_likelihood_fn(sde, model, inverse_scaler, rtol=config.eval.rtol,
                                       atol=config.eval.atol, eps=eps,
                                       bits=likelihood.num_bits(config))
    fn = lambda rng, p, s, x: ode(rng, p, s, x)[0]
  dequantize_fn = get_dequantize_fn(config, workdir, deq_folder)
  images = jnp.asarray(images, jnp.float32)
  uni, deq = [], []
  for r in range(repeats):
    u_rng, d_rng, l_rng = jax.random.split(jax.random.fold_in(rng, r), 3)
    y_uni = likelihood.dequantize(images, jax.random.uniform(u_rng, images.shape),
                                  likelihood.num_bits(config))
    y_deq, correction = dequantize_fn(d_rng, images)
    uni.append(np.asarray(fn(l_rng, params, model_state, scaler(y_uni))))
    deq.append(np.asarray(fn(l_rng, params, model_state, scaler(y_deq))) + np.asarray(correction))
  return np.mean(uni, 0), np.mean(deq, 0)
