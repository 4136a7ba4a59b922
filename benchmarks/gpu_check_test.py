"""benchmarks/gpu_check.py --cpu_smoke: the accelerator check's path runs end to end on a CPU
(order 3 only, the one that splits its batch: orders 1 and 2 take the same path with less work)."""
import os
import subprocess
import sys

import pytest

from harness import main_env

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_cpu_smoke_prints_one_row_per_order_and_a_bpd_row():
  env = main_env()
  r = subprocess.run([sys.executable, os.path.join(HERE, 'gpu_check.py'), '--cpu_smoke',
                      '--orders', '3'],
                     capture_output=True, text=True, timeout=600, env=env, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [line for line in r.stdout.splitlines() if line.startswith('| ')][1:]
  assert [row.split(' | ')[0] for row in rows] == [
    '| train order 3', '| exact bpd, batch 2 (untrained model)']
  assert 'n_microbatches=2' in rows[0]  # the smoke run splits order 3's batch
  ms = float(rows[0].split(' | ')[2])
  assert ms > 0
  bpd = float(rows[1].rstrip(' |').split(' | ')[-1])
  assert 0 < bpd < 50
