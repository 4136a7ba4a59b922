"""Two local processes under jax.distributed (coordinator on 127.0.0.1, one CPU device each) train
one tiny model together through main.py and agree on the checkpoint."""
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoints
import train_lib
from harness import ROOT, main_env


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
  workdir = tmp_path / 'wd'
  port = _free_port()
  env = main_env({'JAX_PLATFORMS': 'cpu'})
  args = ['--config=configs/toy/mog1d_ve.py', f'--workdir={workdir}', '--mode=train',
          '--config.training.batch_size=64', '--config.training.n_iters=4',
          '--config.training.snapshot_freq=2', '--config.training.snapshot_freq_for_preemption=2',
          '--config.training.log_freq=1', '--config.training.eval_freq=2',
          '--config.training.snapshot_sampling=False',
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  # Each process logs to a file, which the test reads whether they finish or hang.
  logs = [tmp_path / f'stderr_{i}.txt' for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as f:
        procs.append(subprocess.Popen([sys.executable, 'main.py', *args, f'--process_id={i}'],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f))
    for p in procs:
      try:
        p.wait(timeout=300)
      except subprocess.TimeoutExpired:
        pytest.fail('The two processes did not finish in 300 s; their logs end:\n'
                    + '\n'.join(log.read_text()[-1500:] for log in logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  errs = [log.read_text() for log in logs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]

  sums = {}
  for err in errs:
    m = re.search(r'Training done: process (\d)/2 at step 4, params checksum (\S+)\.', err)
    assert m, err[-3000:]
    sums[int(m.group(1))] = float(m.group(2))
  assert sorted(sums) == [0, 1] and sums[0] == sums[1]

  # One checkpoint, written once, holding what both processes hold.
  log = (workdir / 'stdout.txt').read_text()
  assert '(2 devices, 2 processes, global batch 64)' in log
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['checkpoint_1', 'checkpoint_2']
  assert sorted(os.listdir(workdir / 'checkpoints-meta')) == ['checkpoint_2']
  raw = checkpoints.restore_raw(str(workdir / 'checkpoints' / 'checkpoint_2'),
                                jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert int(np.asarray(raw['step'])) == 4
  np.testing.assert_allclose(train_lib.params_checksum(raw['params']), sums[0], rtol=1e-9)
  # Only process 0 writes logs.
  assert log.count('Training done: process 0/2') == 1 and 'process 1/2' not in log
