"""Names shared by every job, without TensorFlow or JAX: the CLI's modes, dataset families,
dequantizer names, workdir folders and files, checkpoint and statistics paths.

Workdir of a training run (run_lib.train; the dequantizer's folder, W/deq, has the same layout):
  stdout.txt                    console log (process 0)
  tensorboard/                  TensorBoard events
  checkpoints/checkpoint_N      periodic, N = step // snapshot_freq (all kept)
  checkpoints-meta/checkpoint_N pre-emption, N = step // snapshot_freq_for_preemption (latest)
  samples/iter_STEP/            snapshot samples (EMA params) at each checkpoint
  eval/                         results of --mode eval (eval_lib.py), --eval_folder
  deq/                          the variational dequantizer (deq_lib.py), --deq_folder
"""
import os
import re

MODES = ('train', 'eval', 'train_deq', 'fid_stats')  # main.py --mode
TOY_DATASETS = ('MOG1D', 'CHECKERBOARD', 'SWISSROLL', 'POINT')
TFDS_DATASETS = ('CIFAR10', 'SVHN', 'MNIST', 'CELEBA', 'LSUN', 'ImageNet')
LOCAL_DATASETS = ('DIGITS', 'NPZ', 'PATTERNS')
KNOWN_DATASETS = TFDS_DATASETS + LOCAL_DATASETS + TOY_DATASETS
DEQUANTIZERS = ('uniform', 'flowpp', 'truncated_normal')  # eval.dequantizer

LOG_FILE = 'stdout.txt'
TENSORBOARD = 'tensorboard'
CHECKPOINTS = 'checkpoints'
CHECKPOINTS_META = 'checkpoints-meta'
SAMPLES = 'samples'
EVAL_FOLDER = 'eval'
DEQ_FOLDER = 'deq'
EVAL_SUMMARY = 'summary.json'  # a checkpoint's means, in its eval folder
EVAL_SUMMARY_CSV = 'summary.csv'  # one row per checkpoint, in the eval folder
_CHECKPOINT_RE = re.compile(r'^checkpoint_(\d+)$')


def is_toy(config_or_name):
  """Whether a dataset name (or config) is one of the flat low-dimensional toy distributions."""
  name = config_or_name if isinstance(config_or_name, str) else config_or_name.data.dataset
  return name in TOY_DATASETS


def dequantizer_name(value):
  """eval.dequantizer -> one of DEQUANTIZERS (False: 'uniform', True: 'flowpp', as score_flow's)."""
  name = {False: 'uniform', True: 'flowpp'}[value] if isinstance(value, bool) else value
  if name not in DEQUANTIZERS:
    raise ValueError(f'eval.dequantizer is {value!r}: set --config.eval.dequantizer to one of '
                     f"{', '.join(DEQUANTIZERS)} (True / False: 'flowpp' / 'uniform').")
  return name


def checkpoint_path(workdir, number):
  """workdir/checkpoints/checkpoint_N as training writes it (a complete orbax folder)."""
  return os.path.join(workdir, CHECKPOINTS, f'checkpoint_{number}')


def checkpoint_numbers(directory):
  """The N of every checkpoint_N in directory, ascending ([] if it does not exist); unfinished
  orbax saves (checkpoint_N.orbax-checkpoint-tmp-*) are not checkpoints."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(m.group(1)) for m in map(_CHECKPOINT_RE.match, names) if m)


def deq_dir(workdir, deq_folder=DEQ_FOLDER):
  """The dequantizer's directory: the folder deq_folder (--deq_folder) of workdir."""
  return os.path.join(workdir, deq_folder)


def stats_filename(config):
  """cifar10_stats.npz, imagenet32_stats.npz (score_flow's names), else <dataset>_stats.npz."""
  dataset = config.data.dataset
  size = config.data.image_size
  if dataset.upper() == 'CIFAR10':
    name = 'cifar10'
  elif dataset.lower() == 'imagenet':
    name = f'imagenet{size}'
  elif dataset.upper() == 'LSUN' and config.data.get('category', None):
    name = f'lsun_{config.data.category}_{size}'
  elif dataset.upper() == 'NPZ' and config.data.get('path', ''):
    # One stats file per .npz data file, so that two NPZ datasets never share stats.
    name = 'npz_' + os.path.splitext(os.path.basename(config.data.path))[0]
  else:
    name = dataset.lower()
  return f'{name}_stats.npz'


def stats_path(config):
  """config.eval.stats_dir/<stats_filename>: the Inception statistics that FID/KID compare with."""
  return os.path.join(config.eval.stats_dir, stats_filename(config))
