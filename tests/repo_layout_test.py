"""Layout of the files git tracks: assets/ as in score_sde, README images present, no data, no
checkpoints, no run outputs. Needs only git; skipped outside a git checkout."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Data sets, checkpoints, arrays and pickles: computed or downloaded, never committed.
DATA_SUFFIXES = ('.npz', '.npy', '.msgpack', '.ckpt', '.pkl', '.pickle', '.tfrecord', '.h5')
OUTPUT_DIRS = ('runs', 'checkpoints', 'checkpoints-meta')


@pytest.fixture(scope='module')
def tracked():
  """The set of paths (relative to the repository root) in git's index."""
  if shutil.which('git') is None:
    pytest.skip('git is not installed')
  res = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=False)
  if res.returncode != 0:
    pytest.skip('not a git checkout')
  return set(res.stdout.decode().split('\0')) - {''}


def test_stats_readme_tells_how_to_compute_stats(tracked):
  assert 'assets/stats/README.md' in tracked
  with open(os.path.join(ROOT, 'assets/stats/README.md'), encoding='utf-8') as f:
    assert '--mode fid_stats' in f.read()


def test_readme_images_are_tracked(tracked):
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  links = re.findall(r'!\[[^\]]*\]\(([^)\s]+)', text) + re.findall(r'<img[^>]+src="([^"]+)"', text)
  local = [link for link in links if not re.match(r'[a-z]+://', link)]
  missing = [link for link in local if os.path.normpath(link) not in tracked]
  assert not missing, f'README.md links images git does not track: {missing}'


def test_no_data_checkpoints_or_run_outputs_tracked(tracked):
  bad = sorted(p for p in tracked if p.lower().endswith(DATA_SUFFIXES)
               or any(d in OUTPUT_DIRS for d in p.split('/')[:-1]))
  assert not bad, f'data sets, checkpoints or run outputs are tracked: {bad}'
