"""Up-front validation of a config and the CLI arguments, so that bad input fails in a second with
one line naming the problem and the fix, before JAX compiles anything or a file is written."""
import os
import sys

import jax

import names

# Models whose U-Net halves the resolution len(ch_mult) - 1 times.
UNET_MODELS = ('ncsnpp', 'ddpm')  # DDPM++ is the ncsnpp class with VP settings


def check_sampler_names(config):
  """ValueError (one line) for an unknown sampler, predictor or corrector name in config.sampling.
  Unsupported combinations fail where the sampler is built, before any model or data."""
  import sampling
  s = config.sampling
  if str(s.method).lower() not in sampling.SAMPLER_NAMES:
    raise ValueError(f"Unknown sampler '{s.method}': set config.sampling.method to one of "
                     f"{', '.join(sampling.SAMPLER_NAMES)}.")
  if str(s.method).lower() == 'pc':
    for name, getter in ((s.predictor, sampling.get_predictor), (s.corrector, sampling.get_corrector)):
      if name is not None:
        getter(name)


def check_tfds_available(config):
  """ValueError naming `tfds build` / --config.data.tfds_dir (and manual_dir where the dataset
  needs it) when a TFDS dataset is not prepared offline; imports TensorFlow (seconds) only for
  TFDS datasets, which need it anyway."""
  from absl import logging as absl_logging
  name = config.data.dataset
  if name not in names.TFDS_DATASETS or (
      name == 'ImageNet' and config.data.get('path', '')):
    return
  if 'datasets' not in sys.modules:
    # TensorFlow's C++ start-up lines (oneDNN, CUDA probing) would bury the one-line error.
    err = os.dup(2)
    try:
      with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 2)
        import datasets
    finally:
      os.dup2(err, 2)
      os.close(err)
  import datasets
  tfds_name = datasets.tfds_route(config)[0]
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about the empty folders it probes
  try:
    datasets.tfds_builder(tfds_name, config)
  finally:
    absl_logging.set_verbosity(verbosity)


def validate_config(config, mode='train', workdir=None):
  """Raise ValueError / FileNotFoundError (one line: problem and fix) for a config that cannot
  run in `mode`: the one check of every job (main.py runs it before any folder is made; the jobs
  run it for library callers unless told the caller did; train_deq adds deq_lib.check_config).
  Cheap: builds no model, reads no data; needs the JAX backend only for the device count."""
  import sde_lib
  if mode not in names.MODES:
    raise ValueError(f"Unknown mode '{mode}': set --mode to one of {', '.join(names.MODES)}.")
  if workdir is not None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f"--workdir '{workdir}' is a file: give a directory path (new or existing).")
    if (mode in ('eval', 'train_deq') and not os.path.isdir(workdir)
        and not config.eval.restore_from):
      raise FileNotFoundError(f"--workdir '{workdir}' does not exist: mode {mode} needs the "
                              'working directory of a training run, or '
                              '--config.eval.restore_from.')
  t = config.training
  if str(t.sde).lower() not in sde_lib.SDE_NAMES:
    raise ValueError(f"Unknown SDE '{t.sde}': set --config.training.sde to one of "
                     f"{', '.join(sde_lib.SDE_NAMES)}.")

  import losses
  losses.LossOptions.from_config(config)  # the loss and step options (orders, weights, ...)
  import optim
  optim.get_optimizer(config)  # the optimizer and its learning-rate schedule

  n_jit = t.n_jitted_steps
  if n_jit < 1:
    raise ValueError(f'training.n_jitted_steps is {n_jit}: set it to 1 or more.')
  if mode == 'train':
    for name in ('log_freq', 'eval_freq', 'snapshot_freq', 'snapshot_freq_for_preemption'):
      v = getattr(t, name)
      if v < 1 or v % n_jit:
        raise ValueError(f'training.{name}={v} is not a positive multiple of training.n_jitted_steps'
                         f'={n_jit}: change one of them so logs and checkpoints are not missed.')
    if t.n_iters < 1:
      raise ValueError(f'training.n_iters is {t.n_iters}: set it to 1 or more.')

  n_dev, n_proc = jax.device_count(), jax.process_count()
  batches = [('training.batch_size', t.batch_size)]
  if mode == 'eval':
    batches.append(('eval.batch_size', config.eval.batch_size))
  for name, b in batches:
    if b < 1 or b % n_dev or b % n_proc:
      raise ValueError(f'{name}={b} is not divisible by the {n_dev} devices ({n_proc} process'
                       f'{"es" if n_proc > 1 else ""}): '
                       f'set --config.{name} to a multiple of {n_dev}.')
    n_micro = t.get('n_microbatches', 1)
    if not isinstance(n_micro, int) or n_micro < 1 or (b // n_dev) % n_micro:
      raise ValueError(f'training.n_microbatches={n_micro!r} does not divide the per-device batch '
                       f'{b // n_dev} ({name}={b} over {n_dev} devices): set it to a divisor of '
                       f'{b // n_dev}.')

  from models import utils as mutils
  name = config.model.name
  mutils.get_model(name)  # unknown model -> ValueError
  if name in UNET_MODELS and 'ch_mult' in config.model:
    k = 2 ** (len(tuple(config.model.ch_mult)) - 1)
    size = config.data.image_size
    if size < 1 or size % k:
      raise ValueError(f'data.image_size={size} cannot pass through {name} with ch_mult='
                       f'{tuple(config.model.ch_mult)} (it halves the size {k.bit_length() - 1} '
                       f'times): use an image size divisible by {k} or a shorter ch_mult.')
  bits = config.data.get('num_bits', 8)
  if not isinstance(bits, int) or not 1 <= bits <= 8 or (
      bits != 8 and config.data.uniform_dequantization):
    raise ValueError(f'data.num_bits is {bits!r}: set --config.data.num_bits to an integer in 1..8 '
                     '(below 8 only with data.uniform_dequantization=False).')
  if config.data.dataset not in names.KNOWN_DATASETS:
    raise ValueError(f"Unknown dataset '{config.data.dataset}': set --config.data.dataset to one "
                     f"of {', '.join(sorted(names.KNOWN_DATASETS))}.")
  if mode == 'train':
    if t.snapshot_sampling:
      check_sampler_names(config)
    check_tfds_available(config)
  if config.data.dataset.upper() == 'NPZ' and not os.path.isfile(config.data.path or ''):
    raise FileNotFoundError(f"data.path '{config.data.path}' is not a file: set "
                            '--config.data.path to the .npz file of the NPZ dataset.')

  if mode == 'train' and t.restore_from:
    import restore_from
    restore_from.check_readable(t.restore_from)
  if mode in ('eval', 'train_deq') and config.eval.restore_from:
    import restore_from
    restore_from.check_readable(config.eval.restore_from, restore_from.EVAL_FLAG, one=True)
  if mode == 'eval':
    validate_eval(config, workdir)
  if mode == 'fid_stats':
    validate_fid_stats(config)


def _check_inception_handle(config):
  handle = str(config.eval.inception_handle)
  if '://' not in handle and not os.path.isdir(handle):
    raise ValueError(f"Inception module directory '{handle}' does not exist: pass the local "
                     'SavedModel directory of tfgan/eval/inception/1 (or its TF-Hub URL) with '
                     '--config.eval.inception_handle.')


def validate_eval(config, workdir=None):
  """Checks of config.eval (and config.sampling when sampling) for --mode eval: names, sizes, the
  checkpoints (none in the workdir with eval.restore_from) and the Inception stats file, before
  anything is built or written."""
  e = config.eval
  if str(e.bpd_dataset).lower() not in ('train', 'test'):
    raise ValueError(f"eval.bpd_dataset is '{e.bpd_dataset}': set --config.eval.bpd_dataset to "
                     "'train' or 'test'.")
  for name in ('num_repeats',) if e.restore_from else ('num_repeats', 'begin_ckpt'):
    if getattr(e, name) < 1:
      raise ValueError(f'eval.{name} is {getattr(e, name)}: set --config.eval.{name} to 1 or more.')
  if e.end_ckpt < e.begin_ckpt and not e.restore_from:
    raise ValueError(f'eval.end_ckpt={e.end_ckpt} is below eval.begin_ckpt={e.begin_ckpt}: set '
                     '--config.eval.end_ckpt >= --config.eval.begin_ckpt.')
  if e.num_bpd_batches < 0:
    raise ValueError(f'eval.num_bpd_batches is {e.num_bpd_batches}: set it to 0 (whole split) or '
                     'a positive number of batches.')
  if str(e.likelihood_solver).lower() not in ('jax', 'scipy'):
    raise ValueError(f"Unknown likelihood solver '{e.likelihood_solver}': set "
                     "--config.eval.likelihood_solver to 'jax' or 'scipy'.")
  if str(e.likelihood_solver).lower() == 'scipy' and jax.process_count() > 1:
    raise ValueError("eval.likelihood_solver='scipy' runs on one host: use 'jax' for a "
                     'multi-process evaluation.')
  if e.hutchinson_type not in ('Rademacher', 'Gaussian'):
    raise ValueError(f"eval.hutchinson_type is '{e.hutchinson_type}': set it to 'Rademacher' or "
                     "'Gaussian'.")
  deq = names.dequantizer_name(e.dequantizer)
  k = e.get('num_deq_samples', 1)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'eval.num_deq_samples is {k!r}: set --config.eval.num_deq_samples to an '
                     'integer >= 1 (1: the usual one-draw bits/dim).')
  if names.is_toy(config) and (deq != 'uniform' or k > 1):
    raise ValueError(f'{config.data.dataset} is continuous toy data, not dequantized: leave '
                     'eval.dequantizer and eval.num_deq_samples at their defaults.')
  if e.enable_bpd and e.bound and e.bound_num_times < 1:
    raise ValueError(f'eval.bound_num_times is {e.bound_num_times}: set it to 1 or more.')
  if e.enable_sampling:
    if names.is_toy(config):
      raise ValueError(f'IS/FID/KID need images, {config.data.dataset} is flat toy data: set '
                       '--config.eval.enable_sampling=False.')
    if e.num_samples < 2:
      raise ValueError(f'eval.num_samples is {e.num_samples}: KID needs at least 2 samples; set '
                       '--config.eval.num_samples to 2 or more.')
    check_sampler_names(config)
    _check_inception_handle(config)
    path = names.stats_path(config)
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f'Inception stats file {path} not found (eval.enable_sampling needs it): make it with '
        f'`python main.py --config <config> --workdir <dir> --mode fid_stats` (same '
        '--config.eval.stats_dir and --config.eval.inception_handle), or set '
        '--config.eval.stats_dir to the folder that holds it.')
  if workdir is not None and not e.wait_for_ckpt and not e.restore_from:
    missing = [n for n in range(e.begin_ckpt, e.end_ckpt + 1)
               if not os.path.isdir(names.checkpoint_path(workdir, n))]
    if missing:
      ckpt_dir = os.path.join(workdir, names.CHECKPOINTS)
      have = names.checkpoint_numbers(ckpt_dir)
      raise FileNotFoundError(
        f'checkpoint_{missing[0]} not found in {ckpt_dir} (it holds '
        f'{", ".join(f"checkpoint_{n}" for n in have) or "none"}): set --config.eval.begin_ckpt / '
        '--config.eval.end_ckpt to existing checkpoints, or --config.eval.wait_for_ckpt=True to '
        'wait for training to write them.')


def validate_fid_stats(config):
  """Checks for --mode fid_stats: image data, the Inception module, no silent overwrite."""
  if names.is_toy(config):
    raise ValueError(f'Inception stats need images, {config.data.dataset} is flat toy data: use an '
                     'image dataset.')
  if config.eval.stats_num_images < 0:
    raise ValueError(f'eval.stats_num_images is {config.eval.stats_num_images}: set 0 (all) or a '
                     'positive count.')
  _check_inception_handle(config)
  path = names.stats_path(config)
  if os.path.exists(path) and not config.eval.overwrite_stats:
    raise ValueError(f'Inception stats file {path} already exists: pass '
                     '--config.eval.overwrite_stats=True to replace it, or another '
                     '--config.eval.stats_dir.')
