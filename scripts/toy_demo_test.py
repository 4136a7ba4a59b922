"""scripts/toy_demo.py (make demo) end to end at toy sizes: every stage, the table and the figures,
then a rerun that resumes from what is stored (no stage trains or evaluates again)."""
import csv
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), f'mle_score_ode_test_jax_cache_{os.getuid()}')
ARGS = ['--base_steps=4', '--finetune_steps=2', '--batch_size=20', '--eval_points=40',
        '--grid=24', '--gap_points=8', '--gap_nt=3']


def run_demo(workdir):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', TF_CPP_MIN_LOG_LEVEL='2')
  r = subprocess.run([sys.executable, 'scripts/toy_demo.py', f'--workdir={workdir}', *ARGS],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


@pytest.mark.slow
def test_demo_writes_table_and_figures_and_resumes(tmp_path):
  wd = tmp_path / 'demo'
  first = run_demo(wd)
  with open(wd / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['dataset'], r['order'], r['steps']) for r in rows] == [
    ('mog1d', '1', '4'), ('mog1d', '1', '6'), ('mog1d', '2', '6'), ('mog1d', '3', '6')]
  for r in rows:
    assert np.isfinite(float(r['nll']))
    np.testing.assert_allclose(float(r['gap']), float(r['nll']) - float(r['true_nll']), atol=1e-9)
    np.testing.assert_allclose(float(r['true_nll']), -0.128854, atol=1e-5)
  assert all(float(r['ode_score_gap']) >= 0 for r in rows[1:])
  for name in ('results.md', 'density_mog1d.png', 'ode_score_gap_mog1d.png'):
    assert (wd / name).stat().st_size > 0
  for stage in ('order1_base', 'order1', 'order2', 'order3'):
    assert os.listdir(wd / 'mog1d' / stage / 'checkpoints')
  # The fine-tuning stages start from the first-order checkpoint (run_lib's fine-tune route).
  assert '--config.training.restore_from=' in first.stdout
  second = run_demo(wd)
  assert second.stdout.count('NLL') == first.stdout.count('NLL')
  with open(wd / 'results.csv') as f:
    assert list(csv.DictReader(f)) == rows
