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
model (EMA params of W/checkpoints/checkpoint_{deq.score_ckpt}, newest if 0) stays fixed.

Bits/dim with the dequantizer (score_flow's evaluate): for an 8-bit image x = k / 255, u ~ N(0, I),
(noise, sldj) = dequantizer(u, x), y = (255 x + noise) / 256 in bin k,
  bpd = bpd_model(y) + log q(noise | x) / (D ln 2),   log q = log N(u; 0, I) - sldj,
with bpd_model(y) the ODE (or bound) bits/dim of scaler(y) including the 8-bit offset
log2(d inverse_scaler / dx) + 8 (likelihood.get_likelihood_fn). Uniform dequantization is the
case q = 1 (correction 0). get_dequantize_fn returns y and that correction.
"""
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import checkpoints
import run_lib
from run_lib import global_batch, host_batch, make_mesh, replicate, replicated


def deq_dir_of(workdir, deq_folder):
  """The dequantizer's directory: workdir/deq_folder, or deq_folder itself when it already lies
  inside workdir or is absolute (main.py passes os.path.join(workdir, --deq_folder))."""
  work = os.path.abspath(workdir)
  path = os.path.abspath(deq_folder)
  if os.path.isabs(deq_folder) or os.path.dirname(path) == work:
    return path
  return os.path.join(workdir, deq_folder)


def get_deq_optimizer(config):
  """losses.get_optimizer with config.deq.{lr, warmup, grad_clip} in place of config.optim's."""
  import losses  # pylint: disable=import-outside-toplevel
  cfg = config.copy_and_resolve_references()
  cfg.unlock()
  cfg.optim.lr = float(config.deq.lr)
  cfg.optim.warmup = config.deq.warmup
  cfg.optim.grad_clip = float(config.deq.grad_clip)
  return losses.get_optimizer(cfg)


def _check_config(config):
  deq = config.deq
  if deq.n_iters < 1:
    raise ValueError(f'deq.n_iters is {deq.n_iters}: set --config.deq.n_iters to 1 or more.')
  if not 0. <= deq.ema_rate < 1.:
    raise ValueError(f'deq.ema_rate is {deq.ema_rate}: set --config.deq.ema_rate in [0, 1).')
  import datasets  # pylint: disable=import-outside-toplevel
  if datasets.is_toy(config):
    raise ValueError(f'dequantization needs 8-bit images; {config.data.dataset} is a toy '
                     'dataset: use an image config.')
  t = config.training
  for name in ('log_freq', 'eval_freq', 'snapshot_freq', 'snapshot_freq_for_preemption'):
    v = getattr(t, name)
    if v < 1 or v % t.n_jitted_steps:
      raise ValueError(f'training.{name}={v} is not a positive multiple of '
                       f'training.n_jitted_steps={t.n_jitted_steps}: change one of them.')
  from models.flowpp import get_variant  # pylint: disable=import-outside-toplevel
  get_variant(deq.model)


def load_score_model(config, workdir, mesh, number=None):
  """(sde, model, params_ema, model_state, path) of workdir/checkpoints/checkpoint_<number>
  (number 0 or None: the newest good one), replicated over the mesh."""
  import sde_lib  # pylint: disable=import-outside-toplevel
  sde, _ = sde_lib.get_sde(config)
  ckpt_root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_root):
    raise FileNotFoundError(f"'{ckpt_root}' does not exist: train the score model first "
                            f'(--mode train --workdir {workdir}).')
  ckpt_dir = checkpoints.CheckpointDir(ckpt_root, create=False)
  model, _, state = run_lib.build_state(config, jax.random.PRNGKey(config.seed))
  state = replicate(state, mesh)
  if number:
    if number not in ckpt_dir.numbers():
      raise FileNotFoundError(f"'{ckpt_dir.path(number)}' does not exist: set "
                              f'--config.deq.score_ckpt to one of {ckpt_dir.numbers()} '
                              '(0 = newest).')
    state, path = ckpt_dir.restore(number, state), ckpt_dir.path(number)
  else:
    state, path = checkpoints.restore_latest([ckpt_dir], state)
    if path is None:
      raise FileNotFoundError(f"'{ckpt_root}' holds no readable checkpoint: train the score "
                              'model first.')
  ckpt_dir.close()
  return sde, model, state.params_ema, state.model_state, path


def init_deq_state(config, rng, init_images, mesh=None):
  """(deq_model, tx, host TrainState) with a data-dependent init on images in [0, 1]."""
  import train_state as ts  # pylint: disable=import-outside-toplevel
  from models import flowpp  # pylint: disable=import-outside-toplevel
  rng, init_rng = jax.random.split(rng)
  init_images = None if init_images is None else np.asarray(init_images, np.float32)
  deq_model, params = flowpp.init_dequantizer(init_rng, config, batch=init_images,
                                              jit=config.deq.model == 'tiny')
  tx = get_deq_optimizer(config)
  state = ts.create_train_state(rng, config, deq_model, params, {}, tx)
  return deq_model, tx, state


def get_deq_step_fn(sde, score_model, deq_model, scaler, inverse_scaler, tx, train=True,
                    eps=1e-5, offset=True, ema_rate=0.99):
  """step_fn((state, score_params, score_state), batch) -> (carry, metrics).

  Train: Adam on the dequantizer params (the score model is an input, never updated), EMA of the
  params, a fresh rng; a non-finite loss or gradient keeps params, opt_state and EMA (and counts
  it in nonfinite_count). Eval (train=False): the loss of the EMA params.
  metrics: 'loss' (nats per example), 'bpd', 'finite'.
  """
  import losses  # pylint: disable=import-outside-toplevel
  loss_fn = losses.get_dequantization_loss_fn(sde, score_model, deq_model, scaler, inverse_scaler,
                                              train=train, importance_weighting=True, eps=eps,
                                              offset=offset)

  def step_fn(carry, batch):
    state, score_params, score_state = carry
    rng, step_rng = jax.random.split(state.rng)
    if train:
      (loss, bpd), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        step_rng, state.params, score_params, score_state, batch)
      all_finite = losses._all_finite  # pylint: disable=protected-access
      finite = jnp.logical_and(jnp.isfinite(loss), all_finite(grads))
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
    return (new_state, score_params, score_state), {'loss': loss, 'bpd': bpd, 'finite': finite}

  return step_fn


def _multi_step(step_fn, mesh, train):
  """jit(scan(step_fn)) over [n_jitted_steps, batch, ...]: states replicated, batch sharded."""
  repl = replicated(mesh)

  def multi(state, score_params, score_state, batch):
    if not train:
      state = state.replace(rng=jax.random.fold_in(state.rng, 0x5eed))
    (state, _, _), metrics = jax.lax.scan(step_fn, (state, score_params, score_state), batch)
    return (state, metrics) if train else metrics

  return jax.jit(multi, in_shardings=(repl, repl, repl, run_lib.batch_sharding(mesh)),
                 out_shardings=repl, donate_argnums=(0,) if train else ())


def _log_to_file(deq_dir):
  """Also log to deq_dir/stdout.txt (process 0) unless a handler already writes there (main.py)."""
  if jax.process_index() != 0:
    return None
  target = os.path.abspath(os.path.join(deq_dir, 'stdout.txt'))
  root = logging.getLogger()
  for h in root.handlers:
    if os.path.abspath(getattr(getattr(h, 'stream', None), 'name', '') or '') == target:
      return None
  handler = logging.StreamHandler(open(target, 'a'))
  handler.setFormatter(logging.Formatter(
    '%(levelname)s - %(filename)s - %(asctime)s - %(message)s'))
  root.addHandler(handler)
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  return handler


def train_deq(config, workdir, deq_folder='deq'):
  """Train the Flow++ dequantizer of config.deq for the score model of workdir; resumes from the
  newest checkpoint under the dequantizer's directory. Returns the final (replicated) state."""
  _check_config(config)
  import datasets  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  deq_dir = deq_dir_of(workdir, deq_folder)
  is_main = jax.process_index() == 0
  tb_dir = os.path.join(deq_dir, 'tensorboard')
  if is_main:
    os.makedirs(tb_dir, exist_ok=True)
  handler = _log_to_file(deq_dir)
  writer = run_lib._Writer(tb_dir)  # pylint: disable=protected-access
  try:
    t = config.training
    mesh = make_mesh()
    sde, score_model, score_params, score_state, score_path = load_score_model(
      config, workdir, mesh, config.deq.score_ckpt)
    logging.info('Loaded the score model (EMA params) from %s.', score_path)

    tf.random.set_seed(config.seed + jax.process_index())
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=t.n_jitted_steps,
                                                uniform_dequantization=False)
    train_iter, eval_iter = iter(train_ds), iter(eval_ds)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)

    # Data-dependent init on the first training batch (images in [0, 1]), as the original.
    init_images = np.asarray(next(iter(train_ds))['image'])[0]
    deq_model, tx, state = init_deq_state(config, jax.random.PRNGKey(config.seed), init_images)
    state = replicate(state, mesh)
    ckpt_dir = checkpoints.CheckpointDir(os.path.join(deq_dir, 'checkpoints'))
    meta_dir = checkpoints.CheckpointDir(os.path.join(deq_dir, 'checkpoints-meta'),
                                         latest_only=True)
    state, restored_from = checkpoints.restore_latest([meta_dir, ckpt_dir], state)
    initial_step = int(checkpoints.to_host(state.step))
    if restored_from is not None:
      logging.info('Resuming dequantizer training from %s at step %d.', restored_from,
                   initial_step)

    kw = dict(eps=t.smallest_time, offset=config.deq.offset, ema_rate=config.deq.ema_rate)
    p_train = _multi_step(get_deq_step_fn(sde, score_model, deq_model, scaler, inverse_scaler,
                                          tx, train=True, **kw), mesh, True)
    p_eval = _multi_step(get_deq_step_fn(sde, score_model, deq_model, scaler, inverse_scaler,
                                         tx, train=False, **kw), mesh, False)

    n_jit, n_iters = t.n_jitted_steps, config.deq.n_iters
    if is_main:
      logging.info('Starting dequantizer training at step %d of %d (%s, %d devices, batch %d).',
                   initial_step, n_iters, config.deq.model, jax.device_count(), t.batch_size)
    mean = lambda m, k: float(np.mean(checkpoints.to_host(m[k])))
    step, tic = initial_step, time.time()
    ema_train_bpd = None
    while step < n_iters:
      batch = global_batch(host_batch(train_iter, scaler), mesh)
      state, metrics = p_train(state, score_params, score_state, batch)
      if not np.all(checkpoints.to_host(metrics['finite'])):
        if t.nonfinite == 'stop':
          raise run_lib.NonFiniteError(
            f'Non-finite dequantizer loss near step {step + n_jit}; stopped without saving this '
            'state. Resume from the last checkpoint with a lower --config.deq.lr, or set '
            "training.nonfinite='skip'.")
        logging.warning('Skipped a non-finite dequantizer step near step %d.', step + n_jit)
      step += n_jit
      if step % t.log_freq == 0 or step == initial_step + n_jit:
        m = {'loss': mean(metrics, 'loss'), 'bpd': mean(metrics, 'bpd')}
        ema_train_bpd = m['bpd'] if ema_train_bpd is None else 0.9 * ema_train_bpd + 0.1 * m['bpd']
        if is_main:
          rate = (step - initial_step) / max(time.time() - tic, 1e-9)
          logging.info('step: %d, training_loss: %.5e, training_bpd: %.5e, ema_bpd: %.5e '
                       '(%.2f steps/s)', step, m['loss'], m['bpd'], ema_train_bpd, rate)
          writer.scalars(m, step, 'training')
      if step % t.snapshot_freq_for_preemption == 0:
        meta_dir.save(step // t.snapshot_freq_for_preemption, state)
      if step % t.eval_freq == 0:
        em = p_eval(state, score_params, score_state,
                    global_batch(host_batch(eval_iter, scaler), mesh))
        em = {'loss': mean(em, 'loss'), 'bpd': mean(em, 'bpd')}
        if is_main:
          logging.info('step: %d, eval_loss: %.5e, eval_bpd: %.5e', step, em['loss'], em['bpd'])
          writer.scalars(em, step, 'eval')
      if step % t.snapshot_freq == 0 or step >= n_iters:
        path = ckpt_dir.save(max(step // t.snapshot_freq, 1), state)
        if is_main:
          logging.info('Saved dequantizer checkpoint %s (step %d).', path, step)
    logging.info('Dequantizer training done at step %d.', step)
    ckpt_dir.close()
    meta_dir.close()
    return state
  finally:
    writer.close()
    if handler is not None:
      logging.getLogger().removeHandler(handler)
      handler.close()


def load_dequantizer(config, workdir, deq_folder='deq', number=None):
  """(deq_model, EMA params, path) of the newest dequantizer checkpoint under the dequantizer's
  directory (checkpoints/ or checkpoints-meta/), or of checkpoints/checkpoint_<number>."""
  deq_dir = deq_dir_of(workdir, deq_folder)
  ckpt_root = os.path.join(deq_dir, 'checkpoints')
  meta_root = os.path.join(deq_dir, 'checkpoints-meta')
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


def get_dequantize_fn(config, workdir, deq_folder='deq', number=None):
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
  return make_dequantize_fn(deq_model, params)


def make_dequantize_fn(deq_model, params):
  """get_dequantize_fn's dequantize_fn(rng, images) -> (y, bpd_correction) for given params."""
  from models import flowpp  # pylint: disable=import-outside-toplevel

  @jax.jit
  def apply(params, rng, images):
    images = jnp.asarray(images, jnp.float32)
    u = jax.random.normal(rng, images.shape, images.dtype)
    noise, sldj = flowpp.get_dequantizer(deq_model, params, train=False)(u, images)
    dim = int(np.prod(images.shape[1:]))
    correction = flowpp.log_q(u, sldj) / (dim * np.log(2.))
    return (images * 255. + noise) / 256., correction

  def dequantize_fn(rng, images):
    return apply(params, rng, images)

  return dequantize_fn


def compare_bpd(config, workdir, images, rng, deq_folder='deq', repeats=1, bound=False, N=100):
  """(uniform bpd (B,), dequantized bpd (B,)) of the EMA score model of workdir on 8-bit
  `images` in [0, 1], averaged over `repeats` draws of the dequantization noise.

  bound=False: the probability-flow ODE (likelihood.get_likelihood_fn, config.eval.rtol/atol,
  one Hutchinson probe per repeat shared by both routes); bound=True: score_flow's variational
  bound with N time samples. Both include the 8-bit offset; the dequantized bpd adds
  get_dequantize_fn's bpd_correction.
  """
  import bound_likelihood  # pylint: disable=import-outside-toplevel
  import datasets  # pylint: disable=import-outside-toplevel
  import likelihood  # pylint: disable=import-outside-toplevel
  mesh = make_mesh()
  sde, model, params, model_state, _ = load_score_model(config, workdir, mesh,
                                                        config.deq.score_ckpt)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  eps = config.training.smallest_time
  if bound:
    fn = bound_likelihood.get_bound_fn(sde, model, inverse_scaler, dsm=config.eval.dsm, eps=eps,
                                       offset=config.eval.offset, N=N)
  else:
    ode = likelihood.get_likelihood_fn(sde, model, inverse_scaler, rtol=config.eval.rtol,
                                       atol=config.eval.atol, eps=eps)
    fn = lambda rng, p, s, x: ode(rng, p, s, x)[0]
  dequantize_fn = get_dequantize_fn(config, workdir, deq_folder)
  images = jnp.asarray(images, jnp.float32)
  uni, deq = [], []
  for r in range(repeats):
    u_rng, d_rng, l_rng = jax.random.split(jax.random.fold_in(rng, r), 3)
    y_uni = (images * 255. + jax.random.uniform(u_rng, images.shape)) / 256.
    y_deq, correction = dequantize_fn(d_rng, images)
    uni.append(np.asarray(fn(l_rng, params, model_state, scaler(y_uni))))
    deq.append(np.asarray(fn(l_rng, params, model_state, scaler(y_deq))) + np.asarray(correction))
  return np.mean(uni, 0), np.mean(deq, 0)
