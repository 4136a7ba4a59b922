"""Evaluation of training checkpoints (--mode eval): eval loss, bits/dim by the probability-flow
ODE or the variational bound, ScoreODE score diagnostics, and IS/FID/KID of samples.

Eval folder layout (workdir/eval_folder):
  stdout.txt, settings.json     log; the settings the stored results were made with
  ckpt_N/loss.npz               eval loss per batch of the eval split (EMA params)
  ckpt_N/bpd/batch_R_I.npz      per-example bpd (nll nats for toy data) and nfe of repeat R, batch I
  ckpt_N/samples/samples_R.npz  sampling round R: uint8 samples, Inception pool_3 and logits
  ckpt_N/summary.json           the checkpoint's means; summary.csv: one row per checkpoint
  NAME/...                      the same for the file eval.restore_from names (NAME: its base
                                name), with NAME/source.txt: the file's real path
Every file is written to a temporary name and renamed, and every batch / round draws its noise
from fold_in(seed, checkpoint, part, repeat, batch), so a killed evaluation rerun with the same
command skips what is stored and ends with exactly the results of an uninterrupted run. A file
named checkpoint_N draws the noise of checkpoint N (any other name: of checkpoint 0), so it scores
exactly what the same weights score as the workdir's checkpoint_N.
"""
import dataclasses
import json
import logging
import math
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
import config_checks
import dequantizers
import eval_batches
import eval_files
import names
import parallel
import restore_from
import train_lib
from eval_files import load_npz, save_npz, write_text


def _is_main():
  return jax.process_index() == 0


@dataclasses.dataclass
class _Checkpoint:
  """One checkpoint under evaluation: what every part of it reads, and its state, loaded on first
  use (only when some result is not stored yet)."""
  config: object
  mesh: object
  scaler: object       # data -> model space
  number: int          # N of checkpoint_N: the checkpoint its noise is drawn for (eval_key)
  label: str           # how logs name it: N, or the eval.restore_from file's name
  path: str            # the checkpoint's folder or file
  folder: str          # eval_dir/ckpt_N or eval_dir/NAME, where its results go
  load: object         # () -> the replicated state (EMA params scored)
  step_fn: object = None  # () -> its training step without loading it, where that is cheap
  _state: object = None

  @property
  def state(self):
    if self._state is None:
      self._state = self.load()
      if _is_main():
        logging.info('Restored %s (step %d).', self.path,
                     int(checkpoints.to_host(self._state.step)))
    return self._state

  def step(self):
    """The training step of the checkpoint."""
    return self.step_fn() if self.step_fn else int(checkpoints.to_host(self.state.step))

  def key(self, kind, *indices):
    """This checkpoint's noise of one part, repeat and batch (eval_key)."""
    return eval_key(self.config.seed, self.number, kind, *indices)


def file_name(path):
  """The name of eval.restore_from's results folder: the file's (or checkpoint_N folder's) name."""
  return os.path.basename(os.path.normpath(path))


def check_restore_from(config, workdir, eval_folder=names.EVAL_FOLDER):
  """ValueError / FileNotFoundError (one line) if eval.restore_from cannot be scored with this
  config (missing, damaged, another model's tree: matched on shapes to jax.eval_shape of the
  state, no model built) or its results folder holds another file's; main.py runs it before the
  eval folder is made."""
  path = config.eval.restore_from
  if not path:
    return
  restore_from.check_ema_fits(path, train_lib.abstract_state(config))
  eval_files.check_source(os.path.join(workdir, eval_folder, file_name(path)), path, False)


def _checkpoints(config, workdir, eval_dir, mesh, scaler, host_state):
  """The checkpoints to evaluate, one at a time: the file eval.restore_from, or workdir's
  checkpoint_{begin_ckpt..end_ckpt} (each waited for where eval.wait_for_ckpt asks)."""
  e = config.eval
  if e.restore_from:
    path = e.restore_from
    name = file_name(path)
    yield _Checkpoint(config, mesh, scaler, checkpoints.checkpoint_number(path) or 0, name, path,
                      os.path.join(eval_dir, name),
                      lambda: restore_from.load_ema(path, host_state, mesh))
    return
  target = parallel.replicate(host_state, mesh)
  for ckpt in range(e.begin_ckpt, e.end_ckpt + 1):
    path = _wait_for_checkpoint(config, workdir, ckpt)
    ckpts = _read_only_ckpt_dir(os.path.join(workdir, names.CHECKPOINTS))
    try:
      yield _Checkpoint(config, mesh, scaler, ckpt, str(ckpt), path,
                        os.path.join(eval_dir, f'ckpt_{ckpt}'),
                        lambda: ckpts.restore(ckpt, target), lambda: ckpts.training_step(ckpt))
    finally:
      ckpts.close()


def eval_key(seed, ckpt, kind, *indices):
  """The key of one unit of eval work: PRNGKey(seed + 1) folded with ckpt, crc32(kind) and the
  indices; a rerun draws exactly the noise of an uninterrupted run, whatever was skipped."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), ckpt)
  key = jax.random.fold_in(key, zlib.crc32(kind.encode()) & 0x7fffffff)
  for i in indices:
    key = jax.random.fold_in(key, i)
  return key


def _wait_for_checkpoint(config, workdir, ckpt):
  """workdir/checkpoints/checkpoint_<ckpt>: fail fast if missing, or with eval.wait_for_ckpt poll
  every eval.wait_poll s for at most eval.wait_timeout s (0: forever)."""
  e = config.eval
  path = names.checkpoint_path(workdir, ckpt)
  if os.path.isdir(path):
    return path
  if not e.wait_for_ckpt:
    raise FileNotFoundError(f'{path} not found: set --config.eval.begin_ckpt / end_ckpt to '
                            'existing checkpoints, or --config.eval.wait_for_ckpt=True to wait.')
  if _is_main():
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


def _progress(total, desc, unit):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit=unit, disable=not _is_main(), dynamic_ncols=True)


def _eval_loss(ck, eval_ds, p_eval_step):
  """Eval loss (EMA params) over the whole eval split, ckpt_N/loss.npz; reused when stored."""
  path = os.path.join(ck.folder, 'loss.npz')
  if not os.path.exists(path):
    state = ck.state
    deq = ck.config.data.uniform_dequantization and not names.is_toy(ck.config)
    rows = []
    for i, batch in enumerate(eval_ds):
      images = parallel.to_numpy(batch['image'])
      if deq:  # the training data's dequantization, with per-batch noise
        u = np.asarray(jax.random.uniform(ck.key('loss_dequantize', i), images.shape,
                                          jnp.float32))
        images = (images * 255. + u) / 256.
      x = parallel.global_batch({'image': np.asarray(ck.scaler(images), np.float32)[None]},
                                ck.mesh)
      st = state.replace(rng=parallel.replicate(ck.key('loss', i), ck.mesh))
      metrics = p_eval_step(st, x)
      rows.append({k: float(parallel.host(v)[0]) for k, v in metrics.items() if k.startswith('loss')})
    if not rows:
      raise ValueError('the eval split yielded no batch: lower --config.eval.batch_size.')
    arrays = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    if _is_main():
      save_npz(path, **arrays)
  else:
    arrays = load_npz(path)
  return {f'eval_{k}': float(np.mean(v)) for k, v in arrays.items()}


def _eval_batches(ck, ds, repeats, parts, dequantize_fn):
  """The per-batch parts (bits/dim, ...) over `repeats` passes of ds, one file per batch and part;
  stored batches are skipped (the data are read in the same order and the noise of every batch is
  fixed by eval_key), so a resumed run stores exactly the batches of an uninterrupted one."""
  e = ck.config.eval
  dirs = {p.name: os.path.join(ck.folder, p.name) for p in parts}
  done = {}
  for name, d in dirs.items():
    if _is_main():
      os.makedirs(d, exist_ok=True)
    done[name] = set(os.listdir(d)) if os.path.isdir(d) else set()
  parallel.sync(f'eval_batches_{ck.number}')  # every process decided what is stored before anyone writes
  limit = e.num_bpd_batches or None
  try:
    per_pass = len(ds)
  except TypeError:
    per_pass = None
  per_pass = min(per_pass, limit) if per_pass and limit else (per_pass or limit)
  results = {p.name: {} for p in parts}
  n_draws, index = e.get('num_deq_samples', 1), []
  what = ', '.join('bits/dim' if n == 'bpd' else n.replace('_', ' ') for n in dirs)
  bar = _progress(repeats * per_pass if per_pass else None, f'ckpt {ck.label} {what}', 'batch')
  n_seen = 0
  for r in range(repeats):
    for i, batch in enumerate(ds):
      if limit and i >= limit:
        break
      fname = f'batch_{r}_{i}.npz'
      prepared = []
      for p in parts:
        path = os.path.join(dirs[p.name], fname)
        if fname in done[p.name]:
          out = load_npz(path)
        else:
          state = ck.state
          draws = n_draws if p.name == 'bpd' else 1  # draw k > 0 folds k into draw 0's keys
          while len(prepared) < draws:
            images = parallel.global_batch(
              parallel.to_numpy(batch['image']).astype(np.float32), ck.mesh, batch_axis=0)
            k = (len(prepared),) if prepared else ()
            data, deq_bpd = dequantize_fn(ck.key('dequantize', r, i, *k), images)
            prepared.append({'image': ck.scaler(data), 'deq_bpd': deq_bpd})
          tic = time.time()
          keys = [ck.key(p.name, r, i, *((k,) if k else ())) for k in range(draws)]
          out = eval_batches.run_part(p, keys, state.params_ema, state.model_state,
                                      prepared[:draws])
          out = {k: parallel.host(v) for k, v in out.items()}
          out['seconds'] = np.asarray(time.time() - tic)
          if _is_main():
            save_npz(path, **out)
        for k, v in out.items():
          results[p.name].setdefault(k, []).append(v)
      index.append((r, i))
      n_seen += 1
      if _is_main() and 'bpd' in results and 'bpd' in results['bpd']:
        logging.info('ckpt: %s, repeat: %d, batch: %d, mean bpd: %.6f', ck.label, r, i,
                     float(np.mean(np.concatenate([np.ravel(a) for a in results['bpd']['bpd']]))))
      bar.update(1)
  bar.close()
  if n_seen == 0:
    raise ValueError(f'the {e.bpd_dataset} split yielded no batch: lower --config.eval.batch_size.')
  summary = {}
  for p in parts:
    if p.name == 'ode_score':
      summary.update(eval_batches.ode_score_summary(results[p.name], ck.folder, _is_main()))
    else:
      summary.update(eval_batches.mean_results(results[p.name],
                                               '' if p.name == 'bpd' else f'{p.name}_'))
  if 'bpd' in results:
    summary.update(eval_batches.repeat_reports(results['bpd']['bpd'], index))
  if 'seconds' in summary:
    summary['seconds_per_batch'] = summary.pop('seconds')
  return summary


def _eval_samples(ck, sample_fn, inception, data_pools):
  """ceil(num_samples / batch_size) sampling rounds (ckpt_N/samples/samples_R.npz with uint8
  samples and their Inception pool_3 / logits; stored rounds are skipped), then IS/FID/KID of
  the first num_samples against the dataset stats."""
  import evaluation
  e = ck.config.eval
  sdir = os.path.join(ck.folder, names.SAMPLES)
  if _is_main():
    os.makedirs(sdir, exist_ok=True)
  done = set(os.listdir(sdir)) if os.path.isdir(sdir) else set()
  parallel.sync(f'eval_samples_{ck.number}')
  n_rounds = math.ceil(e.num_samples / e.batch_size)
  bar = _progress(n_rounds, f'ckpt {ck.label} sampling', 'round')
  for r in range(n_rounds):
    path = os.path.join(sdir, f'samples_{r}.npz')
    if f'samples_{r}.npz' not in done:
      state = ck.state
      samples, nfe = sample_fn(ck.key('sample', r), state.params_ema, state.model_state)
      images = np.clip(parallel.host(samples) * 255., 0, 255).astype(np.uint8)  # as score_flow
      if _is_main():
        latents = evaluation.run_inception(images, inception, batch_size=min(e.batch_size, 256))
        save_npz(path, samples=images, pool_3=latents['pool_3'], logits=latents['logits'],
                  nfe=parallel.host(nfe))
        logging.info('sampling -- ckpt: %s, round: %d', ck.label, r)
    bar.update(1)
  bar.close()
  parallel.sync(f'eval_samples_done_{ck.number}')
  if not _is_main():
    return {}
  rounds = [load_npz(os.path.join(sdir, f'samples_{r}.npz')) for r in range(n_rounds)]
  pools = np.concatenate([d['pool_3'] for d in rounds])[:e.num_samples]
  logits = np.concatenate([d['logits'] for d in rounds])[:e.num_samples]
  metrics = evaluation.compute_metrics(logits, pools, data_pools)
  return {'IS': float(metrics['IS']), 'fid': float(metrics['fid']), 'kid': float(metrics['kid']),
          'num_samples': int(pools.shape[0]),
          'sampling_nfe': float(np.mean([d['nfe'] for d in rounds]))}


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


def evaluate(config, workdir, eval_folder=names.EVAL_FOLDER, deq_folder=names.DEQ_FOLDER,
             check=True):
  """Evaluates checkpoints eval.begin_ckpt..eval.end_ckpt of workdir/checkpoints, or the file
  eval.restore_from (EMA params): eval loss (eval.enable_loss), bits/dim by the probability-flow
  ODE or the variational bound (eval.enable_bpd, eval.bound) and IS/FID/KID of samples
  (eval.enable_sampling). Results go to workdir/eval_folder (layout in the module docstring);
  pre-emption safe (rerun to resume). check=False skips config_checks.validate_config and
  check_restore_from when the caller has run them (main.py).
  """
  if check:
    config_checks.validate_config(config, 'eval', workdir)
    check_restore_from(config, workdir, eval_folder)
  import datasets
  import evaluation
  import sampling
  import sde_lib
  from models import utils as mutils

  e = config.eval
  is_main = _is_main()
  eval_dir = os.path.join(workdir, eval_folder)
  if is_main:
    os.makedirs(eval_dir, exist_ok=True)
  eval_files.check_settings(eval_dir, config, is_main)
  sde, sampling_eps = sde_lib.get_sde(config)
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)

  # Everything that can fail on user input comes before the model and the data.
  if not e.restore_from:
    _wait_for_checkpoint(config, workdir, e.begin_ckpt)
  sampler = None
  if e.enable_sampling:
    shape = (e.batch_size,) + tuple(mutils.get_data_shape(config))
    sampler = sampling.get_sampler(config, sde, shape, inverse_scaler, sampling_eps)
  dequantize_fn = None
  if e.enable_bpd or e.enable_ode_score:
    dequantize_fn = dequantizers.get_dequantize_fn(config, workdir, deq_folder, sde, inverse_scaler)
  mesh = parallel.make_mesh()
  inception = data_pools = sample_fn = None
  if e.enable_sampling:
    data_pools = evaluation.load_dataset_stats(config)['pool_3']
    inception = evaluation.get_inception_model(e.inception_handle)

  model, tx, host_state = train_lib.build_state(config, jax.random.PRNGKey(config.seed))
  parts = eval_batches.get_batch_parts(config, sde, model, inverse_scaler)
  if e.enable_sampling:
    sample_fn = jax.jit(lambda rng, params, ms: sampler(rng, (model, params, ms)),
                        out_shardings=(NamedSharding(mesh, P(parallel.DATA_AXIS)),
                                       parallel.replicated(mesh)))
  p_eval_step = None
  if e.enable_loss:
    p_eval_step = parallel.get_multi_eval_fn(train_lib.get_step_fns(config, sde, model, tx)[1],
                                             mesh, model=config.model.name)
  train_ds = eval_ds = bpd_ds = None
  repeats = 1
  if e.enable_loss or parts:
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=None,
                                                uniform_dequantization=False, evaluation=True,
                                                shuffle=False)
    # As score_flow: the training split once, the test split eval.num_repeats times.
    train_bpd = str(e.bpd_dataset).lower() == 'train'
    bpd_ds, repeats = (train_ds, 1) if train_bpd else (eval_ds, e.num_repeats)

  summary = None
  for ck in _checkpoints(config, workdir, eval_dir, mesh, scaler, host_state):
    if is_main:
      os.makedirs(ck.folder, exist_ok=True)
    if e.restore_from:
      eval_files.check_source(ck.folder, ck.path, is_main)
    summary = {'ckpt': ck.number, 'step': ck.step()}
    if e.restore_from:
      summary['restore_from'] = os.path.realpath(ck.path)
    tic = time.time()
    if e.enable_loss:
      summary.update(_eval_loss(ck, eval_ds, p_eval_step))
    if parts:
      summary.update(_eval_batches(ck, bpd_ds, repeats, parts, dequantize_fn))
    if e.enable_sampling:
      summary.update(_eval_samples(ck, sample_fn, inception, data_pools))
    if is_main:
      summary['seconds_this_run'] = time.time() - tic
      write_text(os.path.join(ck.folder, names.EVAL_SUMMARY), json.dumps(summary, indent=2))
      eval_files.write_summary_csv(eval_dir)
      logging.info('ckpt-%s --- %s', ck.label, ', '.join(
        f'{k}: {v:.6e}' if isinstance(v, float) else f'{k}: {v}' for k, v in summary.items()
        if k != 'ckpt' and not isinstance(v, list)))
    parallel.sync(f'eval_ckpt_{ck.number}')
  return summary
