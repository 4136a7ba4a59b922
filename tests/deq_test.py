"""main.py --mode train_deq and --mode eval with the trained dequantizer, on conftest's tiny
trained DIGITS workdir."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from harness import ok, run_main
from restore_from_test import foreign_file


@pytest.mark.slow
def test_cli_train_deq_then_eval_with_dequantizer(trained, tmp_path):
  """main.py --mode train_deq on the shared tiny DIGITS checkpoint_2 (eval.ckpt_id; 2 steps, then a
  resumed rerun to 4), then --mode eval with --config.eval.dequantizer=True: the newest
  dequantizer checkpoint is used and the per-batch bits/dim are stored.

  Not asserted: dequantized bpd < uniform bpd. For a score model trained a few steps the density
  is flat at the scale of one 8-bit bin, where the uniform q is optimal (E[bpd_correction] =
  KL(q || U) / (D ln 2) >= 0); scripts/deq_demo.py (60 score and 500 dequantizer steps) measured
  the correction falling 0.29 -> 0.005 bits/dim with deq - uniform = +0.004 +- 0.005."""
  wd = tmp_path / 'wd'
  shutil.copytree(trained, wd)
  common = ['--config=configs/tiny/digits_deq.py', f'--workdir={wd}',
            '--config.training.log_freq=1', '--config.training.eval_freq=2',
            '--config.training.snapshot_freq=2', '--config.training.snapshot_freq_for_preemption=2',
            '--config.training.batch_size=8', '--config.deq.warmup=1',
            '--config.eval.ckpt_id=2']  # the score checkpoint evaluated below
  ok(run_main(common + ['--mode=train_deq', '--config.deq.n_iters=2']))
  ok(run_main(common + ['--mode=train_deq', '--config.deq.n_iters=4']))
  log = (wd / 'deq' / 'stdout.txt').read_text()
  assert 'Resuming dequantizer training from' in log and 'step: 4, training_loss:' in log
  assert os.path.join('checkpoints', 'checkpoint_2') in log.split('Loaded the score model')[1]
  assert sorted(os.listdir(wd / 'deq' / 'checkpoints')) == ['checkpoint_1', 'checkpoint_2']
  evals = ['--mode=eval', '--config.eval.begin_ckpt=2', '--config.eval.end_ckpt=2',
           '--config.eval.batch_size=4', '--config.eval.num_bpd_batches=1',
           '--config.eval.num_repeats=1', '--config.eval.rtol=1e-3', '--config.eval.atol=1e-3']
  ok(run_main(common + evals + ['--config.eval.dequantizer=True', '--eval_folder=eval_deq']))
  deq = json.loads((wd / 'eval_deq' / 'ckpt_2' / 'summary.json').read_text())
  assert deq['bpd_n'] == 4 and np.isfinite(deq['bpd'])
  eval_log = (wd / 'eval_deq' / 'stdout.txt').read_text()
  used = eval_log.split('Loaded the variational dequantizer from')[1].splitlines()[0]
  assert re.search(r'deq/checkpoints(-meta)?/checkpoint_2\b', used), used  # step 4's
  # (uniform dequantization of the same batch: eval_test.py; the correction's formula:
  # deq_lib_test.test_dequantize_fn_bins_and_correction)


def test_foreign_file_refused_before_any_work(tmp_path):
  """--mode train_deq with eval.restore_from holding another model's tree: one line, exit 2, no
  workdir."""
  path = tmp_path / 'checkpoint_19'
  foreign_file(path, 'another model')
  wd = tmp_path / 'wd'
  r = run_main(['--config=configs/tiny/digits_deq.py', f'--workdir={wd}', '--mode=train_deq',
                f'--config.eval.restore_from={path}'])
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert 'params_ema do not match the model' in lines[0], lines[0]
  assert not wd.exists()
