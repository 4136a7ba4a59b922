"""patterns_data: the PATTERNS entropy in closed form and by Monte Carlo."""
import numpy as np
import pytest
import scipy.stats

import patterns_data
from configs.tiny.patterns_ddpmpp import get_config


def test_patterns_entropy_is_closed_form_and_matches_samples():
  config = get_config()
  patterns, p = patterns_data.make_patterns(config)
  assert patterns.shape == (32, 8, 8, 1) and patterns.dtype == np.uint8
  assert len({x.tobytes() for x in patterns}) == 32
  assert set(np.unique(patterns)) <= {0, 85, 170, 255}
  h = scipy.stats.entropy(1. / np.arange(1, 33), base=2) / 64
  assert patterns_data.entropy_bits_per_dim(config) == pytest.approx(h, rel=1e-12)
  images, labels = patterns_data.pattern_arrays(config)['train']
  np.testing.assert_array_equal(images, patterns[labels])
  logp = patterns_data.log2_prob(config, images)
  np.testing.assert_allclose(logp, np.log2(p[labels]))
  mc = -logp.mean() / 64
  assert abs(mc - h) < 4 * logp.std() / 64 / np.sqrt(len(logp))
  again = patterns_data.make_patterns(get_config())[0]
  np.testing.assert_array_equal(again, patterns)
