"""Fault injection through the CLI: assertions on the records of the trials in reliability.py
(which scripts/reliability_table.py prints as the table of docs/reliability.md).

Outcomes (reliability_test.py and scripts/reliability_table.py on a loaded 2-core CPU):

| fault | trials | outcome |
|---|---|---|
| SIGKILL at seeded random moments (start-up/restore, training loop, as an orbax tmp checkpoint dir appears), restart with the same command | 12 kills of one 60-step run (3 during a checkpoint write) | every restart resumed from the newest complete checkpoint (never a partial one); stale tmp dirs removed; final params, EMA, optimizer state and rng bitwise equal to an uninterrupted run |
| NaN in every input of step 6, training.nonfinite='stop' | 1 | exit 3, one stderr line naming step 6 and the fixes; checkpoints byte-identical (files, sizes, mtimes) |
| NaN in every input of step 6, training.nonfinite='skip' | 1 | exit 0, skip counted (nonfinite_count 1, logged); step-6 params/EMA/optimizer state equal step 5's; every saved array finite |
| latest meta + periodic checkpoints damaged: garbled array bytes, truncated array file, deleted array file, garbled meta JSON | 4 | error line naming each damaged checkpoint; resumed from the previous good one (step 2) |
| every checkpoint damaged | 1 | exit 2, one line naming them and the fix; checkpoints untouched |
| bad input (BAD_INPUT: BAD_CLI + sampler/predictor/corrector/nonfinite/lr-schedule names, unprepared TFDS dataset, workdir is a file) against an existing workdir | 21 | exit 2, one stderr line naming problem and fix; workdir files and mtimes unchanged; nothing compiled (fresh JAX cache stays empty); 0.3-3 s each, 10-16 s for TFDS (TensorFlow import) |
"""
import os

import pytest

from reliability import (BAD_INPUT, DAMAGE, bad_input_trial, check_sigkill_record, damaged_trial,
                         nonfinite_skip_trial, nonfinite_stop_trial, sigkill_trials, train_base)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bitwise(tmp_path):
  check_sigkill_record(sigkill_trials(tmp_path, kills=8), min_kills=8)


# ------------------------------------------------------------------------------------------------
# Non-finite loss / gradient
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return train_base(tmp_path_factory.mktemp('reliability') / 'base')


def test_nonfinite_stop_names_step_and_keeps_checkpoints(base, tmp_path):
  rec = nonfinite_stop_trial(base, tmp_path / 'wd')
  assert rec['returncode'] == 3, rec
  assert rec['last_line'].startswith('main.py: error: Non-finite loss at step 6 ('), rec
  assert "training.nonfinite='skip'" in rec['last_line']
  assert rec['checkpoints_unchanged'], rec
  assert rec['logged_steps'] == [5], rec  # resumed at 4; step 6 is never logged as trained


def test_nonfinite_skip_counts_and_never_saves_nan(base, tmp_path):
  rec = nonfinite_skip_trial(base, tmp_path / 'wd')
  assert rec['returncode'] == 0, rec
  assert rec['checkpoints'] == [5, 6, 7, 8], rec
  assert rec['steps'] == {5: 5, 6: 6, 7: 7, 8: 8}, rec
  assert rec['nonfinite_count'] == {5: 0, 6: 1, 7: 1, 8: 1}, rec
  assert rec['all_finite'] and rec['step6_kept_step5'] and rec['step7_moved'], rec
  assert rec['logged_skips'] == 1, rec


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_checkpoints_fall_back(base, tmp_path, damage):
  rec = damaged_trial(base, tmp_path / 'wd', damage)
  assert rec['returncode'] == 0, rec
  assert rec['named'] == rec['damaged'], rec
  assert rec['resume_step'] == 2, rec
  assert rec['resumed_from'] == os.path.join(str(tmp_path / 'wd'), 'checkpoints', 'checkpoint_1')


def test_every_checkpoint_damaged_refuses(base, tmp_path):
  rec = damaged_trial(base, tmp_path / 'wd', 'garbled array bytes', all_checkpoints=True)
  assert rec['returncode'] == 2, rec
  assert rec['last_line'].startswith('main.py: error: No readable checkpoint: '), rec
  assert all(d in rec['last_line'] for d in rec['damaged']) and 'move them out' in rec['last_line']
  assert rec['unchanged'], rec


# ------------------------------------------------------------------------------------------------
# Bad input against an existing workdir
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bad_tmp(base, tmp_path_factory):
  return tmp_path_factory.mktemp('bad_input')


@pytest.mark.parametrize('name,args,words,env_extra', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_refused_before_any_work(base, bad_tmp, name, args, words, env_extra):
  rec = bad_input_trial(base, bad_tmp, name, args, words, env_extra)
  assert rec['returncode'] == 2, rec
  assert len(rec['lines']) == 1 and rec['lines'][0].startswith('main.py: error: '), rec
  assert not rec['words_missing'], rec
  assert rec['unchanged'], rec
  assert not rec['compiled'], rec
  assert rec['seconds'] < 60, rec
