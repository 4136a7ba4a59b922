"""Training and evaluation data: TFDS image datasets, local image files and toy distributions.

API of score_sde's `datasets.py`: `get_data_scaler`, `get_data_inverse_scaler` and
`get_dataset(config, additional_dim, uniform_dequantization, evaluation)`, which returns tf.data
pipelines (for the toy distributions numpy `toy_data.ToyBatches`) of dicts {'image': float32,
'label': int32}. Images are in [0, 1] (the scaler maps them to the model's range); a host batch
is [per_host_batch, ...] or [additional_dim, per_host_batch, ...] with per_host_batch =
batch_size // jax.process_count(); the training loop shards it over the local devices.

Nothing here downloads: TFDS datasets must already be prepared (`tfds build NAME`). Datasets that
need no download: the toy distributions of mle_score_ode's toy.py ('MOG1D', 'CHECKERBOARD',
'SWISSROLL', 'POINT'; flat (B, dim) vectors), scikit-learn's 8x8 digits ('DIGITS'), a local
.npz of uint8 images ('NPZ') and fixed patterns of known entropy ('PATTERNS', patterns_data.py).
"""
import glob
import math
import os
import pickle
import tarfile

import jax
import numpy as np

from names import KNOWN_DATASETS, LOCAL_DATASETS, TOY_DATASETS, is_toy
from patterns_data import pattern_arrays
from tf_import import tf, tfds
from toy_data import ToyBatches, toy_dim

SHUFFLE_BUFFER_SIZE = 10000
# Samples per host in a toy evaluation pass (toy.py scored 5000 fresh samples per repeat).
TOY_EVAL_SIZE = 5000


def get_data_scaler(config):
  """Data normalizer: [0, 1] -> [-1, 1] when config.data.centered (identity for toy data)."""
  if config.data.centered and not is_toy(config):
    return lambda x: x * 2. - 1.
  return lambda x: x


def get_data_inverse_scaler(config):
  """Inverse of `get_data_scaler`: [-1, 1] -> [0, 1] when centered (identity for toy data)."""
  if config.data.centered and not is_toy(config):
    return lambda x: (x + 1.) / 2.
  return lambda x: x


# ------------------------------------------------------------------------------------------------
# Toy distributions (toy_data.py) as numpy batches: no TensorFlow in a toy run.

def _toy_dataset(config, name, split_id, batch_dims, num_batches):
  dim = toy_dim(name)
  want = config.data.get('dim', dim)
  if want != dim:
    raise ValueError(f'{name} is {dim}-dimensional but config.data.dim = {want}; set '
                     f'--config.data.dim={dim}.')
  seed = (int(config.seed) % 2 ** 32, jax.process_index(), split_id)
  return ToyBatches(name, seed, tuple(batch_dims) + (dim,), num_batches)


def seed_pipeline(config, seed):
  """Seed TensorFlow's random ops (flips, dequantization noise) of an image pipeline; toy
  streams are seeded by their own numpy generators."""
  if not is_toy(config.data.dataset):
    tf.random.set_seed(seed)


# ------------------------------------------------------------------------------------------------
# Image preprocessing (score_sde).

def crop_resize(image, resolution):
  """Center-crop to a square and resize (bicubic, antialiased) to resolution; uint8 out."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  crop = tf.minimum(h, w)
  image = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
  image = tf.image.resize(image, size=(resolution, resolution), antialias=True,
                          method=tf.image.ResizeMethod.BICUBIC)
  # score_sde cast the bicubic output straight to uint8; clip and round so overshoots stay valid.
  return tf.cast(tf.round(tf.clip_by_value(image, 0., 255.)), tf.uint8)


def resize_small(image, resolution):
  """Shrink an image so that its shorter side is resolution (antialiased bilinear)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  ratio = resolution / tf.minimum(h, w)
  h = tf.cast(tf.round(h * ratio), tf.int32)
  w = tf.cast(tf.round(w * ratio), tf.int32)
  return tf.image.resize(image, [h, w], antialias=True)


def central_crop(image, size):
  """Crop the center of an image to size x size."""
  top = (tf.shape(image)[0] - size) // 2
  left = (tf.shape(image)[1] - size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def _resize_uint8(images, size, chunk=4096):
  """Resize uint8 NHWC images to size x size (antialiased bilinear), re-quantised to uint8."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  out = []
  for i in range(0, len(images), chunk):
    x = tf.image.resize(tf.cast(images[i:i + chunk], tf.float32), [size, size],
                        method='bilinear', antialias=True)
    out.append(np.clip(np.round(x.numpy()), 0, 255).astype(np.uint8))
  if not out:
    return np.zeros((0, size, size, images.shape[-1]), np.uint8)
  return np.concatenate(out)


def _match_channels(images, num_channels, what):
  """NHW or NHWC uint8 -> NHWC with num_channels (1 -> 3 by tiling)."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f'{what}: expected NHWC images, got shape {images.shape}; store an array '
                     '(N, H, W, C).')
  c = images.shape[-1]
  if c == num_channels:
    return images
  if c == 1 and num_channels == 3:
    return np.repeat(images, 3, axis=-1)
  raise ValueError(f'{what} has {c} channels but config.data.num_channels = {num_channels}; set '
                   f'--config.data.num_channels={c}.')


def _shard(array, index, count):
  return array[index::count]


def _in_memory_source(images, labels, shuffle):
  """tf.data dataset of single examples from numpy arrays, in a fresh random order per epoch."""
  n = len(images)
  images_t = tf.constant(images)
  labels_t = tf.constant(np.asarray(labels, np.int32))
  ds = tf.data.Dataset.range(n)
  if shuffle:
    ds = ds.shuffle(n, reshuffle_each_iteration=True)
  return ds.map(lambda i: {'image': tf.gather(images_t, i), 'label': tf.gather(labels_t, i)},
                num_parallel_calls=tf.data.AUTOTUNE)


def _digits_arrays(config):
  """scikit-learn's 8x8 digits as uint8 NHWC (train = first 80%, test = last 20%)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images / 16. * 255.).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  size = config.data.image_size
  images = _match_channels(_resize_uint8(images, size), config.data.num_channels, 'DIGITS')
  n_test = len(images) // 5
  return {'train': (images[:-n_test], labels[:-n_test]),
          'test': (images[-n_test:], labels[-n_test:])}


def _npz_arrays(config):
  """A local .npz of uint8 images: keys 'train' (+ 'test'), or one array split 90/10."""
  path = config.data.path
  if not path or not os.path.isfile(path):
    raise ValueError(f'NPZ dataset file {path!r} not found; set --config.data.path to a .npz of '
                     'uint8 NHWC images.')
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:
    raise ValueError(f'Cannot read NPZ dataset {path!r} ({type(e).__name__}: {e}); set '
                     '--config.data.path to a numpy .npz file.') from None
  image_keys = [k for k in arrays if not k.endswith('labels')]
  if 'train' in arrays:
    train = arrays['train']
    test = arrays.get('test')
    train_labels = arrays.get('train_labels')
    test_labels = arrays.get('test_labels')
  elif len(image_keys) == 1:
    train, test = arrays[image_keys[0]], None
    train_labels, test_labels = arrays.get('labels'), None
  else:
    raise ValueError(f'NPZ file {path!r} has keys {sorted(arrays)}; store images under '
                     "'train' (and optionally 'test') or save a single array.")
  if test is None:  # hold out the last 10%
    n_test = max(1, len(train) // 10)
    test = train[-n_test:]
    train = train[:-n_test]
    if train_labels is not None:
      test_labels = train_labels[-n_test:]
      train_labels = train_labels[:-n_test]
  out = {}
  for split, images, labels in (('train', train, train_labels), ('test', test, test_labels)):
    if images.dtype != np.uint8:
      raise ValueError(f'NPZ file {path!r}: {split} images are {images.dtype}, not uint8; save '
                       'uint8 pixel values in 0..255.')
    images = _match_channels(images, config.data.num_channels, f'NPZ file {path!r}')
    images = _resize_uint8(images, config.data.image_size)
    if labels is None or len(labels) != len(images):
      labels = np.zeros(len(images), np.int32)
    out[split] = (images, labels.astype(np.int32))
  return out


# ------------------------------------------------------------------------------------------------
# Local downsampled ImageNet (the files behind TFDS `downsampled_imagenet`, whose download is gone).

def _imagenet_local_source(config, split, shuffle):
  """Per-host examples of a local downsampled-ImageNet copy at config.data.path.

  Accepted layouts under the path (or one folder below it):
  - van den Oord et al. (what TFDS `downsampled_imagenet` wrapped): PNG folders
    `train_32x32/`, `valid_32x32/`, or the original tars `train_32x32.tar`, `valid_32x32.tar`;
  - Chrabaszcz et al. batches: `train_data_batch_*` and `val_data` (pickle or .npz with 'data'
    rows in CHW order and 1-based 'labels').
  """
  root = config.data.path
  size = config.data.image_size
  pi, pc = jax.process_index(), jax.process_count()
  if not os.path.isdir(root):
    raise ValueError(f'ImageNet directory {root!r} not found; set --config.data.path to the '
                     'folder holding the downsampled-ImageNet files (or leave it empty for TFDS).')

  def find(pattern):
    return sorted(glob.glob(os.path.join(root, pattern))
                  + glob.glob(os.path.join(root, '*', pattern)))

  tag = 'train' if split == 'train' else 'valid'
  png_dirs = [d for d in find(f'{tag}_{size}x{size}') if os.path.isdir(d)]
  tars = [t for t in find(f'{tag}_{size}x{size}.tar') if os.path.isfile(t)]
  batch_pat = 'train_data_batch_*' if split == 'train' else 'val_data*'
  batches = [b for b in find(batch_pat) if os.path.isfile(b)]

  def decode(path_or_bytes, is_path):
    data = tf.io.read_file(path_or_bytes) if is_path else path_or_bytes
    return {'image': tf.ensure_shape(tf.io.decode_png(data, channels=3), (size, size, 3)),
            'label': tf.constant(0, tf.int32)}

  if png_dirs:
    files = sorted(glob.glob(os.path.join(png_dirs[0], '*.png')))[pi::pc]
    if not files:
      raise ValueError(f'No PNG files in {png_dirs[0]!r}; extract {tag}_{size}x{size}.tar there.')
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
      ds = ds.shuffle(len(files))
    return ds.map(lambda p: decode(p, True), num_parallel_calls=tf.data.AUTOTUNE)
  if tars:
    tar_path = tars[0]

    def gen_tar():
      with tarfile.open(tar_path) as tf_file:
        i = 0
        for member in tf_file:
          if member.isfile() and member.name.endswith('.png'):
            if i % pc == pi:
              yield tf_file.extractfile(member).read()
            i += 1
    ds = tf.data.Dataset.from_generator(gen_tar, output_signature=tf.TensorSpec((), tf.string))
    return ds.map(lambda b: decode(b, False), num_parallel_calls=tf.data.AUTOTUNE)
  if batches:
    def load(path):
      if path.endswith('.npz'):
        with np.load(path) as f:
          return f['data'], f['labels']
      with open(path, 'rb') as f:
        d = pickle.load(f)
      return d['data'], d['labels']

    def gen_batches():
      order = np.random.default_rng().permutation(len(batches)) if shuffle else range(len(batches))
      for j in order:
        data, labels = load(batches[j])
        data = np.asarray(data, np.uint8)[pi::pc]
        labels = np.asarray(labels, np.int64)[pi::pc] - 1
        side = int(round(math.sqrt(data.shape[1] // 3)))
        if side != size:
          raise ValueError(f'{batches[j]!r} holds {side}x{side} images but config.data.image_size'
                           f' = {size}; set --config.data.image_size={side}.')
        images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
        for k in range(len(images)):
          yield {'image': images[k], 'label': np.int32(labels[k])}
    spec = {'image': tf.TensorSpec((size, size, 3), tf.uint8), 'label': tf.TensorSpec((), tf.int32)}
    return tf.data.Dataset.from_generator(gen_batches, output_signature=spec)
  raise ValueError(f'No downsampled-ImageNet {split} files for {size}x{size} under {root!r}; '
                   'expect '
                   f'{tag}_{size}x{size}/ (PNGs), {tag}_{size}x{size}.tar or {batch_pat} files.')


# ------------------------------------------------------------------------------------------------
# TFDS.

def tfds_builder(name, config):
  """A TFDS builder for an already prepared dataset; ValueError naming the fix otherwise."""
  data_dir = config.data.get('tfds_dir', '') or None
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    where = data_dir or 'the default TFDS data_dir'
    hint = ''
    if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
      hint = (f' (manual download: put its files in <data_dir>/downloads/manual and run '
              f'`tfds build {name} --manual_dir=...`)')
    if name.startswith('downsampled_imagenet'):
      hint = (' (its download URL is gone: or set --config.data.path to a local folder of the '
              'downsampled-ImageNet files)')
    raise ValueError(f'TFDS dataset {name!r} is not prepared in {where} and this code never '
                     f'downloads; run `tfds build {name}` on a machine with internet and copy the '
                     f'data_dir here, or set --config.data.tfds_dir to a prepared TFDS data_dir'
                     f'{hint}.')
  return builder


def tfds_route(config):
  """(tfds name, train split, eval split, resize_op) for the TFDS image datasets."""
  name = config.data.dataset
  size = config.data.image_size

  def convert_resize(img):
    img = tf.image.convert_image_dtype(img, tf.float32)
    return tf.image.resize(img, [size, size], antialias=True)

  if name == 'CIFAR10':
    return 'cifar10', 'train', 'test', convert_resize
  if name == 'SVHN':
    return 'svhn_cropped', 'train', 'test', convert_resize
  if name == 'MNIST':
    return 'mnist', 'train', 'test', convert_resize
  if name == 'CELEBA':
    def celeba_op(img):
      img = tf.image.convert_image_dtype(img, tf.float32)
      img = central_crop(img, 140)
      return resize_small(img, size)
    return 'celeb_a', 'train', 'validation', celeba_op
  if name == 'ImageNet':
    if size not in (32, 64):
      raise ValueError(f'ImageNet comes as 32x32 or 64x64, not {size}; set '
                       '--config.data.image_size=32 (or 64).')
    return (f'downsampled_imagenet/{size}x{size}', 'train', 'validation',
            lambda img: tf.image.convert_image_dtype(img, tf.float32))
  if name == 'LSUN':
    category = config.data.get('category', '')
    if not category:
      raise ValueError('LSUN needs a category; set --config.data.category (e.g. church_outdoor).')
    if size == 128:
      def lsun_op(img):
        img = tf.image.convert_image_dtype(img, tf.float32)
        img = resize_small(img, size)
        return central_crop(img, size)
    else:
      def lsun_op(img):
        return tf.image.convert_image_dtype(crop_resize(img, size), tf.float32)
    return f'lsun/{category}', 'train', 'validation', lsun_op
  raise AssertionError(name)


# ------------------------------------------------------------------------------------------------

def get_dataset(config, additional_dim=None, uniform_dequantization=False, evaluation=False,
                shuffle=True):
  """Create the training and evaluation pipelines.

  Args:
    config: ml_collections config (reads config.data.*, config.training.batch_size,
      config.eval.batch_size, config.seed).
    additional_dim: if given, batches get a leading axis of this size (steps jitted together).
    uniform_dequantization: add U[0, 1) noise to 8-bit images: (x * 255 + u) / 256.
    evaluation: use config.eval.batch_size, no random flips, and one epoch (finite datasets).
    shuffle: shuffle files and examples (as score_sde); False gives the split in its stored
      order, the same batches on every run (eval_lib.evaluate resumes batch by batch).

  Returns:
    (train_ds, eval_ds, dataset_builder); dataset_builder is the TFDS builder, or None for data
    that is not from TFDS.
  """
  name = config.data.dataset
  if name not in KNOWN_DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; set --config.data.dataset to one of '
                     f'{", ".join(KNOWN_DATASETS)}.')
  batch_size = config.eval.batch_size if evaluation else config.training.batch_size
  if batch_size % jax.device_count() != 0:
    raise ValueError(f'Batch size {batch_size} is not divisible by the number of devices '
                     f'({jax.device_count()}); set a multiple of {jax.device_count()}.')
  per_host_batch = batch_size // jax.process_count()
  batch_dims = [per_host_batch] if additional_dim is None else [additional_dim, per_host_batch]
  num_epochs = 1 if evaluation else None

  if name in TOY_DATASETS:
    num_batches = None
    if evaluation:
      n_eval = config.data.get('toy_eval_size', TOY_EVAL_SIZE)
      num_batches = max(1, n_eval // int(np.prod(batch_dims)))
    train_ds = _toy_dataset(config, name, 0, batch_dims, num_batches)
    eval_ds = _toy_dataset(config, name, 1, batch_dims, num_batches)
    return train_ds, eval_ds, None

  size = config.data.image_size
  if not size or size < 1 or config.data.num_channels not in (1, 3):
    raise ValueError(f'{name} images need config.data.image_size >= 1 and num_channels 1 or 3 '
                     f'(got {size}, {config.data.num_channels}); set --config.data.image_size '
                     'and --config.data.num_channels.')
  dataset_builder = None
  if name in LOCAL_DATASETS:
    arrays = {'DIGITS': _digits_arrays, 'NPZ': _npz_arrays, 'PATTERNS': pattern_arrays}[name](config)
    pi, pc = jax.process_index(), jax.process_count()
    if evaluation:
      for split, (images, _) in arrays.items():
        if len(images) // pc < int(np.prod(batch_dims)):
          raise ValueError(f'{name} {split} split has {len(images)} images, fewer than one '
                           f'evaluation batch ({int(np.prod(batch_dims))} per host); lower '
                           '--config.eval.batch_size.')

    def source(split, shuffle):
      images, labels = arrays['train' if split == 'train' else 'test']
      return _in_memory_source(_shard(images, pi, pc), _shard(labels, pi, pc), shuffle)

    train_split, eval_split = 'train', 'test'

    def resize_op(img):
      return tf.image.convert_image_dtype(img, tf.float32)
  elif name == 'ImageNet' and config.data.get('path', ''):
    tfds_route(config)  # validates image_size
    train_split, eval_split = 'train', 'validation'
    source = lambda split, shuffle: _imagenet_local_source(config, split, shuffle)

    def resize_op(img):
      return tf.image.convert_image_dtype(img, tf.float32)
  else:
    tfds_name, train_split, eval_split, resize_op = tfds_route(config)
    dataset_builder = tfds_builder(tfds_name, config)

    def source(split, shuffle):
      options = tf.data.Options()
      options.experimental_optimization.map_parallelization = True
      options.threading.max_intra_op_parallelism = 1
      return dataset_builder.as_dataset(split=tfds.split_for_jax_process(split),
                                        shuffle_files=shuffle,
                                        read_config=tfds.ReadConfig(options=options))

  def preprocess_fn(d):
    """uint8 image -> float32 in [0, 1] (resized), random flip, optional dequantization."""
    img = resize_op(d['image'])
    if config.data.random_flip and not evaluation:
      img = tf.image.random_flip_left_right(img)
    if uniform_dequantization:
      img = (tf.random.uniform(tf.shape(img), dtype=tf.float32) + img * 255.) / 256.
    label = tf.cast(d['label'], tf.int32) if 'label' in d else tf.constant(0, tf.int32)
    return {'image': img, 'label': label}

  def create_dataset(split):
    ds = source(split, shuffle)
    ds = ds.repeat(count=num_epochs)
    if shuffle:
      ds = ds.shuffle(SHUFFLE_BUFFER_SIZE)
    ds = ds.map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE)
    for size in reversed(batch_dims):
      ds = ds.batch(size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  return create_dataset(train_split), create_dataset(eval_split), dataset_builder
