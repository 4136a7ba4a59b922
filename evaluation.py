"""Sample-quality evaluation: the TF-Hub Inception network, IS / FID / KID, dataset stats files.

Faithful to score_sde / score_flow (which used tensorflow-gan, unimportable on TF >= 2.16):
- images are uint8 in [0, 255], cast to float32 and mapped to [-1, 1] by (x - 127.5) / 127.5,
  then fed at their own resolution to the TF-Hub module `tensorflow/tfgan/eval/inception/1`
  (the module itself resizes to 299x299, as tfgan's `run_classifier_fn` relied on);
- outputs 'pool_3' (N, 2048) and 'logits' (N, 1008), flattened to 2-D as tfgan did;
- IS = tfgan `classifier_score_from_logits` (one split over all samples, float64, all 1008
  logits); FID = tfgan `frechet_classifier_distance_from_activations` (float64 means, unbiased
  covariances, Tr sqrt(S1 S2) through symmetric square roots); KID = tfgan
  `kernel_classifier_distance_and_std_from_activations` (polynomial kernel (x.y/d + 1)^3,
  unbiased MMD^2 per block, averaged over blocks of at most 1024);
- stats files `{stats_dir}/{cifar10|imagenet32|...}_stats.npz` hold the key 'pool_3'.
The maths is numpy/scipy; TensorFlow only runs the Inception SavedModel, on the CPU, so that JAX
keeps the accelerators.
"""
import io
import os

from absl import logging
import numpy as np
import scipy.special

from names import stats_filename, stats_path
import tf_import
from tf_import import tf

INCEPTION_TFHUB = 'https://tfhub.dev/tensorflow/tfgan/eval/inception/1'
INCEPTION_OUTPUT = 'logits'
INCEPTION_FINAL_POOL = 'pool_3'
INCEPTION_POOL_DIM = 2048
INCEPTION_LOGITS_DIM = 1008
KID_MAX_BLOCK_SIZE = 1024


# ----------------------------------------------------------------------------------------------
# Inception network
# ----------------------------------------------------------------------------------------------

def _is_remote(handle):
  return '://' in handle


def get_inception_model(handle=None):
  """Loads the Inception module with `tensorflow_hub.load` from a TF-Hub handle or local dir.

  `handle` defaults to the TF-Hub module the originals used. Offline machines: download the
  module where there is internet (it is cached under $TFHUB_CACHE_DIR, or extract the
  `?tf-hub-format=compressed` tarball) and pass the SavedModel directory with
  --config.eval.inception_handle=/path.
  """
  handle = handle or INCEPTION_TFHUB
  handle = os.fspath(handle)
  fix = ('download the module on a machine with internet access and pass its local SavedModel '
         'directory with --config.eval.inception_handle=/path')
  if not _is_remote(handle) and not os.path.isdir(handle):
    raise ValueError(f'Inception module directory {handle!r} does not exist; {fix}.')
  tf_import.import_tensorflow()  # before tensorflow_hub imports it: quiet, off the GPUs
  import tensorflow_hub as hub
  try:
    model = hub.load(handle)
  except Exception as e:  # no network, bad archive, not a SavedModel ...
    msg = str(e).splitlines()[0] if str(e) else ''
    raise ValueError(f'Cannot load the Inception module {handle!r} ({type(e).__name__}: '
                     f'{msg[:200]}); {fix}.') from e
  return model


def to_uint8(images):
  """float images in [0, 1] -> uint8 as the originals stored samples: clip(x * 255).astype(uint8)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'images must be uint8 in [0, 255] or float in [0, 1], got {images.dtype}; '
                     'convert them first.')
  if images.size and (images.max() > 2. or images.min() < -1.):
    raise ValueError(f'float images must lie in [0, 1] (got range [{images.min():.3g}, '
                     f'{images.max():.3g}]); pass uint8 for [0, 255] data or apply the inverse '
                     'data scaler.')
  return np.clip(images * 255., 0, 255).astype(np.uint8)


def _call_model(model, inputs):
  """One forward pass; returns a dict of 2-D numpy arrays (tfgan flattened every output)."""
  if callable(model):
    outputs = model(tf.constant(inputs))
  else:  # only serving signatures: they take keyword arguments
    sig = model.signatures['default']
    (name,) = sig.structured_input_signature[1].keys()
    outputs = sig(**{name: tf.constant(inputs)})
  if not (isinstance(outputs, dict) and INCEPTION_FINAL_POOL in outputs
          and INCEPTION_OUTPUT in outputs):
    keys = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
    raise ValueError(f'The Inception module returned {keys}, not a dict with {INCEPTION_FINAL_POOL!r}'
                     f' and {INCEPTION_OUTPUT!r}; point --config.eval.inception_handle at the '
                     'tfgan/eval/inception/1 module.')
  return {k: np.asarray(v).reshape((inputs.shape[0], -1)) for k, v in outputs.items()
          if k in (INCEPTION_FINAL_POOL, INCEPTION_OUTPUT)}


def run_inception(images, model, batch_size=256, resize_to=None):
  """Images (N, H, W, C) -> dict(pool_3=(N, 2048), logits=(N, 1008)) float32 numpy arrays.

  `images`: uint8 in [0, 255], or float in [0, 1] (quantised with `to_uint8`, as the originals
  did with samples). One-channel images are tiled to RGB. Each batch is mapped to [-1, 1] by
  (x - 127.5) / 127.5 and fed at its own resolution, as score_sde did (the tfgan module resizes
  to 299 internally). `resize_to=299` resizes first (bilinear), only for modules that do not.
  """
  images = to_uint8(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be (N, H, W, 1 or 3), got shape {images.shape}; reshape them.')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  outs = {INCEPTION_FINAL_POOL: [], INCEPTION_OUTPUT: []}
  for i in range(0, images.shape[0], batch_size):
    inputs = (images[i:i + batch_size].astype(np.float32) - 127.5) / 127.5
    if resize_to:
      inputs = tf.image.resize(inputs, [resize_to, resize_to], method='bilinear').numpy()
    res = _call_model(model, inputs)
    for k in outs:
      outs[k].append(res[k])
  if images.shape[0] == 0:
    return {INCEPTION_FINAL_POOL: np.zeros((0, INCEPTION_POOL_DIM), np.float32),
            INCEPTION_OUTPUT: np.zeros((0, INCEPTION_LOGITS_DIM), np.float32)}
  return {k: np.concatenate(v, axis=0) for k, v in outs.items()}


# ----------------------------------------------------------------------------------------------
# Metrics (numpy / scipy, float64)
# ----------------------------------------------------------------------------------------------

def _as_2d(x, name):
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'{name} must be a 2-D (num_examples, dim) array, got shape {x.shape}.')
  return x


def classifier_score_from_logits(logits):
  """Inception score exp(E_x KL(p(y|x) || p(y))) from (N, classes) logits, one split (as tfgan)."""
  logits = _as_2d(logits, 'logits')
  log_p = scipy.special.log_softmax(logits, axis=1)
  p = np.exp(log_p)
  q = p.mean(axis=0)
  # p * (log p - log q); terms with p == 0 contribute 0 (tfgan would give nan if q underflows).
  with np.errstate(divide='ignore', invalid='ignore'):
    kl = np.where(p > 0, p * (log_p - np.log(q)), 0.).sum(axis=1)
  return float(np.exp(kl.mean()))


inception_score = classifier_score_from_logits


def feature_moments(features):
  """(N, d) features -> (mean (d,), unbiased covariance (d, d)) in float64, as tfgan."""
  features = _as_2d(features, 'features')
  if features.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors for a covariance, got {features.shape[0]}.')
  return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


def _symmetric_sqrt(mat):
  """Square root of a symmetric PSD matrix by eigh; tiny negative eigenvalues are set to 0."""
  mat = (mat + mat.T) / 2.
  w, v = np.linalg.eigh(mat)
  return (v * np.sqrt(np.clip(w, 0., None))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
  """Tr sqrt(sigma1 sigma2) = Tr sqrt(A sigma2 A) with A = sqrt(sigma1): real and stable."""
  a = _symmetric_sqrt(sigma1)
  m = a @ sigma2 @ a
  # Tr sqrt(M) = sum sqrt(eigenvalues of M); eigenvalues only, the cheaper half of eigh.
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.), 0., None))))


def frechet_distance_from_moments(mu1, sigma1, mu2, sigma2):
  """|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) (Frechet distance of Gaussians)."""
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'mismatched moments: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / '
                     f'{sigma2.shape}; both sets must have the same feature dimension.')
  mean_term = float(np.sum((mu1 - mu2) ** 2))
  return mean_term + float(np.trace(sigma1) + np.trace(sigma2)) - 2. * trace_sqrt_product(
      sigma1, sigma2)


def frechet_distance(features1, features2):
  """FID from two (N, d) feature sets (e.g. dataset pool_3 and sample pool_3)."""
  f1, f2 = _as_2d(features1, 'features1'), _as_2d(features2, 'features2')
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f'feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}.')
  return frechet_distance_from_moments(*feature_moments(f1), *feature_moments(f2))


def _kid_block_sizes(n, n_blocks):
  """tfgan's split: n_blocks - r blocks of n // n_blocks, then r blocks of one more."""
  v = n // n_blocks
  r = n - v * n_blocks
  sizes = [v] * (n_blocks - r) + [v + 1] * r
  return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def kernel_inception_distance_and_std(features1, features2, max_block_size=KID_MAX_BLOCK_SIZE):
  """Unbiased block estimate of MMD^2 with k(x, y) = (x.y / d + 1)^3 and its standard error.

  As tfgan: both sets are cut into the same number of blocks (ceil(max(n1, n2) / max_block_size));
  per block the unbiased MMD^2 (diagonals dropped from the within-set terms); mean over blocks;
  std = sqrt(var_blocks (ddof 1) / n_blocks) (nan for a single block). Inputs must be shuffled.
  """
  f1, f2 = _as_2d(features1, 'features1'), _as_2d(features2, 'features2')
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f'feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}.')
  n1, n2, d = f1.shape[0], f2.shape[0], f1.shape[1]
  n_blocks = int(np.ceil(max(n1, n2) / max_block_size))
  if n_blocks < 1 or min(n1, n2) < 2 * n_blocks:
    raise ValueError(f'KID needs at least 2 examples per block: got {n1} and {n2} examples for '
                     f'{n_blocks} block(s); use more examples or a larger max_block_size.')
  ind1, ind2 = _kid_block_sizes(n1, n_blocks), _kid_block_sizes(n2, n_blocks)
  ests = np.empty(n_blocks)
  for i in range(n_blocks):
    r, g = f1[ind1[i]:ind1[i + 1]], f2[ind2[i]:ind2[i + 1]]
    m, n = r.shape[0], g.shape[0]
    k_rr = (r @ r.T / d + 1) ** 3
    k_rg = (r @ g.T / d + 1) ** 3
    k_gg = (g @ g.T / d + 1) ** 3
    ests[i] = (-2 * k_rg.mean() + (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
               + (k_gg.sum() - np.trace(k_gg)) / (n * (n - 1)))
  mean = float(ests.mean())
  std = float(np.sqrt(ests.var(ddof=1) / n_blocks)) if n_blocks > 1 else float('nan')
  return mean, std


def kernel_inception_distance(features1, features2, max_block_size=KID_MAX_BLOCK_SIZE):
  """KID (tfgan's unbiased block estimator); see `kernel_inception_distance_and_std`."""
  return kernel_inception_distance_and_std(features1, features2, max_block_size)[0]


def compute_metrics(sample_logits, sample_pools, data_pools):
  """The originals' report: dict(IS, fid, kid) with FID/KID against the dataset's pool_3."""
  return dict(IS=classifier_score_from_logits(sample_logits),
              fid=frechet_distance(data_pools, sample_pools),
              kid=kernel_inception_distance(data_pools, sample_pools))


# ----------------------------------------------------------------------------------------------
# Dataset statistics files
# ----------------------------------------------------------------------------------------------

def load_dataset_stats(config):
  """Loads {stats_dir}/{name}_stats.npz -> dict of arrays (key 'pool_3'; 'logits' if present)."""
  path = stats_path(config)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'Inception stats file {path} not found; create it with `python main.py --config <cfg> '
        f'--workdir W --mode fid_stats` (or download {stats_filename(config)} from score_flow\'s '
        f'assets/stats into {config.eval.stats_dir}).')
  with tf.io.gfile.GFile(path, 'rb') as fin:
    with np.load(io.BytesIO(fin.read())) as data:
      stats = {k: np.asarray(data[k]) for k in data.files}
  if INCEPTION_FINAL_POOL not in stats:
    raise ValueError(f'stats file {path} has no {INCEPTION_FINAL_POOL!r} array (keys '
                     f'{sorted(stats)}); recreate it with `--mode fid_stats`.')
  return stats


def _batch_images(batch):
  """A dataset element -> numpy images (N, H, W, C), whatever leading batch dims it has."""
  images = batch['image'] if isinstance(batch, dict) else batch
  images = images.numpy() if hasattr(images, 'numpy') else np.asarray(images)
  if images.ndim < 4:
    raise ValueError(f'Inception stats need image data (..., H, W, C), got shape {images.shape}; '
                     'use an image dataset in config.data.dataset.')
  return images.reshape((-1,) + images.shape[-3:])


def compute_dataset_stats(config, inception_model=None, out_path=None, max_images=None,
                          batch_size=None):
  """Runs Inception over the training split and writes an npz with 'pool_3' and 'logits'.

  Images come from `datasets.get_dataset(config, evaluation=True)` without dequantisation (one
  epoch; its batches drop the remainder, as score_sde's did), in [0, 1] (a pipeline that yields
  scaled [-1, 1] data for centered configs is mapped back by the inverse scaler), and are rounded
  to their exact uint8 bytes. `batch_size` is Inception's (default config.eval.batch_size).
  Returns the written path (default: `stats_path(config)`).
  """
  import datasets
  from tqdm import tqdm
  if inception_model is None:
    inception_model = get_inception_model(config.eval.inception_handle)
  out_path = out_path or stats_path(config)
  batch_size = batch_size or config.eval.batch_size
  train_ds, _, _ = datasets.get_dataset(config, additional_dim=None, uniform_dequantization=False,
                                        evaluation=True)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  try:
    total = len(train_ds)
  except TypeError:
    total = None
  pools, logits, count = [], [], 0
  unscale = None
  for batch in tqdm(train_ds, total=total, desc='Inception stats', unit='batch'):
    images = _batch_images(batch)
    if unscale is None:
      # datasets.py yields [0, 1] images; centered data scaled to [-1, 1] always has negative
      # pixels, so decide once from the first batch whether to undo the scaling.
      unscale = bool(config.data.centered and images.min() < 0.)
    if unscale:
      images = np.asarray(inverse_scaler(images))
    if max_images is not None:
      images = images[:max_images - count]
    images = np.round(np.clip(images * 255., 0, 255)).astype(np.uint8)
    res = run_inception(images, inception_model, batch_size=batch_size)
    pools.append(res[INCEPTION_FINAL_POOL])
    logits.append(res[INCEPTION_OUTPUT])
    count += images.shape[0]
    if max_images is not None and count >= max_images:
      break
  if count == 0:
    raise ValueError(f'the training split of {config.data.dataset} yielded no images; check '
                     'config.data (path / tfds_dir) and that eval.batch_size <= its size.')
  tf.io.gfile.makedirs(os.path.dirname(out_path) or '.')
  tmp = out_path + '.tmp.npz'
  buf = io.BytesIO()
  np.savez_compressed(buf, pool_3=np.concatenate(pools), logits=np.concatenate(logits))
  with tf.io.gfile.GFile(tmp, 'wb') as fout:
    fout.write(buf.getvalue())
  tf.io.gfile.rename(tmp, out_path, overwrite=True)
  logging.info('Wrote Inception stats of %d images to %s', count, out_path)
  return out_path
