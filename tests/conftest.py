"""The `trained` fixture: one tiny trained workdir per test session, shared by the end-to-end
tests of training, evaluation and the dequantizer (the subprocess helpers are in harness.py)."""
import fcntl
import os
import shutil

import pytest

from harness import ok, run_main, train_args


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """Order-1 run: 4 steps, checkpoints every 2, eval every 2, logging every step.

  Run once per pytest session even under pytest-xdist: workers share the session's temp root
  and the first one to take the lock trains; the others wait and reuse the workdir (read-only;
  tests that write copy it first)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  shared = root / 'trained_order1'
  shared.mkdir(exist_ok=True)
  workdir = shared / 'wd'
  with open(shared / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (shared / 'done').exists():
        if workdir.exists():
          shutil.rmtree(workdir)
        ok(run_main(train_args(workdir, n_iters=4)))
        (shared / 'done').touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir


def pytest_collection_modifyitems(items):
  """Tests marked slow first (stable order otherwise), so that under pytest-xdist the long ones
  start early and the workers finish together instead of one running the last long test alone."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
