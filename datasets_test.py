"""datasets.py against independent truth: scipy CDFs/quadrature, exact arrays written to disk."""
import os
import pickle
import tarfile
from unittest import mock

import tensorflow as tf

tf.config.set_visible_devices([], 'GPU')

import jax
import numpy as np
import pytest
import scipy.stats
from scipy import integrate
import tensorflow_datasets as tfds

from configs.base_config import get_base_config
from configs.toy.common import get_toy_config
import datasets
import toy_data


def image_config(dataset='CIFAR10', size=8, channels=3, batch=4, eval_batch=4, **data):
  config = get_base_config()
  config.data.dataset = dataset
  config.data.image_size = size
  config.data.num_channels = channels
  config.training.batch_size = batch
  config.eval.batch_size = eval_batch
  for k, v in data.items():
    config.data[k] = v
  return config


def toy_config(name, batch=500):
  config = get_toy_config(name, toy_data.toy_dim(name))
  config.training.batch_size = batch
  config.eval.batch_size = batch
  return config


def first(ds):
  return next(iter(ds if isinstance(ds, toy_data.ToyBatches) else tfds.as_numpy(ds)))


# ----------------------------------------------------------------------------------------- toy

def mog_cdf(x):
  mu = np.array([-2., -6., 4.]) / 7.
  sd = np.sqrt(np.array([0.1, 0.1, 1.]) / 49.)
  w = np.array([0.3, 0.3, 0.4])
  return np.sum(w * scipy.stats.norm.cdf((np.asarray(x)[..., None] - mu) / sd), axis=-1)


def test_mog1d_samples_match_exact_cdf():
  x = toy_data.sample_toy('MOG1D', 0, 20000)
  assert x.shape == (20000, 1) and x.dtype == np.float32
  assert scipy.stats.kstest(x[:, 0], mog_cdf).pvalue > 1e-3
  # Odd sizes still come out right (stratified counts plus a random remainder).
  assert toy_data.sample_toy('MOG1D', 1, 7).shape == (7, 1)


def test_mog1d_log_prob_is_the_exact_density():
  xs = np.linspace(-1.5, 2.5, 41)
  h = 1e-5
  numeric_pdf = (mog_cdf(xs + h) - mog_cdf(xs - h)) / (2 * h)
  np.testing.assert_allclose(np.exp(toy_data.toy_log_prob('MOG1D', xs[:, None])), numeric_pdf,
                             rtol=1e-4, atol=1e-6)


def test_mog1d_true_nll_matches_monte_carlo():
  nll = toy_data.toy_true_nll('MOG1D')
  x = toy_data.sample_toy('MOG1D', 2, 200000)
  neg_logp = -toy_data.toy_log_prob('MOG1D', x)
  stderr = neg_logp.std() / np.sqrt(len(neg_logp))
  assert abs(neg_logp.mean() - nll) < 4 * stderr
  assert np.isclose(nll, -0.128854, atol=1e-5)


def test_checkerboard_squares_equal_mass_and_density():
  x = toy_data.sample_toy('CHECKERBOARD', 3, 32000)
  assert x.shape == (32000, 2)
  logp = toy_data.toy_log_prob('CHECKERBOARD', x)
  np.testing.assert_allclose(logp, -np.log(32.))  # every point is in one of the 8 squares
  cells = np.floor(x / 2.).astype(int) + 2  # 4x4 grid of 2x2 cells over [-4, 4)^2
  counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
  occupied = counts[counts > 0]
  assert len(occupied) == 8
  assert scipy.stats.chisquare(occupied).pvalue > 1e-3
  # Uniform inside a square: the offset within the cell is U[0, 2)^2.
  assert scipy.stats.kstest((x[:, 0] % 2.) / 2., 'uniform').pvalue > 1e-3
  # The density integrates to one over the box and is -inf off the board.
  grid = (np.stack(np.meshgrid(np.arange(-4, 4, 0.25), np.arange(-4, 4, 0.25)), -1) + 0.125)
  p = np.exp(toy_data.toy_log_prob('CHECKERBOARD', grid))
  assert np.isclose(p.sum() * 0.25 ** 2, 1.)
  assert toy_data.toy_log_prob('CHECKERBOARD', np.array([[1., 3.]])) == -np.inf
  assert toy_data.toy_log_prob('CHECKERBOARD', np.array([[5., 5.]])) == -np.inf
  assert np.isclose(toy_data.toy_true_nll('CHECKERBOARD'), 3.4657, atol=1e-4)


def test_point_samples_and_density():
  x = toy_data.sample_toy('POINT', 4, 5000)
  logp = toy_data.toy_log_prob('POINT', x)
  assert np.all(np.isfinite(logp))
  np.testing.assert_allclose(logp, np.log(200.))
  assert np.all(np.bincount(np.round(x[:, 0] / 3.).astype(int) + 2) == 1000)
  assert np.isclose(toy_data.toy_true_nll('POINT'), -np.log(200.))
  # The density integrates to one (quadrature around each narrow interval).
  total = sum(integrate.quad(lambda y: np.exp(toy_data.toy_log_prob('POINT', np.array([[y]])))[0],
                             c - 0.001, c + 0.001, points=[c - 5e-4, c + 5e-4])[0]
              for c in (-6., -3., 0., 3., 6.))
  assert np.isclose(total, 1., atol=1e-6)


def test_swissroll_five_equal_copies_and_no_density():
  x = toy_data.sample_toy('SWISSROLL', 5, 1000)
  assert x.shape == (1000, 2)
  r = 4.5
  offsets = np.array([[0., 0.], [-r, -r], [-r, r], [r, -r], [r, r]])
  nearest = np.argmin(np.linalg.norm(x[:, None] - offsets, axis=-1), axis=1)
  assert np.all(np.bincount(nearest, minlength=5) == 200)
  # The copies are the same points shifted: the multiset of offsets-removed points repeats.
  base = np.sort((x - offsets[nearest])[nearest == 0][:, 0])
  for k in range(1, 5):
    np.testing.assert_allclose(np.sort((x - offsets[nearest])[nearest == k][:, 0]), base,
                               atol=1e-5)
  with pytest.raises(ValueError, match='SWISSROLL'):
    toy_data.toy_log_prob('SWISSROLL', x)
  with pytest.raises(ValueError, match='SWISSROLL'):
    toy_data.toy_true_nll('SWISSROLL')


def test_toy_dims_and_unknown_name():
  assert [toy_data.toy_dim(n) for n in ('MOG1D', 'CHECKERBOARD', 'SWISSROLL', 'POINT')] == [
      1, 2, 2, 1]
  with pytest.raises(ValueError, match='MOG1D'):
    toy_data.toy_dim('GAUSS')


def test_toy_stream_shapes_seeding_and_eval_length():
  config = toy_config('CHECKERBOARD', batch=100)
  train, evl, builder = datasets.get_dataset(config)
  assert builder is None
  a = first(train)
  assert a['image'].shape == (100, 2) and a['image'].dtype == np.float32
  assert a['label'].shape == (100,) and a['label'].dtype == np.int32
  np.testing.assert_array_equal(first(datasets.get_dataset(config)[0])['image'], a['image'])
  assert not np.allclose(first(evl)['image'], a['image'])  # eval split seeded apart
  config.seed = 1
  assert not np.allclose(first(datasets.get_dataset(config)[0])['image'], a['image'])
  train, _, _ = datasets.get_dataset(config, additional_dim=3)
  assert first(train)['image'].shape == (3, 100, 2)
  # Evaluation: a finite, repeatable pass of toy_eval_size samples.
  _, evl, _ = datasets.get_dataset(config, evaluation=True)
  batches = list(evl)
  assert len(batches) == datasets.TOY_EVAL_SIZE // 100
  np.testing.assert_array_equal(first(evl)['image'], batches[0]['image'])
  # A resumed run skips the batches it consumed and sees the rest of the same stream.
  rest = list(evl.skip(3))
  assert len(rest) == len(batches) - 3
  np.testing.assert_array_equal(rest[0]['image'], batches[3]['image'])


def test_toy_stream_is_sharded_by_process(monkeypatch):
  config = toy_config('MOG1D', batch=100)
  a = first(datasets.get_dataset(config)[0])['image']
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  b = first(datasets.get_dataset(config)[0])['image']
  assert b.shape == (50, 1)
  assert not np.allclose(a[:50], b)


def test_toy_dim_mismatch_raises():
  config = toy_config('MOG1D')
  config.data.dim = 2
  with pytest.raises(ValueError, match='config.data.dim'):
    datasets.get_dataset(config)


# ----------------------------------------------------------------------------- scalers, errors

def test_scalers_round_trip():
  x = np.random.default_rng(0).random((3, 4, 4, 3)).astype(np.float32)
  config = image_config(centered=True)
  scaled = datasets.get_data_scaler(config)(x)
  assert scaled.min() >= -1. and scaled.max() <= 1.
  np.testing.assert_allclose(scaled, 2 * x - 1, atol=1e-7)
  np.testing.assert_allclose(datasets.get_data_inverse_scaler(config)(scaled), x, atol=1e-6)
  config.data.centered = False
  assert datasets.get_data_scaler(config)(x) is x
  assert datasets.get_data_inverse_scaler(config)(x) is x
  toy = toy_config('MOG1D')
  toy.data.centered = True  # toy data are never rescaled
  assert datasets.get_data_scaler(toy)(x) is x
  assert datasets.get_data_inverse_scaler(toy)(x) is x


def test_batch_not_divisible_by_devices(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 3)
  with pytest.raises(ValueError, match='not divisible'):
    datasets.get_dataset(image_config('DIGITS', batch=4))
  with pytest.raises(ValueError, match='not divisible'):
    datasets.get_dataset(toy_config('MOG1D', batch=100), evaluation=True)


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match='CIFAR10.*DIGITS.*NPZ.*MOG1D'):
    datasets.get_dataset(image_config('FOO'))


def test_unprepared_tfds_dataset_raises_without_download(tmp_path):
  config = image_config('CIFAR10', tfds_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"'cifar10' is not prepared.*tfds build cifar10"):
    datasets.get_dataset(config)
  assert not os.listdir(tmp_path)  # nothing was downloaded or created
  config = image_config('ImageNet', size=32, tfds_dir=str(tmp_path))
  with pytest.raises(ValueError, match='downsampled_imagenet/32x32.*config.data.path'):
    datasets.get_dataset(config)


# ------------------------------------------------------------------------------- TFDS (mocked)

@pytest.fixture(autouse=True)
def small_shuffle_buffer(monkeypatch):
  """Mocked TFDS examples come from a Python generator: keep the shuffle buffer small."""
  monkeypatch.setattr(datasets, 'SHUFFLE_BUFFER_SIZE', 8)


def mocked_tfds(num_examples=16, **kw):
  stack = tfds.testing.mock_data(num_examples=num_examples, **kw)
  prepared = mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True)
  return stack, prepared


@pytest.mark.parametrize('additional_dim', [None, 2])
def test_cifar10_mock_shapes_and_range(additional_dim):
  stack, prepared = mocked_tfds()
  with stack, prepared:
    config = image_config('CIFAR10', size=32, batch=4)
    train, evl, builder = datasets.get_dataset(config, additional_dim=additional_dim)
    assert builder.name == 'cifar10'
    lead = () if additional_dim is None else (additional_dim,)
    for ds in (train, evl):
      b = first(ds)
      assert b['image'].shape == lead + (4, 32, 32, 3) and b['image'].dtype == np.float32
      assert b['label'].shape == lead + (4,) and b['label'].dtype == np.int32
      assert b['image'].min() >= 0. and b['image'].max() <= 1.
      np.testing.assert_allclose(b['image'] * 255., np.round(b['image'] * 255.), atol=1e-3)
    # Dequantized: (x * 255 + u) / 256 stays in [0, 1) and is off the 8-bit grid.
    train, _, _ = datasets.get_dataset(config, additional_dim=additional_dim,
                                       uniform_dequantization=True)
    x = first(train)['image']
    assert x.min() >= 0. and x.max() < 1.
    assert np.abs(x * 255. - np.round(x * 255.)).mean() > 0.1
    # evaluation: one epoch of the mocked 16 examples at eval batch 4 -> 4 batches (3 with dim 2:
    # 16 // (2 * 4) = 2).
    _, evl, _ = datasets.get_dataset(config, additional_dim=additional_dim, evaluation=True)
    assert len(list(tfds.as_numpy(evl))) == (4 if additional_dim is None else 2)


@pytest.mark.parametrize('name,size', [('SVHN', 16), ('CELEBA', 16), ('LSUN', 16), ('LSUN', 128),
                                       ('MNIST', 8)])
def test_other_tfds_routes_mock_shapes(name, size):
  stack, prepared = mocked_tfds(num_examples=4)
  with stack, prepared:
    channels = 1 if name == 'MNIST' else 3
    config = image_config(name, size=size, channels=channels, batch=2, category='church_outdoor')
    train, _, _ = datasets.get_dataset(config)
    b = first(train)
    assert b['image'].shape == (2, size, size, channels)
    assert b['image'].min() >= 0. and b['image'].max() <= 1.


def test_imagenet_tfds_route_mock():
  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    images = np.arange(4 * 32 * 32 * 3, dtype=np.int64).reshape(4, 32, 32, 3) % 256
    return tf.data.Dataset.from_tensor_slices({'image': images.astype(np.uint8)})
  stack, prepared = mocked_tfds(as_dataset_fn=as_dataset)
  with stack, prepared:
    train, _, builder = datasets.get_dataset(image_config('ImageNet', size=32, batch=2))
    assert builder.name == 'downsampled_imagenet'
    b = first(train)
    assert b['image'].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(b['label'], 0)


# ------------------------------------------------------------------------------ local images

def test_digits_shapes_range_split():
  config = image_config('DIGITS', size=16, channels=3, batch=8, eval_batch=8)
  train, evl, builder = datasets.get_dataset(config)
  assert builder is None
  b = first(train)
  assert b['image'].shape == (8, 16, 16, 3) and b['label'].shape == (8,)
  assert b['image'].min() >= 0. and b['image'].max() <= 1. and b['image'].max() > 0.5
  np.testing.assert_allclose(b['image'] * 255., np.round(b['image'] * 255.), atol=1e-4)
  np.testing.assert_array_equal(b['image'][..., 0], b['image'][..., 2])  # gray tiled to RGB
  assert set(b['label']) <= set(range(10))
  _, evl, _ = datasets.get_dataset(config, evaluation=True)
  assert len(list(tfds.as_numpy(evl))) == (1797 // 5) // 8  # last 20% held out
  config = image_config('DIGITS', size=8, channels=1, batch=4)
  from sklearn.datasets import load_digits
  digits = load_digits()
  b = first(datasets.get_dataset(config, evaluation=True)[1])
  assert b['image'].shape == (4, 8, 8, 1)
  # Native size: exactly the 0..16 values quantised to 8 bits, and images of the test part.
  test = np.round(digits.images[-(1797 // 5):] / 16. * 255.)
  for img in np.round(b['image'][..., 0] * 255.):
    assert np.any(np.all(test == img, axis=(1, 2)))


def test_patterns_through_get_dataset():
  """PATTERNS: the test split in stored order, four grey levels, every image one of the patterns."""
  import patterns_data
  config = image_config('PATTERNS', size=8, channels=1, batch=8, eval_batch=8)
  _, evl, builder = datasets.get_dataset(config, evaluation=True, shuffle=False)
  assert builder is None
  batches = list(tfds.as_numpy(evl))
  assert len(batches) == 512 // 8 and batches[0]['image'].shape == (8, 8, 8, 1)
  images = np.round(np.concatenate([b['image'] for b in batches]) * 255.).astype(np.uint8)
  np.testing.assert_array_equal(images, patterns_data.pattern_arrays(config)['test'][0])
  assert np.all(np.isfinite(patterns_data.log2_prob(config, images)))
  assert set(np.unique(images)) == {0, 85, 170, 255}


def write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_npz_round_trip_and_sharding(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
  path = write_npz(tmp_path / 'd.npz', train=train, test=test,
                   test_labels=np.arange(8, dtype=np.int64))
  config = image_config('NPZ', size=6, batch=4, eval_batch=2, path=path)
  _, evl, _ = datasets.get_dataset(config, evaluation=True)
  got = [(b['image'], b['label']) for b in tfds.as_numpy(evl)]
  images = np.concatenate([g[0] for g in got])
  labels = np.concatenate([g[1] for g in got])
  assert len(images) == 8
  np.testing.assert_array_equal(np.round(images * 255.).astype(np.uint8), test[labels])
  # Two hosts see disjoint halves whose union is the test set.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  seen = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    _, evl, _ = datasets.get_dataset(config, evaluation=True)
    batches = list(tfds.as_numpy(evl))
    assert all(b['image'].shape == (1, 6, 6, 3) for b in batches)
    seen.append(sorted(int(label) for b in batches for label in b['label']))
  assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(8))


def test_npz_single_array_split_resize_and_gray(tmp_path):
  x = np.random.default_rng(1).integers(0, 256, (30, 4, 4), dtype=np.uint8)
  path = write_npz(tmp_path / 'one.npz', images=x)
  config = image_config('NPZ', size=8, channels=3, batch=3, eval_batch=3, path=path)
  train, evl, _ = datasets.get_dataset(config, evaluation=True)
  assert sum(len(b['image']) for b in tfds.as_numpy(evl)) == 3  # 10% of 30
  assert sum(len(b['image']) for b in tfds.as_numpy(train)) == 27
  b = first(train)['image']
  assert b.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(b * 255., np.round(b * 255.), atol=1e-4)  # re-quantised to 8 bits


def test_npz_flips_and_dequantization(tmp_path):
  img = np.zeros((64, 4, 4, 3), np.uint8)
  img[:, :, 2:] = 200  # right half bright: a flip moves it to the left
  path = write_npz(tmp_path / 'f.npz', train=img, test=img[:8])
  config = image_config('NPZ', size=4, batch=64, eval_batch=8, path=path)
  x = first(datasets.get_dataset(config)[0])['image']
  flipped = x[:, 0, 0, 0] > 0.5
  assert 5 < flipped.sum() < 59  # about half flipped
  np.testing.assert_allclose(x[flipped], np.broadcast_to(img[0, :, ::-1] / 255., x[flipped].shape))
  np.testing.assert_allclose(x[~flipped], np.broadcast_to(img[0] / 255., x[~flipped].shape))
  config.data.random_flip = False
  assert not np.any(first(datasets.get_dataset(config)[0])['image'][:, 0, 0, 0] > 0.5)
  config.data.random_flip = True
  assert not np.any(first(datasets.get_dataset(config, evaluation=True)[0])['image'][
      :, 0, 0, 0] > 0.5)
  # Dequantization: floor(x * 256) recovers the 8-bit value and the remainder is U[0, 1).
  config.data.random_flip = False
  x = first(datasets.get_dataset(config, uniform_dequantization=True)[0])['image']
  levels = np.broadcast_to(img[0], x.shape).astype(np.float64)
  u = x.astype(np.float64) * 256. - levels
  assert u.min() >= -1e-4 and u.max() < 1.
  assert scipy.stats.kstest(u.ravel(), 'uniform').pvalue > 1e-3


def test_npz_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match='missing.npz'):
    datasets.get_dataset(image_config('NPZ', path=str(tmp_path / 'missing.npz')))
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match='bad.npz'):
    datasets.get_dataset(image_config('NPZ', path=str(bad)))
  path = write_npz(tmp_path / 'float.npz', train=np.zeros((10, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match='uint8'):
    datasets.get_dataset(image_config('NPZ', path=path))
  path = write_npz(tmp_path / 'small.npz', train=np.zeros((10, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match='eval.batch_size'):
    datasets.get_dataset(image_config('NPZ', path=path, eval_batch=4), evaluation=True)


# --------------------------------------------------------------------- local downsampled ImageNet

def imagenet_images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def collect(ds):
  return np.concatenate([np.round(b['image'] * 255.).astype(np.uint8) for b in tfds.as_numpy(ds)])


def same_set(a, b):
  key = lambda x: sorted(map(bytes, x))
  return key(a) == key(b)


def test_imagenet_local_png_folders_and_tar(tmp_path):
  train, valid = imagenet_images(4, 0), imagenet_images(2, 1)
  for tag, images in (('train', train), ('valid', valid)):
    folder = tmp_path / 'folders' / f'{tag}_32x32'
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
      tf.io.write_file(str(folder / f'{i:07d}.png'), tf.io.encode_png(im))
    with tarfile.open(tmp_path / f'{tag}_32x32.tar', 'w') as tar:
      tar.add(folder, arcname=f'{tag}_32x32')
  (tmp_path / 'tars').mkdir()
  for tag in ('train', 'valid'):
    os.rename(tmp_path / f'{tag}_32x32.tar', tmp_path / 'tars' / f'{tag}_32x32.tar')
  for sub in ('folders', 'tars'):
    config = image_config('ImageNet', size=32, batch=2, eval_batch=2, path=str(tmp_path / sub))
    tr, ev, builder = datasets.get_dataset(config, evaluation=True)
    assert builder is None
    assert same_set(collect(tr), train) and same_set(collect(ev), valid)


def test_imagenet_local_pickled_batches(tmp_path):
  images = imagenet_images(6, 2)
  rows = images.transpose(0, 3, 1, 2).reshape(6, -1)  # CHW rows as the original files
  folder = tmp_path / 'Imagenet32_train'
  folder.mkdir()
  for j in range(2):
    with open(folder / f'train_data_batch_{j + 1}', 'wb') as f:
      pickle.dump({'data': rows[3 * j:3 * j + 3], 'labels': [1, 2, 1000]}, f)
  np.savez(tmp_path / 'val_data.npz', data=rows[:2], labels=np.array([5, 6]))
  config = image_config('ImageNet', size=32, batch=3, eval_batch=2, path=str(tmp_path))
  tr, ev, _ = datasets.get_dataset(config, evaluation=True)
  assert same_set(collect(tr), images) and same_set(collect(ev), images[:2])
  labels = np.concatenate([b['label'] for b in tfds.as_numpy(tr)])
  assert sorted(labels) == [0, 0, 1, 1, 999, 999]


def test_imagenet_local_missing(tmp_path):
  config = image_config('ImageNet', size=32, path=str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='nope'):
    datasets.get_dataset(config)
  config = image_config('ImageNet', size=32, path=str(tmp_path))
  with pytest.raises(ValueError, match='train_32x32'):
    next(iter(datasets.get_dataset(config)[0]))
