"""Bits/dim estimators against independent truth: the K-sample importance-weighted estimate on an
analytic Gaussian (normal CDF), per-repeat reports by hand, and every estimator (ODE and bound,
each dequantizer, K = 1 and 2) of a tiny model staying above the PATTERNS entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import dequantizers
import eval_batches
import patterns_data
import sde_lib
from configs.tiny.patterns_ddpmpp import get_config


def test_iw_bpd_is_the_mean_for_k1_and_falls_toward_log_p_bin():
  """1-D Gaussian model density N(0.3, 0.05^2) on [0, 1], 2-bit bin [0.25, 0.5), uniform draws:
  E[iw_bpd] decreases with K toward -log2 P(bin) (normal CDF), never below it."""
  m, s, lo, width = 0.3, 0.05, 0.25, 0.25
  rng = np.random.default_rng(0)
  y = lo + width * rng.random((64, 4000))
  bpd = -(scipy.stats.norm.logpdf(y, m, s) + np.log(width)) / np.log(2.)  # log q = -log width
  exact = -np.log2(scipy.stats.norm.cdf(lo + width, m, s) - scipy.stats.norm.cdf(lo, m, s))
  k1 = np.asarray(eval_batches.iw_bpd(jnp.asarray(bpd[:1]), 1))
  np.testing.assert_allclose(k1, bpd[0], rtol=1e-6)
  means = [float(np.mean(eval_batches.iw_bpd(jnp.asarray(bpd[:k].astype(np.float32)), 1)))
           for k in (1, 2, 4, 16, 64)]
  assert all(a > b for a, b in zip(means, means[1:])), means
  assert means[-1] > exact - 1e-3 and means[-1] - exact < 0.2 * (means[0] - exact), means


def test_iw_bpd_per_dimension_of_d_dim_data():
  """D dims: iw_bpd = -log2 mean_k 2^(-D b_k) / D, by hand."""
  b = np.array([[1.0, 2.0], [1.5, 0.5], [3.0, 1.0]])
  want = -np.log2(np.mean(2. ** (-4 * b), axis=0)) / 4
  np.testing.assert_allclose(eval_batches.iw_bpd(jnp.asarray(b), 4), want, rtol=1e-6)


def test_repeat_reports_by_hand():
  rng = np.random.default_rng(1)
  arrays = [rng.normal(size=8) for _ in range(4)]
  index = [(0, 0), (0, 1), (1, 0), (1, 1)]
  out = eval_batches.repeat_reports(arrays, index)
  r0 = np.concatenate(arrays[:2])
  assert out['bpd_per_repeat'][0]['mean'] == pytest.approx(r0.mean())
  assert out['bpd_per_repeat'][0]['sem'] == pytest.approx(r0.std(ddof=1) / 4)
  assert out['bpd_per_batch'][3] == pytest.approx(
    {'repeat': 1, 'batch': 1, 'mean': arrays[3].mean(), 'sem': arrays[3].std(ddof=1) / np.sqrt(8),
     'n': 8})
  means = [np.concatenate(arrays[:2]).mean(), np.concatenate(arrays[2:]).mean()]
  assert out['bpd_between_repeats_sem'] == pytest.approx(np.std(means, ddof=1) / np.sqrt(2))


def test_every_estimator_of_a_tiny_model_is_above_the_entropy():
  """An untrained tiny DDPM++ on 2-bit PATTERNS: ODE and bound, uniform / Flow++ (at init) /
  truncated normal, K = 1 and 2: every bits/dim above the exact entropy; run_part with one draw
  is the part's own output, and the K = 2 estimate is below the mean of its two draws."""
  import datasets
  import deq_lib
  import train_lib
  config = get_config()
  config.data.num_bits = 2
  config.model.nf = 8
  config.eval.rtol = config.eval.atol = 1e-2
  config.eval.bound_num_times = 4
  entropy = patterns_data.entropy_bits_per_dim(config)
  images = jnp.asarray(patterns_data.pattern_arrays(config)['test'][0][:8] / 255., jnp.float32)
  sde, _ = sde_lib.get_sde(config)
  model, _, state = train_lib.build_state(config, jax.random.PRNGKey(0))
  scaler = datasets.get_data_scaler(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  deq_model, _, deq_state = deq_lib.init_deq_state(config, jax.random.PRNGKey(1), images)
  deq_fns = {'flowpp': deq_lib.make_dequantize_fn(deq_model, deq_state.params, 2)}
  for name in ('uniform', 'truncated_normal'):
    config.eval.dequantizer = name
    deq_fns[name] = dequantizers.get_dequantize_fn(config, None, None, sde, inverse_scaler)
  draws = {name: [dict(zip(('image', 'deq_bpd'), fn(jax.random.PRNGKey(10 + k), images)))
                  for k in range(2)] for name, fn in deq_fns.items()}
  keys = [jax.random.PRNGKey(20), jax.random.PRNGKey(21)]
  for bound in (False, True):
    config.eval.bound = bound
    part = eval_batches.get_batch_parts(config, sde, model, inverse_scaler)[0]
    for name, pair in draws.items():
      pair = [dict(d, image=scaler(d['image'])) for d in pair]
      one = eval_batches.run_part(part, keys[:1], state.params_ema, state.model_state, pair[:1])
      same = part.fn(keys[0], state.params_ema, state.model_state, pair[0])
      np.testing.assert_array_equal(one['bpd'], same['bpd'])
      two = eval_batches.run_part(part, keys, state.params_ema, state.model_state, pair)
      for what, bpd in (('K=1', one['bpd']), ('K=2', two['bpd'])):
        assert np.all(np.isfinite(bpd)) and np.mean(bpd) > entropy, (name, bound, what)
      assert np.all(np.asarray(two['bpd']) <= np.asarray(two['bpd_k1']) + 1e-5)
