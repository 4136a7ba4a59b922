"""Dequantizers: the truncated-normal dequantizer's density against scipy.stats.truncnorm, and
eval.dequantizer's names (and the older booleans) through the config checks and the CLI."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import config_checks
import dequantizers
import names
import sde_lib
from configs.tiny.patterns_ddpmpp import get_config


@pytest.mark.parametrize('bits', [2, 8])
def test_truncated_normal_dequantizer_density_is_truncnorm(bits):
  sde = sde_lib.VPSDE(0.1, 20., 1000)
  eps = 1e-3
  fn = dequantizers.truncated_normal_dequantize_fn(sde, lambda x: (x + 1.) / 2., eps, bits)
  mean, std = sde.marginal_prob(jnp.ones((1,)), jnp.full((1,), eps))
  s = 2. ** bits * float(std[0]) * 0.5 / float(mean[0])
  levels = np.array([0., 1., 2., 3.]) / 3.
  images = jnp.asarray(np.tile(levels, (4096, 1)).reshape(4096, 2, 2, 1), jnp.float32)
  y, corr = fn(jax.random.PRNGKey(0), images)
  f = np.asarray(y) * 2 ** bits - np.asarray(images) * (2 ** bits - 1)
  assert f.min() >= 0 and f.max() <= 1
  x = np.asarray(images)
  a, b = -x / s, (1 - x) / s
  logq = scipy.stats.truncnorm.logpdf(f, a, b, loc=x, scale=s)
  np.testing.assert_allclose(corr, logq.reshape(4096, -1).sum(1) / (4 * np.log(2.)), atol=2e-3)
  np.testing.assert_allclose(f.mean(0).ravel(), scipy.stats.truncnorm.mean(a, b, x, s)[0].ravel(),
                             atol=5 * s / np.sqrt(4096) + 1e-4)


def test_dequantizer_names_and_bad_values_refused_in_one_line():
  assert [names.dequantizer_name(v) for v in (False, True, 'uniform', 'flowpp')] == [
    'uniform', 'flowpp', 'uniform', 'flowpp']
  for field, value, msg in (('dequantizer', 'gaussian', 'eval.dequantizer'),
                            ('num_deq_samples', 0, 'num_deq_samples')):
    config = get_config()
    config.eval[field] = value
    with pytest.raises(ValueError, match=msg) as e:
      config_checks.validate_eval(config)
    assert '\n' not in str(e.value)
  config = get_config()
  config.data.num_bits = 9
  with pytest.raises(ValueError, match='num_bits'):
    config_checks.validate_config(config, 'eval')
  from configs.toy.common import get_toy_config
  toy = get_toy_config('MOG1D', 1)
  toy.eval.num_deq_samples = 2
  with pytest.raises(ValueError, match='toy data'):
    config_checks.validate_eval(toy)


def test_cli_takes_names_and_old_booleans(monkeypatch):
  from absl import flags
  from ml_collections import config_flags
  for arg, want in (('truncated_normal', 'truncated_normal'), ('True', True), ('flowpp', 'flowpp')):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=fv)
    argv = ['prog', '--config=configs/tiny/patterns_ddpmpp.py',
            f'--config.eval.dequantizer={arg}', '--config.eval.num_deq_samples=3']
    monkeypatch.setattr('sys.argv', argv)  # config_flags reads the overrides from sys.argv
    fv(argv)
    assert fv.config.eval.dequantizer == want and fv.config.eval.num_deq_samples == 3
