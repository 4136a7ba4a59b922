"""main.py in a subprocess, for the end-to-end tests and scripts/reliability_table.py.

Every run gets the same environment: the tests' XLA flags (TEST_XLA_FLAGS, nothing inherited) and
one persistent JAX compilation cache shared by all test processes, so that each program is
compiled once per machine on a 2-core CPU. The tiny DIGITS DDPM++ runs shrink the U-Net to one
resolution level without attention (SMALL); the toy runs use the MOG1D VE config with batch 16.
"""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/tiny/digits_ddpmpp.py'
TOY = 'configs/toy/mog1d_ve.py'
SMALL = ['--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()']
CACHE = os.path.join(tempfile.gettempdir(), f'mle_score_ode_test_jax_cache_{os.getuid()}')
# LLVM at optimisation level 1: the same XLA programs; over the whole suite as fast as level 0
# (which compiles fastest but ran the dequantizer's step 12x slower) and faster than the default.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1'


def xla_flags(extra=''):
  """TEST_XLA_FLAGS followed by `extra` (e.g. a host device count)."""
  return f'{TEST_XLA_FLAGS} {extra}'.strip()


def main_env(env_extra=None, cache=CACHE):
  """The environment of a main.py subprocess: the tests' XLA flags (with env_extra's XLA_FLAGS
  after them), the compilation cache."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, TF_CPP_MIN_LOG_LEVEL='2',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  extra = dict(env_extra or {})
  env.update(extra, XLA_FLAGS=xla_flags(extra.get('XLA_FLAGS', '')))
  return env


def run_main(args, env_extra=None, cache=CACHE, timeout=600, program=None):
  """python main.py ARGS (or python -c PROGRAM ARGS) in a subprocess at the repository root."""
  cmd = [sys.executable, 'main.py'] if program is None else [sys.executable, '-c', program]
  return subprocess.run([*cmd, *args], cwd=ROOT, env=main_env(env_extra, cache),
                        capture_output=True, text=True, timeout=timeout)


def ok(r):
  """r (a finished main.py run) after asserting it exited 0."""
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def train_args(workdir, n_iters, order=1, freq=2, eval_freq=2, sampling=True, extra=()):
  """A tiny DIGITS training run: checkpoints every `freq` steps, logging every step."""
  return [f'--config={CONFIG}', f'--workdir={workdir}', '--mode=train', *SMALL,
          f'--config.training.score_matching_order={order}',
          f'--config.training.n_iters={n_iters}', f'--config.training.snapshot_freq={freq}',
          f'--config.training.snapshot_freq_for_preemption={freq}',
          '--config.training.log_freq=1', f'--config.training.eval_freq={eval_freq}',
          f'--config.training.snapshot_sampling={sampling}', *extra]


def toy_args(workdir, n_iters, freq=2, snapshot_freq=None, extra=()):
  """A toy MOG1D training run (batch 16): checkpoints, logs and evals every `freq` steps."""
  return [f'--config={TOY}', f'--workdir={workdir}', '--mode=train',
          '--config.training.batch_size=16', f'--config.training.n_iters={n_iters}',
          f'--config.training.snapshot_freq={snapshot_freq or freq}',
          f'--config.training.snapshot_freq_for_preemption={freq}',
          f'--config.training.log_freq={freq}', f'--config.training.eval_freq={freq}',
          '--config.training.snapshot_sampling=False', *extra]
