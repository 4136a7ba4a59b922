"""evaluation.py against closed forms (Gaussian Frechet distance, exact MMD^2 of discrete laws,
entropies) and a tiny SavedModel with the TF-Hub Inception module's interface. Never downloads."""
import itertools
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from configs import base_config
import evaluation


# ----------------------------------------------------------------------------------------------
# Inception score
# ----------------------------------------------------------------------------------------------

def test_inception_score_uniform_logits_is_one():
  assert evaluation.classifier_score_from_logits(np.zeros((10, 1008))) == pytest.approx(1., abs=1e-12)


def test_inception_score_confident_distinct_classes_is_class_count():
  k = 7
  logits = np.zeros((3 * k, 1008))
  logits[np.arange(3 * k), np.repeat(np.arange(k) * 100, 3)] = 100.  # one-hot, k classes equally
  assert evaluation.classifier_score_from_logits(logits) == pytest.approx(k, rel=1e-9)


def test_inception_score_confident_is_exp_entropy_of_class_frequencies():
  counts = np.array([1, 2, 3, 4])
  labels = np.repeat(np.arange(4) * 11, counts)
  logits = np.zeros((labels.size, 1008), np.float32)
  logits[np.arange(labels.size), labels] = 80.
  w = counts / counts.sum()
  expected = np.exp(-np.sum(w * np.log(w)))
  assert evaluation.classifier_score_from_logits(logits) == pytest.approx(expected, rel=1e-6)
  # Shifting each row's logits changes nothing (softmax invariance).
  shifted = logits + np.random.RandomState(0).randn(labels.size, 1)
  assert evaluation.classifier_score_from_logits(shifted) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------

def _random_spd(rng, d):
  a = rng.randn(d, d)
  return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
  f = np.random.RandomState(0).randn(500, 32) * 3 + 1
  assert abs(evaluation.frechet_distance(f, f)) < 1e-8


def test_fid_from_moments_matches_closed_forms():
  rng = np.random.RandomState(1)
  # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
  assert evaluation.frechet_distance_from_moments(
      np.array([1.]), np.array([[4.]]), np.array([-2.]), np.array([[9.]])) == pytest.approx(
          9. + 1.)
  # Diagonal covariances: |dm|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  m1, m2 = rng.randn(6), rng.randn(6)
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert evaluation.frechet_distance_from_moments(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(
      expected, rel=1e-10)
  # General SPD: Tr sqrt(S1 S2) by scipy's (non-symmetric) sqrtm.
  s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
  m1, m2 = rng.randn(8), rng.randn(8)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean))
  assert evaluation.frechet_distance_from_moments(m1, s1, m2, s2) == pytest.approx(
      expected, rel=1e-8)
  with pytest.raises(ValueError, match='mismatched'):
    evaluation.frechet_distance_from_moments(m1, s1, m2[:3], s2[:3, :3])


def test_fid_of_large_gaussian_samples_matches_closed_form():
  rng = np.random.RandomState(2)
  d, n = 4, 200_000
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  m1, m2 = rng.randn(d), rng.randn(d) * 0.5
  f1 = rng.randn(n, d) @ np.linalg.cholesky(s1).T + m1
  f2 = rng.randn(n, d) @ np.linalg.cholesky(s2).T + m2
  expected = evaluation.frechet_distance_from_moments(m1, s1, m2, s2)
  # Unbiased covariances, as tfgan.
  mu, sigma = evaluation.feature_moments(f1)
  np.testing.assert_allclose(sigma, np.cov(f1.T, ddof=1), rtol=1e-12)
  assert evaluation.frechet_distance(f1, f2) == pytest.approx(expected, rel=2e-2, abs=1e-2)
  assert evaluation.frechet_distance(f1, f1[::-1] + 0.) == pytest.approx(0., abs=1e-8)


def test_fid_rank_deficient_covariances_real_and_symmetric():
  rng = np.random.RandomState(3)
  f1, f2 = rng.randn(40, 100), rng.randn(30, 100) + 0.2  # fewer samples than dimensions
  fid12, fid21 = evaluation.frechet_distance(f1, f2), evaluation.frechet_distance(f2, f1)
  assert np.isfinite(fid12) and isinstance(fid12, float) and fid12 > 0
  assert fid12 == pytest.approx(fid21, rel=1e-8)


# ----------------------------------------------------------------------------------------------
# Kernel inception distance
# ----------------------------------------------------------------------------------------------

def _naive_unbiased_mmd2(x, y):
  """Explicit double loops over pairs (i != j within a set)."""
  d = x.shape[1]
  k = lambda a, b: (np.dot(a, b) / d + 1) ** 3
  kxx = np.mean([k(x[i], x[j]) for i, j in itertools.permutations(range(len(x)), 2)])
  kyy = np.mean([k(y[i], y[j]) for i, j in itertools.permutations(range(len(y)), 2)])
  kxy = np.mean([k(a, b) for a in x for b in y])
  return kxx + kyy - 2 * kxy


def test_kid_single_block_is_the_unbiased_u_statistic():
  rng = np.random.RandomState(4)
  x, y = rng.randn(9, 3), rng.randn(7, 3) + 0.3
  mean, std = evaluation.kernel_inception_distance_and_std(x, y)
  assert mean == pytest.approx(_naive_unbiased_mmd2(x, y), rel=1e-10)
  assert np.isnan(std)


def test_kid_blocks_split_as_tfgan():
  rng = np.random.RandomState(5)
  x, y = rng.randn(23, 3), rng.randn(17, 3) + 0.5
  # max(23, 17) / 8 -> 3 blocks; x: 7, 8, 8; y: 5, 6, 6 (the larger blocks last).
  bx, by = [0, 7, 15, 23], [0, 5, 11, 17]
  ests = [_naive_unbiased_mmd2(x[bx[i]:bx[i + 1]], y[by[i]:by[i + 1]]) for i in range(3)]
  mean, std = evaluation.kernel_inception_distance_and_std(x, y, max_block_size=8)
  assert mean == pytest.approx(np.mean(ests), rel=1e-10)
  assert std == pytest.approx(np.std(ests, ddof=1) / np.sqrt(3), rel=1e-10)
  with pytest.raises(ValueError, match='per block'):
    evaluation.kernel_inception_distance(x[:3], y, max_block_size=8)


def _exact_mmd2(px, py):
  """Population MMD^2 of two uniform laws on finite point sets (independent pairs)."""
  d = px.shape[1]
  k = lambda a, b: (a @ b.T / d + 1) ** 3
  return k(px, px).mean() + k(py, py).mean() - 2 * k(px, py).mean()


@pytest.mark.parametrize('shift', [0., 0.6])
def test_kid_is_unbiased_for_the_population_mmd2(shift):
  rng = np.random.RandomState(6)
  px = rng.randn(5, 2)
  py = px + shift if shift else px.copy()
  truth = _exact_mmd2(px, py)
  draws = [evaluation.kernel_inception_distance(px[rng.randint(5, size=300)],
                                                py[rng.randint(5, size=250)], max_block_size=100)
           for _ in range(40)]
  sem = np.std(draws, ddof=1) / np.sqrt(len(draws))
  assert abs(np.mean(draws) - truth) < 4 * sem
  if shift:
    assert truth > 0 and np.mean(draws) > 10 * sem  # clearly positive for shifted laws


def test_kid_same_gaussian_mean_zero_and_shifted_positive():
  rng = np.random.RandomState(7)
  same = [evaluation.kernel_inception_distance(rng.randn(200, 8), rng.randn(200, 8))
          for _ in range(30)]
  sem = np.std(same, ddof=1) / np.sqrt(len(same))
  assert abs(np.mean(same)) < 4 * sem
  shifted = evaluation.kernel_inception_distance(rng.randn(400, 8), rng.randn(400, 8) + 1.)
  assert shifted > 20 * sem


def test_compute_metrics_report_fields():
  rng = np.random.RandomState(8)
  pools = rng.randn(300, 16)
  m = evaluation.compute_metrics(rng.randn(300, 1008), pools, pools[::-1])
  assert set(m) == {'IS', 'fid', 'kid'} and abs(m['fid']) < 1e-8 and m['IS'] > 1


# ----------------------------------------------------------------------------------------------
# Inception module (a tiny SavedModel with the TF-Hub module's interface)
# ----------------------------------------------------------------------------------------------

class _FakeInception(tf.Module):
  """Like tfgan/eval/inception/1: float32 images in [-1, 1] of any size -> dict(pool_3, logits)."""

  def __init__(self, w_pool, w_logits):
    super().__init__()
    self.w_pool = tf.Variable(w_pool)
    self.w_logits = tf.Variable(w_logits)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  def __call__(self, images):
    tf.debugging.assert_less_equal(tf.reduce_max(tf.abs(images)), 1.)
    pool = tf.reduce_mean(images, axis=[1, 2]) @ self.w_pool
    return {'pool_3': pool, 'logits': pool @ self.w_logits}


_W = np.random.RandomState(9)
W_POOL = _W.randn(3, 2048).astype(np.float32)
W_LOGITS = (_W.randn(2048, 1008) / 45).astype(np.float32)


def _expected_pool(images_uint8):
  x = (images_uint8.astype(np.float64) - 127.5) / 127.5
  return x.mean(axis=(1, 2)) @ W_POOL


@pytest.fixture(scope='module')
def inception_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('inception')
  module = _FakeInception(W_POOL, W_LOGITS)
  tf.saved_model.save(module, str(path), signatures={'default': module.__call__})
  return str(path)


@pytest.fixture(scope='module')
def inception(inception_dir):
  return evaluation.get_inception_model(inception_dir)


def test_run_inception_uint8_preprocessing_and_batching(inception):
  images = np.random.RandomState(10).randint(0, 256, size=(7, 8, 8, 3)).astype(np.uint8)
  out = evaluation.run_inception(images, inception, batch_size=3)
  assert out['pool_3'].shape == (7, 2048) and out['logits'].shape == (7, 1008)
  assert out['pool_3'].dtype == np.float32
  np.testing.assert_allclose(out['pool_3'], _expected_pool(images), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['logits'], out['pool_3'] @ W_LOGITS, rtol=1e-3, atol=1e-3)
  # Batch size does not change the result.
  np.testing.assert_allclose(evaluation.run_inception(images, inception, batch_size=64)['pool_3'],
                             out['pool_3'], rtol=1e-6, atol=1e-6)


def test_run_inception_float_and_grey_inputs(inception):
  rng = np.random.RandomState(11)
  levels = rng.randint(0, 256, size=(4, 5, 6, 1))
  floats = ((levels + 0.4) / 255.).astype(np.float32)  # quantised by truncation, as the originals
  out = evaluation.run_inception(floats, inception)
  grey = np.repeat(levels.astype(np.uint8), 3, axis=-1)
  np.testing.assert_allclose(out['pool_3'], _expected_pool(grey), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    evaluation.run_inception(floats * 255., inception)


def test_run_inception_optional_resize(inception):
  levels = np.random.RandomState(14).randint(0, 256, size=(3, 1, 1, 3)).astype(np.uint8)
  flat = np.tile(levels, (1, 5, 5, 1))  # constant images: bilinear resizing keeps every pixel
  out = evaluation.run_inception(flat, inception, resize_to=299)
  np.testing.assert_allclose(out['pool_3'], _expected_pool(flat), rtol=1e-3, atol=1e-2)


def test_run_inception_through_serving_signature(inception):
  sig_only = types.SimpleNamespace(signatures=inception.signatures)
  images = np.random.RandomState(12).randint(0, 256, size=(2, 4, 4, 3)).astype(np.uint8)
  np.testing.assert_allclose(evaluation.run_inception(images, sig_only)['pool_3'],
                             _expected_pool(images), rtol=1e-4, atol=1e-4)


def test_missing_inception_dir_gives_clear_error(tmp_path):
  missing = str(tmp_path / 'no_inception_here')
  with pytest.raises(ValueError) as e:
    evaluation.get_inception_model(missing)
  msg = str(e.value)
  assert missing in msg and '--config.eval.inception_handle' in msg and '\n' not in msg


def test_unreachable_inception_url_gives_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('TFHUB_CACHE_DIR', str(tmp_path))
  url = 'http://127.0.0.1:9/tfgan/eval/inception/1'  # refused locally; nothing is downloaded
  with pytest.raises(ValueError) as e:
    evaluation.get_inception_model(url)
  assert url in str(e.value) and '--config.eval.inception_handle' in str(e.value)


def test_not_an_inception_module_is_rejected(tmp_path):
  class Other(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, x):
      return {'features': tf.reduce_mean(x, axis=[1, 2])}
  tf.saved_model.save(Other(), str(tmp_path))
  model = evaluation.get_inception_model(str(tmp_path))
  with pytest.raises(ValueError, match='pool_3'):
    evaluation.run_inception(np.zeros((1, 4, 4, 3), np.uint8), model)


# ----------------------------------------------------------------------------------------------
# Stats files
# ----------------------------------------------------------------------------------------------

def _config(tmp_path, dataset='CIFAR10', size=32, centered=False):
  config = base_config.get_base_config()
  config.data.dataset = dataset
  config.data.image_size = size
  config.data.centered = centered
  config.eval.stats_dir = str(tmp_path / 'stats')
  config.eval.batch_size = 4
  return config


def test_stats_filenames(tmp_path):
  assert evaluation.stats_filename(_config(tmp_path)) == 'cifar10_stats.npz'
  assert evaluation.stats_filename(_config(tmp_path, 'ImageNet', 32)) == 'imagenet32_stats.npz'
  assert evaluation.stats_filename(_config(tmp_path, 'CELEBA')) == 'celeba_stats.npz'
  config = _config(tmp_path, 'LSUN', 64)
  config.data.category = 'church_outdoor'
  assert evaluation.stats_filename(config) == 'lsun_church_outdoor_64_stats.npz'
  config = _config(tmp_path, 'NPZ', 16)
  config.data.path = '/data/my_faces.npz'
  assert evaluation.stats_filename(config) == 'npz_my_faces_stats.npz'


def test_missing_stats_file_message(tmp_path):
  config = _config(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    evaluation.load_dataset_stats(config)
  msg = str(e.value)
  assert '\n' not in msg and 'cifar10_stats.npz' in msg
  assert 'python main.py --config <cfg> --workdir W --mode fid_stats' in msg


@pytest.mark.parametrize('centered,scaled', [(False, False), (True, False), (True, True)])
def test_compute_then_load_dataset_stats(tmp_path, monkeypatch, inception, centered, scaled):
  """datasets.py yields [0, 1] images; a pipeline yielding [-1, 1] (scaled) is unscaled too."""
  rng = np.random.RandomState(13)
  raw = rng.randint(0, 256, size=(10, 4, 4, 3)).astype(np.uint8)
  scale = (lambda x: 2 * x - 1) if scaled else (lambda x: x)
  inverse = (lambda x: (x + 1) / 2) if centered else (lambda x: x)
  batches = [{'image': tf.constant(scale(raw[i:i + 3] / 255.).astype(np.float32)),
              'label': tf.zeros([len(raw[i:i + 3])])} for i in range(0, 10, 3)]
  calls = []

  def get_dataset(config, additional_dim=None, uniform_dequantization=False, evaluation=False):
    calls.append((additional_dim, uniform_dequantization, evaluation))
    return batches, None, None

  fake = types.SimpleNamespace(get_dataset=get_dataset, get_data_inverse_scaler=lambda c: inverse)
  monkeypatch.setitem(sys.modules, 'datasets', fake)
  config = _config(tmp_path, centered=centered)
  path = evaluation.compute_dataset_stats(config, inception_model=inception)
  assert path == evaluation.stats_path(config) and calls == [(None, False, True)]
  stats = evaluation.load_dataset_stats(config)
  assert stats['pool_3'].shape == (10, 2048) and stats['logits'].shape == (10, 1008)
  np.testing.assert_allclose(stats['pool_3'], _expected_pool(raw), rtol=1e-4, atol=1e-4)
  # max_images stops early and keeps the first images.
  out = evaluation.compute_dataset_stats(config, inception, out_path=str(tmp_path / 'few.npz'),
                                         max_images=5)
  with np.load(out) as few:
    np.testing.assert_allclose(few['pool_3'], stats['pool_3'][:5], rtol=1e-6, atol=1e-6)
