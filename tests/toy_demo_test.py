"""scripts/toy_demo.py (make demo) end to end at toy sizes: both datasets in two worker processes,
the table (true NLL on the same points as the models, each stage's steps per second, the CPU),
the figures, then a rerun that resumes from what is stored (no stage trains or evaluates again,
the same table)."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from harness import ROOT, main_env

ARGS = ['--base_steps=4', '--finetune_steps=2', '--batch_size=20', '--eval_points=40',
        '--grid=24', '--jobs=2']


def run_demo(workdir):
  r = subprocess.run([sys.executable, 'scripts/toy_demo.py', f'--workdir={workdir}', *ARGS],
                     cwd=ROOT, env=main_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


@pytest.mark.slow
def test_demo_writes_table_and_figures_and_resumes(tmp_path):
  import toy_data
  wd = tmp_path / 'demo'
  first = run_demo(wd)
  with open(wd / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['dataset'], r['order'], r['steps']) for r in rows] == [
    (ds, str(o), '6') for ds in ('mog1d', 'checkerboard') for o in (1, 2, 3)]
  for r in rows:
    name = r['dataset'].upper()
    true = -toy_data.toy_log_prob(name, toy_data.sample_toy(name, 10_000, 40))
    np.testing.assert_allclose(float(r['true_nll']), true.mean(), rtol=1e-6)
    assert np.isfinite(float(r['nll']))
    np.testing.assert_allclose(float(r['gap']), float(r['nll']) - float(r['true_nll']), atol=1e-9)
    if r['order'] != '1':
      base = next(q for q in rows if q['dataset'] == r['dataset'] and q['order'] == '1')
      np.testing.assert_allclose(float(r['vs_order1']), float(r['nll']) - float(base['nll']),
                                 atol=1e-9)
      np.testing.assert_allclose(float(r['gap_closed']), 1 - float(r['gap']) / float(base['gap']),
                                 rtol=1e-9)
    # Every stage trained from scratch here: its steps per second (wall time of the stage).
    assert float(r['steps_per_s']) > 0 and float(r['base_steps_per_s']) > 0
  assert len({r['base_steps_per_s'] for r in rows}) == 2  # one base stage per dataset
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import bench_common
  assert f'CPU {bench_common.cpu_model()}' in (wd / 'results.md').read_text()
  for name in ('results.md', 'density_mog1d.png', 'density_checkerboard.png'):
    assert (wd / name).stat().st_size > 0
  for ds in ('mog1d', 'checkerboard'):
    for stage in ('order1_base', 'order1', 'order2', 'order3'):
      assert os.listdir(wd / ds / stage / 'checkpoints')
  # The fine-tuning stages start from the first-order checkpoint (run_lib's fine-tune route).
  assert '--config.training.restore_from=' in first.stdout
  # A normal run is quiet: no TensorFlow CUDA probe, oneDNN notice or orbax warning.
  for noise in ('cuInit', 'oneDNN', 'Metadata file does not exist', 'WARNING'):
    assert noise not in first.stderr + first.stdout, noise
  evals = sorted(wd.glob('*/order*/eval.json'))
  stamps = [p.stat().st_mtime_ns for p in evals]
  second = run_demo(wd)
  assert [p.stat().st_mtime_ns for p in evals] == stamps
  with open(wd / 'results.csv') as f:
    assert list(csv.DictReader(f)) == rows
  assert 'Demo done' in second.stdout
