"""Shared test helpers: main.py in a subprocess with a shared JAX compilation cache, and one tiny
trained workdir (session fixture `trained`) for run_lib_test.py and run_lib_eval_test.py.

To keep compile time small on a 2-core CPU, the runs shrink the tiny DIGITS DDPM++ U-Net to one
resolution level without attention (SMALL) and share a persistent JAX compilation cache between
their subprocesses, so programs are compiled once per machine.
"""
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG = 'configs/tiny/digits_ddpmpp.py'
SMALL = ['--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()']
CACHE = os.path.join(tempfile.gettempdir(), f'mle_score_ode_test_jax_cache_{os.getuid()}')


def main_env(env_extra=None):
  """The environment of a main.py subprocess: no inherited XLA flags, the shared cache."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', TF_CPP_MIN_LOG_LEVEL='2')
  env.update(env_extra or {})
  return env


def run_main(args, env_extra=None, timeout=600):
  """python main.py ARGS in a subprocess sharing the test compilation cache."""
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=main_env(env_extra),
                        capture_output=True, text=True, timeout=timeout)


def train_args(workdir, n_iters, order=1, freq=2, eval_freq=2, sampling=True, extra=()):
  return [f'--config={CONFIG}', f'--workdir={workdir}', '--mode=train', *SMALL,
          f'--config.training.score_matching_order={order}',
          f'--config.training.n_iters={n_iters}', f'--config.training.snapshot_freq={freq}',
          f'--config.training.snapshot_freq_for_preemption={freq}',
          '--config.training.log_freq=1', f'--config.training.eval_freq={eval_freq}',
          f'--config.training.snapshot_sampling={sampling}', *extra]


def ok(r):
  """r (a finished main.py run) after asserting it exited 0."""
  assert r.returncode == 0, r.stderr[-4000:]
  return r


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """Order-1 run: 4 steps, checkpoints every 2, eval every 2, logging every step.

  Run once per pytest session even under pytest-xdist: workers share the session's temp root
  and the first one to take the lock trains; the others wait and reuse the workdir (read-only;
  tests that write copy it first)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  shared = root / 'run_lib_test_order1'
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
