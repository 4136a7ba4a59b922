"""The toy distributions of mle_score_ode's toy.py (`inf_train_gen`): samplers, exact log-densities
and true NLLs, in numpy (no TensorFlow: the demo and the tests use them directly)."""
import math

import numpy as np
from scipy import integrate
from scipy import special

from names import TOY_DATASETS

_MOG_MEANS = np.array([-2., -6., 4.]) / 7.
# toy.py calls these `stds` but uses them as variances.
_MOG_VARS = np.array([0.1, 0.1, 1.]) / 7. ** 2
_MOG_WEIGHTS = np.array([0.3, 0.3, 0.4])
_POINT_CENTERS = np.array([-6., -3., 0., 3., 6.])
_POINT_WEIGHTS = np.full(5, 0.2)
_POINT_WIDTH = 0.001
_SWISSROLL_OFFSET = 4.5
_TOY_DIMS = {'MOG1D': 1, 'CHECKERBOARD': 2, 'SWISSROLL': 2, 'POINT': 1}


def _check_toy(name):
  if name not in _TOY_DIMS:
    raise ValueError(f'Unknown toy dataset {name!r}; use one of {", ".join(TOY_DATASETS)}.')


def toy_dim(name):
  """Dimension of a toy distribution."""
  _check_toy(name)
  return _TOY_DIMS[name]


def _stratified_counts(rng, n, weights):
  """Per-component counts as toy.py (int(n * w_i)); any remainder is drawn from the weights."""
  counts = np.floor(n * weights + 1e-9).astype(np.int64)
  rest = n - counts.sum()
  if rest > 0:
    counts += rng.multinomial(rest, weights)
  return counts


def sample_toy(name, rng_or_seed, n):
  """n samples (float32, shape (n, dim)) of a toy distribution, as toy.py draws them.

  MOG1D and POINT draw int(n * weight) points per component (toy.py's stratified batches) and
  shuffle; SWISSROLL is sklearn's make_swiss_roll (noise 1, columns 0 and 2, / 10) in five copies
  at (0, 0) and (+-4.5, +-4.5), shuffled and cut to n. `rng_or_seed`: int, None or a
  np.random.Generator (advanced in place).
  """
  _check_toy(name)
  rng = np.random.default_rng(rng_or_seed)
  n = int(n)
  if name == 'MOG1D':
    counts = _stratified_counts(rng, n, _MOG_WEIGHTS)
    comp = np.repeat(np.arange(3), counts)
    x = rng.standard_normal(n) * np.sqrt(_MOG_VARS[comp]) + _MOG_MEANS[comp]
    x = x[rng.permutation(n)][:, None]
  elif name == 'POINT':
    counts = _stratified_counts(rng, n, _POINT_WEIGHTS)
    comp = np.repeat(np.arange(5), counts)
    x = rng.random(n) * _POINT_WIDTH + _POINT_CENTERS[comp] - _POINT_WIDTH / 2.
    x = x[rng.permutation(n)][:, None]
  elif name == 'CHECKERBOARD':
    x1 = rng.random(n) * 4. - 2.
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2. + np.floor(x1) % 2
    x = np.stack([x1, x2], axis=1) * 2.
  else:  # SWISSROLL
    from sklearn.datasets import make_swiss_roll
    m = max(1, math.ceil(n / 5))
    base = make_swiss_roll(n_samples=m, noise=1.0, random_state=int(rng.integers(2 ** 31 - 1)))[0]
    base = base[:, [0, 2]] / 10.
    r = _SWISSROLL_OFFSET
    offsets = np.array([[0., 0.], [-r, -r], [-r, r], [r, -r], [r, r]])
    x = (base[None] + offsets[:, None]).reshape(-1, 2)
    x = x[rng.permutation(len(x))[:n]]
  return np.asarray(x, np.float32)


def toy_log_prob(name, x):
  """Exact log density of a toy distribution at x (..., dim) -> (...,) in float64 numpy.

  CHECKERBOARD: -log 32 on its 8 squares of side 2, -inf elsewhere; POINT: log(0.2 / 0.001) inside
  its five intervals, -inf elsewhere. SWISSROLL has no closed form (ValueError).
  """
  _check_toy(name)
  x = np.asarray(x, np.float64)
  if x.shape[-1] != _TOY_DIMS[name]:
    raise ValueError(f'{name} points need a trailing axis of size {_TOY_DIMS[name]}, got shape '
                     f'{x.shape}; pass an array (..., {_TOY_DIMS[name]}).')
  if name == 'MOG1D':
    y = x[..., 0, None]
    comps = (np.log(_MOG_WEIGHTS) - 0.5 * np.log(2 * np.pi * _MOG_VARS)
             - (y - _MOG_MEANS) ** 2 / (2 * _MOG_VARS))
    return special.logsumexp(comps, axis=-1)
  if name == 'POINT':
    y = x[..., 0, None]
    lo = _POINT_CENTERS - _POINT_WIDTH / 2.
    inside = np.any((y >= lo) & (y < lo + _POINT_WIDTH), axis=-1)
    return np.where(inside, np.log(0.2 / _POINT_WIDTH), -np.inf)
  if name == 'CHECKERBOARD':
    in_box = np.all((x >= -4.) & (x < 4.), axis=-1)
    cells = np.floor(x / 2.)
    on_board = (cells[..., 0] + cells[..., 1]) % 2 == 0
    return np.where(in_box & on_board, -np.log(32.), -np.inf)
  raise ValueError('SWISSROLL has no closed-form density; use MOG1D, CHECKERBOARD or POINT for '
                   'exact log-likelihoods.')


def toy_true_nll(name):
  """Expected negative log-likelihood (differential entropy, nats) of a toy distribution."""
  _check_toy(name)
  if name == 'CHECKERBOARD':
    return float(np.log(32.))
  if name == 'POINT':
    return float(-np.log(0.2 / _POINT_WIDTH))
  if name == 'MOG1D':
    sd = np.sqrt(_MOG_VARS)
    lo, hi = np.min(_MOG_MEANS - 15 * sd), np.max(_MOG_MEANS + 15 * sd)

    def integrand(y):
      logp = toy_log_prob('MOG1D', np.array([y]))
      return -np.exp(logp) * logp

    value, _ = integrate.quad(integrand, lo, hi, points=sorted(_MOG_MEANS), limit=500,
                              epsabs=1e-12, epsrel=1e-12)
    return float(value)
  raise ValueError('SWISSROLL has no closed-form density, so no exact NLL; estimate it from '
                   'samples or use MOG1D, CHECKERBOARD or POINT.')


class ToyBatches:
  """A toy stream of {'image', 'label'} numpy batches seeded from (config.seed, process_index,
  split): iterating starts it afresh; `skip(n)` is the stream without its first n batches."""

  def __init__(self, name, seed, shape, num_batches, skipped=0):
    self.name, self.seed, self.shape = name, seed, shape
    self.num_batches, self.skipped = num_batches, skipped

  def skip(self, n):
    return ToyBatches(self.name, self.seed, self.shape, self.num_batches, self.skipped + n)

  def __iter__(self):
    rng = np.random.default_rng(self.seed)
    size = int(np.prod(self.shape[:-1]))
    i = 0
    while self.num_batches is None or i < self.num_batches:
      x = sample_toy(self.name, rng, size).reshape(self.shape).astype(np.float32)
      if i >= self.skipped:
        yield {'image': x, 'label': np.zeros(self.shape[:-1], np.int32)}
      i += 1
