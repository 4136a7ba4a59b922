"""The entry points of main.py, under the names score_sde users know: train, evaluate, train_deq
and fid_stats. Each job lives in its own module:

  train_lib.py   training of the score model (and the guarded loop the dequantizer shares)
  eval_lib.py    --mode eval: eval loss, bits/dim, ScoreODE diagnostics, IS/FID/KID
  deq_lib.py     --mode train_deq: the Flow++ variational dequantizer
  parallel.py    the device mesh, shardings, global batches, multi-host helpers
  names.py       workdir folders and file names (no TensorFlow, no JAX)
"""
import logging

import config_checks
import deq_lib
import names
from eval_lib import evaluate
from train_lib import NonFiniteError, build_state, train

# The names code written against score_sde imports from here.
__all__ = ['train', 'evaluate', 'train_deq', 'fid_stats', 'build_state', 'NonFiniteError']


def train_deq(config, workdir, deq_folder=names.DEQ_FOLDER, check=True):
  """Train the Flow++ variational dequantizer for the score model of workdir, in its folder
  deq_folder (deq_lib.py)."""
  return deq_lib.train_deq(config, workdir, deq_folder, check=check)


def fid_stats(config, workdir, check=True):
  """Inception pool_3 statistics of the training split -> config.eval.stats_dir/<name>_stats.npz
  (names.stats_path), the file that eval.enable_sampling compares samples with. Refuses to
  replace an existing file unless eval.overwrite_stats. Run it as a single process."""
  del workdir  # the stats belong to the dataset, not to a run
  if check:
    config_checks.validate_config(config, 'fid_stats')
  import evaluation
  e = config.eval
  inception = evaluation.get_inception_model(e.inception_handle)
  path = evaluation.compute_dataset_stats(config, inception, max_images=e.stats_num_images or None)
  logging.info('Inception stats of %s written to %s.', config.data.dataset, path)
  return path
