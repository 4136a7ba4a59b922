"""PATTERNS: 8-bit grayscale images drawn from a few dozen fixed patterns with known probabilities,
so that the data's entropy (the floor of every bits/dim) is known exactly; numpy only.

Patterns: `num_patterns` distinct images whose `block` x `block` cells each take one of `levels`
grey values (uint8), drawn from np.random.default_rng(pattern_seed); pattern i has probability
proportional to 1 / (i + 1) (Zipf). Entropy in bits/dim = -sum_i p_i log2 p_i / D (D = H W C).
Config fields (config.data, all optional): num_patterns, pattern_levels, pattern_block,
pattern_seed, pattern_train_size, pattern_test_size.
"""
import numpy as np

DEFAULTS = {'num_patterns': 32, 'pattern_levels': (0, 85, 170, 255), 'pattern_block': 2,
            'pattern_seed': 0, 'pattern_train_size': 4096, 'pattern_test_size': 512}


def _settings(config):
  data = config.data
  return {k: data.get(k, v) for k, v in DEFAULTS.items()}


def _check(s, size, channels):
  if s['num_patterns'] < 1 or s['pattern_block'] < 1 or size % s['pattern_block']:
    raise ValueError(f"PATTERNS needs num_patterns >= 1 and pattern_block dividing image_size "
                     f"{size} (got {s['num_patterns']}, {s['pattern_block']}): set "
                     '--config.data.num_patterns / --config.data.pattern_block.')
  levels = tuple(int(v) for v in s['pattern_levels'])
  if len(set(levels)) < 2 or min(levels) < 0 or max(levels) > 255:
    raise ValueError(f'data.pattern_levels {levels} must hold two or more distinct grey values in '
                     '0..255: set --config.data.pattern_levels.')
  cells = (size // s['pattern_block']) ** 2 * channels
  if len(levels) ** cells < s['num_patterns']:
    raise ValueError(f"{s['num_patterns']} distinct patterns do not fit in {cells} cells of "
                     f'{len(levels)} levels: lower --config.data.num_patterns.')
  return levels


def pattern_probs(num_patterns):
  """Zipf probabilities p_i = (1 / (i + 1)) / sum_j 1 / (j + 1), float64."""
  w = 1. / np.arange(1, num_patterns + 1, dtype=np.float64)
  return w / w.sum()


def make_patterns(config):
  """(patterns uint8 (N, H, W, C), probabilities (N,)) of config.data: deterministic, distinct."""
  s = _settings(config)
  size, channels = config.data.image_size, config.data.num_channels
  levels = np.asarray(_check(s, size, channels), np.uint8)
  n, block = s['num_patterns'], s['pattern_block']
  rng = np.random.default_rng(s['pattern_seed'])
  cell = size // block
  found, seen = [], set()
  while len(found) < n:
    idx = rng.integers(0, len(levels), (cell, cell, channels))
    if idx.tobytes() not in seen:
      seen.add(idx.tobytes())
      found.append(levels[idx].repeat(block, 0).repeat(block, 1))
  return np.stack(found), pattern_probs(n)


def entropy_bits_per_dim(config):
  """Entropy of the PATTERNS distribution of config.data in bits per dimension (exact)."""
  patterns, p = make_patterns(config)
  return float(-np.sum(p * np.log2(p)) / np.prod(patterns.shape[1:]))


def pattern_arrays(config):
  """{'train': (images, labels), 'test': (...)}: i.i.d. draws (labels = pattern index) from
  seeds pattern_seed + 1 and + 2, as datasets.get_dataset's local datasets."""
  s = _settings(config)
  patterns, p = make_patterns(config)
  out = {}
  for j, split in enumerate(('train', 'test')):
    rng = np.random.default_rng(s['pattern_seed'] + 1 + j)
    labels = rng.choice(len(p), size=s[f'pattern_{split}_size'], p=p).astype(np.int32)
    out[split] = (patterns[labels], labels)
  return out


def log2_prob(config, images):
  """log2 P(image) under the PATTERNS distribution for uint8 images (N, H, W, C); -inf if absent."""
  patterns, p = make_patterns(config)
  flat = patterns.reshape(len(patterns), -1)
  images = np.asarray(images, np.uint8).reshape(len(images), -1)
  match = np.all(images[:, None, :] == flat[None], axis=-1)
  with np.errstate(divide='ignore'):
    return np.log2(match.astype(np.float64) @ p)
