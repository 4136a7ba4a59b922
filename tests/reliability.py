"""Fault-injection trials through the CLI (python main.py ... --mode train) on the toy MOG1D VE
config (batch 16, MLP), run by harness.py (the tests' persistent JAX compilation cache).

Each trial returns a record (dict): reliability_test.py asserts on it, scripts/reliability_table.py
turns it into the table of docs/reliability.md. Faults come from outside the product code: SIGKILL
from the parent (at seeded random moments, or as soon as an orbax temporary checkpoint directory
appears), a driver that wraps parallel.get_multi_step_fn to poison one step's batch with NaN,
bytes damaged on disk, and bad command lines (BAD_CLI, shared with main_test.py).
"""
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import harness
from harness import CONFIG as TINY
from harness import ROOT, TOY, main_env, ok, toy_args

TMP_TAG = '.orbax-checkpoint-tmp'


# A NaN in every input of one training step (1-based `RELIABILITY_NAN_STEP`): the loss and every
# gradient are then non-finite. Wraps the jitted multi-step function; the product code is as is.
NAN_DRIVER = r'''
import os
import jax
import jax.numpy as jnp
from absl import app
import main
import parallel
bad = int(os.environ['RELIABILITY_NAN_STEP'])
make = parallel.get_multi_step_fn
def get_multi_step_fn(step_fn, mesh, donate=True, n_consts=0, model=None):
  f = make(step_fn, mesh, donate, n_consts, model)
  def g(state, batch, *consts):
    first = int(jax.device_get(state.step)) + 1
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if first <= bad < first + n:
      batch = jax.tree_util.tree_map(
        lambda x: jax.device_put(x.at[bad - first].set(jnp.nan), x.sharding), batch)
    return f(state, batch, *consts)
  return g
parallel.get_multi_step_fn = get_multi_step_fn
app.run(main.main, flags_parser=main.parse_flags)
'''


def run_main(args, env_extra=None, nan_step=None, cache=harness.CACHE, timeout=600):
  """harness.run_main, through NAN_DRIVER when nan_step (1-based) is given."""
  program = None
  if nan_step is not None:
    program = NAN_DRIVER
    env_extra = dict(env_extra or {}, RELIABILITY_NAN_STEP=str(nan_step))
  return harness.run_main(args, env_extra, cache=cache, timeout=timeout, program=program)


def listing(directory):
  """{relative path: (size, mtime_ns, sha1)} of every file under directory."""
  out = {}
  for path in sorted(glob.glob(os.path.join(str(directory), '**'), recursive=True)):
    if os.path.isfile(path):
      st = os.stat(path)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, str(directory))] = (st.st_size, st.st_mtime_ns,
                                                      hashlib.sha1(f.read()).hexdigest())
  return out


def raw(step_dir):
  """Host numpy tree of one of our checkpoint_N dirs (CRC-verified)."""
  import jax
  import checkpoints
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(np.asarray, checkpoints.restore_raw(str(step_dir), sharding))


def _flat(tree):
  import checkpoints
  return checkpoints.flatten(tree)


def bitwise_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  return sorted(fa) == sorted(fb) and all(
    fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape
    and fa[k].tobytes() == fb[k].tobytes() for k in fa)


def train_base(workdir):
  """4 toy steps, every checkpoint every 2 steps: checkpoints/checkpoint_{1,2},
  checkpoints-meta/checkpoint_2."""
  ok(run_main(toy_args(workdir, n_iters=4)))
  return workdir


# ------------------------------------------------------------------------------------------------
# SIGKILL at random moments
# ------------------------------------------------------------------------------------------------

def _complete_steps(workdir, freqs):
  """{step dir: training step} of the finalised checkpoint_N dirs whose meta JSON parses."""
  out = {}
  for sub, freq in freqs.items():
    for d in glob.glob(os.path.join(str(workdir), sub, 'checkpoint_*')):
      m = re.match(r'^checkpoint_(\d+)$', os.path.basename(d))
      if not m:
        continue
      try:
        with open(os.path.join(d, 'meta', 'metadata')) as f:
          step = int(json.load(f)['step'])
      except (OSError, ValueError, KeyError):
        continue
      assert step == int(m.group(1)) * freq, (d, step)
      out[d] = step
  return out


def _tmp_dirs(workdir):
  return [p for sub in ('checkpoints', 'checkpoints-meta')
          for p in glob.glob(os.path.join(str(workdir), sub, '*')) if TMP_TAG in p]


def _log_tail(workdir, offset):
  try:
    with open(os.path.join(str(workdir), 'stdout.txt')) as f:
      f.seek(offset)
      return f.read()
  except OSError:
    return ''


def _log_size(workdir):
  p = os.path.join(str(workdir), 'stdout.txt')
  return os.path.getsize(p) if os.path.exists(p) else 0


def sigkill_trials(root, kills=12, seed=0, n_iters=60, freq=2, snapshot_freq=10):
  """One toy run killed `kills` times (SIGKILL) and restarted with the same command each time, vs
  an uninterrupted run. Kill moments cycle over: a seeded random delay after the training loop
  starts (x2), the moment an orbax temporary checkpoint dir appears, a seeded random delay from
  process start (during start-up / restore). Returns a record."""
  rng = np.random.default_rng(seed)
  root = str(root)
  os.makedirs(root, exist_ok=True)
  ref_dir, wd = os.path.join(root, 'reference'), os.path.join(root, 'killed')
  args = toy_args(wd, n_iters, freq=freq, snapshot_freq=snapshot_freq)
  freqs = {'checkpoints-meta': freq, 'checkpoints': snapshot_freq}
  trials = []
  kinds = ('loop', 'checkpoint write', 'loop', 'startup')
  t0 = time.time()
  finished = None
  while finished is None:
    kind = kinds[len(trials) % len(kinds)] if len(trials) < kills else None
    offset = _log_size(wd)
    expect = max(_complete_steps(wd, freqs).values(), default=None)
    stale = set(_tmp_dirs(wd))  # left by earlier kills until this run's manager removes them
    with open(os.path.join(root, 'console.txt'), 'a') as console:
      proc = subprocess.Popen([sys.executable, 'main.py', *args], cwd=ROOT, env=main_env(),
                              stdout=console, stderr=console)
    start = time.time()
    trial = {'kind': kind, 'expected_resume_step': expect}
    if kind is not None:
      if kind == 'startup':
        delay = float(rng.uniform(0.5, 4.))
        while proc.poll() is None and time.time() - start < delay:
          time.sleep(0.01)
      else:
        # 'loop': from the first trained step's log line (the first step also loads the program).
        pattern = 'Starting training loop' if kind != 'loop' else re.compile(
          r'step: \d+, training_loss')
        while proc.poll() is None and not (pattern.search(_log_tail(wd, offset)) if kind == 'loop'
                                           else pattern in _log_tail(wd, offset)):
          time.sleep(0.01)
        if kind == 'loop':
          delay = float(rng.uniform(0., 0.8))
          t1 = time.time()
          while proc.poll() is None and time.time() - t1 < delay:
            time.sleep(0.005)
        else:
          delay = None
          t1 = time.time()
          while proc.poll() is None and not _tmp_dirs(wd) and time.time() - t1 < 30:
            time.sleep(0.0005)
      trial['delay_s'] = delay
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
      trial['returncode'] = proc.wait()
      trial['tmp_dir_at_kill'] = bool(set(_tmp_dirs(wd)) - stale)
    else:
      trial['returncode'] = proc.wait(timeout=600)
      finished = trial['returncode']
    log = _log_tail(wd, offset)
    m = re.search(r'Resuming training from (\S+) at step (\d+)\.', log)
    trial['resumed_from'] = m.group(1) if m else None
    trial['resume_step'] = int(m.group(2)) if m else None
    trial['damaged_logged'] = re.findall(r'Checkpoint (\S+) is (?:corrupted|unreadable)', log)
    steps = [int(s) for s in re.findall(r'step: (\d+), training_loss', log)]
    trial['last_logged_step'] = max(steps, default=None)
    trials.append(trial)
    if trial['returncode'] not in (0, -signal.SIGKILL):
      break
  killed_s = time.time() - t0
  leftover_tmp = _tmp_dirs(wd)
  t1 = time.time()
  ok(run_main(toy_args(ref_dir, n_iters, freq=freq, snapshot_freq=snapshot_freq)))
  final = os.path.join('checkpoints', f'checkpoint_{n_iters // snapshot_freq}')
  got, want = raw(os.path.join(wd, final)), raw(os.path.join(ref_dir, final))
  sums = [re.findall(r'params checksum (\S+)\.', open(os.path.join(d, 'stdout.txt')).read())[-1:]
          for d in (wd, ref_dir)]
  return {'trials': trials, 'kills': sum(t['kind'] is not None for t in trials),
          'kills_during_checkpoint_write': sum(t.get('tmp_dir_at_kill', False) for t in trials),
          'final_returncode': finished, 'leftover_tmp_dirs': leftover_tmp,
          'bitwise_equal': bitwise_equal(got, want), 'checksums': sums,
          'final_step': int(got['step']), 'killed_run_s': killed_s,
          'reference_run_s': time.time() - t1}


def check_sigkill_record(rec, min_kills=10):
  assert rec['kills'] >= min_kills, rec
  assert rec['kills_during_checkpoint_write'] >= 1, rec
  assert rec['final_returncode'] == 0, rec
  for t in rec['trials']:
    if t['expected_resume_step'] is None:
      assert t['resume_step'] is None or t['kind'] is not None, t
    elif t['resume_step'] is not None or t['kind'] is None:
      # The newest complete checkpoint at restart, or (if it was being deleted when killed) an
      # older one after an error line naming it.
      assert (t['resume_step'] == t['expected_resume_step']
              or (t['damaged_logged'] and t['resume_step'] < t['expected_resume_step'])), t
  assert not rec['leftover_tmp_dirs'], rec
  assert rec['bitwise_equal'] and rec['checksums'][0] == rec['checksums'][1], rec



# ------------------------------------------------------------------------------------------------
# Non-finite loss / gradient
# ------------------------------------------------------------------------------------------------

def nonfinite_stop_trial(base_dir, workdir):
  shutil.copytree(base_dir, workdir)
  ckpts = {s: listing(os.path.join(str(workdir), s)) for s in ('checkpoints', 'checkpoints-meta')}
  offset = _log_size(workdir)
  r = run_main(toy_args(workdir, n_iters=8), nan_step=6)
  after = {s: listing(os.path.join(str(workdir), s)) for s in ('checkpoints', 'checkpoints-meta')}
  lines = r.stderr.strip().splitlines()
  return {'returncode': r.returncode, 'last_line': lines[-1] if lines else '',
          'checkpoints_unchanged': ckpts == after,
          'logged_steps': sorted(int(s) for s in re.findall(r'step: (\d+), training_loss',
                                                            _log_tail(workdir, offset)))}



def nonfinite_skip_trial(base_dir, workdir):
  shutil.copytree(base_dir, workdir)
  # Periodic checkpoints every step from here, numbered by step (checkpoint_5 ... checkpoint_8).
  r = run_main(toy_args(workdir, n_iters=8, freq=1, extra=['--config.training.nonfinite=skip']),
               nan_step=6)
  ck = {n: raw(os.path.join(str(workdir), 'checkpoints', f'checkpoint_{n}'))
        for n in (5, 6, 7, 8) if os.path.isdir(os.path.join(str(workdir), 'checkpoints',
                                                            f'checkpoint_{n}'))}
  all_finite = all(np.isfinite(v).all() for t in ck.values() for k, v in _flat(t).items()
                   if v.dtype.kind == 'f')
  keep = ('params', 'params_ema', 'opt_state', 'model_state')
  log = open(os.path.join(str(workdir), 'stdout.txt')).read()
  m = re.findall(r'skipped non-finite steps: (\d+)', log)
  return {
    'returncode': r.returncode, 'stderr': r.stderr[-2000:], 'checkpoints': sorted(ck),
    'all_finite': all_finite,
    'steps': {n: int(t['step']) for n, t in ck.items()},
    'nonfinite_count': {n: int(t['nonfinite_count']) for n, t in ck.items()},
    'step6_kept_step5': bool(ck) and all(bitwise_equal({k: ck[5][k]}, {k: ck[6][k]}) for k in keep),
    'step7_moved': bool(ck) and not bitwise_equal({'p': ck[6]['params']}, {'p': ck[7]['params']}),
    'logged_skips': int(m[-1]) if m else None}



# ------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ------------------------------------------------------------------------------------------------

def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _garble(path):
  with open(path, 'r+b') as f:
    b = bytearray(f.read())
    mid = len(b) // 2
    b[mid:mid + 64] = bytes(x ^ 0x5a for x in b[mid:mid + 64])
    f.seek(0)
    f.write(b)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
  'garbled array bytes': lambda d: _garble(_largest_array_file(d)),
  'truncated array file': lambda d: _truncate(_largest_array_file(d)),
  'garbled meta JSON': lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').write('{"step": '),
  'deleted array file': lambda d: os.remove(_largest_array_file(d)),
}


def damaged_trial(base_dir, workdir, damage, all_checkpoints=False):
  """Damage the latest checkpoints (meta and periodic, both step 4; with all_checkpoints also the
  step-2 one) and rerun the same training command."""
  workdir = pathlib.Path(workdir)
  shutil.copytree(base_dir, workdir)
  names = ['checkpoints-meta/checkpoint_2', 'checkpoints/checkpoint_2']
  if all_checkpoints:
    names.append('checkpoints/checkpoint_1')
  damaged = [os.path.join(str(workdir), n) for n in names]
  for d in damaged:
    DAMAGE[damage](d)
  before = listing(workdir / 'checkpoints'), listing(workdir / 'checkpoints-meta')
  offset = _log_size(workdir)
  r = run_main(toy_args(workdir, n_iters=4))
  log = _log_tail(workdir, offset)
  m = re.search(r'Resuming training from (\S+) at step (\d+)\.', log)
  lines = r.stderr.strip().splitlines()
  return {'damage': damage, 'returncode': r.returncode, 'last_line': lines[-1] if lines else '',
          'named': [d for d in damaged
                    if re.search(rf'Checkpoint {re.escape(d)} is (corrupted|unreadable)', log)],
          'damaged': damaged, 'resumed_from': m.group(1) if m else None,
          'resume_step': int(m.group(2)) if m else None,
          'unchanged': before == (listing(workdir / 'checkpoints'),
                                  listing(workdir / 'checkpoints-meta'))}



# ------------------------------------------------------------------------------------------------
# Bad input against an existing workdir
# ------------------------------------------------------------------------------------------------

# Bad command lines for a fresh workdir (main_test.py):
# (name, extra args, words the one line must contain, extra env).
BAD_CLI = [
  ('missing config', ['--config=configs/nope.py'], ['configs/nope.py', 'does not exist'], None),
  ('unknown override', [f'--config={TINY}', '--config.training.foo=1'],
   ['training.foo', 'unknown config field'], None),
  ('unknown sde', [f'--config={TINY}', '--config.training.sde=bogus'],
   ["Unknown SDE 'bogus'", '--config.training.sde'], None),
  ('unknown model', [f'--config={TINY}', '--config.model.name=bogus'],
   ["Unknown model 'bogus'", '--config.model.name'], None),
  ('unknown dataset', [f'--config={TINY}', '--config.data.dataset=BOGUS'],
   ["Unknown dataset 'BOGUS'", '--config.data.dataset'], None),
  ('order 4', [f'--config={TINY}', '--config.training.score_matching_order=4'],
   ['score_matching_order is 4', '1, 2 or 3'], None),
  ('order 3 without reduce_mean', [f'--config={TINY}', '--config.training.score_matching_order=3',
                                   '--config.training.reduce_mean=False'],
   ['Order-3', 'reduce_mean=True'], None),
  ('batch vs devices', [f'--config={TINY}', '--config.training.batch_size=12'],
   ['batch_size=12', 'not divisible by the 8 devices', 'multiple of 8'],
   {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}),
  ('microbatches vs per-device batch', [f'--config={TINY}', '--config.training.batch_size=16',
                                        '--config.training.n_microbatches=3'],
   ['n_microbatches=3', 'per-device batch 2', 'divisor of 2'],
   {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}),
  ('unknown remat', [f'--config={TINY}', '--config.training.remat=bogus'],
   ["training.remat is 'bogus'", 'none, convs, nothing'], None),
  ('image size', [f'--config={TINY}', '--config.data.image_size=15'],
   ['image_size=15', 'divisible by 2'], None),
  ('missing restore_from', [f'--config={TINY}', '--config.training.restore_from=/no/such/ckpt'],
   ['/no/such/ckpt', 'does not exist', 'restore_from'], None),
  ('unreadable restore_from', [f'--config={TINY}', '--config.training.restore_from=JUNK'],
   ['not a flax msgpack checkpoint', 'restore_from'], None),
  ('no cluster to join', [f'--config={TINY}', '--distributed'],
   ['--distributed found no cluster', '--coordinator_address'], None),
  ('missing mode', [f'--config={TINY}', '--mode='], ['--mode'], None),
]


def _bad_input_cases():
  """BAD_CLI's workdir-agnostic cases plus the ones below."""
  cases = [c for c in BAD_CLI if c[0] != 'missing mode']
  cases += [
    ('unknown sampler', [f'--config={TINY}', '--config.sampling.method=bogus'],
     ["Unknown sampler 'bogus'", 'config.sampling.method'], None),
    ('unknown predictor', [f'--config={TINY}', '--config.sampling.predictor=bogus'],
     ["Unknown predictor 'bogus'", 'config.sampling.predictor'], None),
    ('unknown corrector', [f'--config={TINY}', '--config.sampling.corrector=bogus'],
     ["Unknown corrector 'bogus'", 'config.sampling.corrector'], None),
    ('nonfinite mode', [f'--config={TOY}', '--config.training.nonfinite=ignore'],
     ["training.nonfinite is 'ignore'", "'stop' or 'skip'"], None),
    ('learning-rate schedule', [f'--config={TOY}', '--config.optim.schedule=linear'],
     ["optim.schedule is 'linear'", 'constant, cosine'], None),
    ('TFDS dataset not prepared', [f'--config={TINY}', '--config.data.dataset=CIFAR10',
                                   '--config.data.tfds_dir=EMPTY'],
     ["TFDS dataset 'cifar10' is not prepared", 'tfds build cifar10', '--config.data.tfds_dir'],
     None),
    ('workdir is a file', ['WORKDIR_FILE', f'--config={TOY}'], ['is a file', 'directory'], None),
  ]
  return cases


BAD_INPUT = _bad_input_cases()


def bad_input_trial(base_dir, tmp, name, args, words, env_extra):
  """Run one bad command line against a copy of a trained workdir; a fresh compilation cache
  shows whether anything was compiled."""
  workdir = os.path.join(str(tmp), 'wd')
  if not os.path.exists(workdir):
    shutil.copytree(base_dir, workdir)
  empty = os.path.join(str(tmp), 'empty_tfds')
  os.makedirs(empty, exist_ok=True)
  junk = os.path.join(str(tmp), 'junk.ckpt')
  with open(junk, 'w') as f:
    f.write('not a checkpoint')
  cache = os.path.join(str(tmp), f'cache_{re.sub(r"[^a-z0-9]+", "_", name)}')
  args = [a.replace('JUNK', junk).replace('=EMPTY', f'={empty}') for a in args]
  base = [] if 'WORKDIR_FILE' in args else [f'--workdir={workdir}']
  args = [f'--workdir={os.path.join(workdir, "stdout.txt")}' if a == 'WORKDIR_FILE' else a
          for a in args]
  if not any(a.startswith('--mode') for a in args):
    base.append('--mode=train')
  before = listing(workdir), sorted(os.listdir(workdir)), os.stat(workdir).st_mtime_ns
  t0 = time.time()
  r = run_main(base + args, env_extra, cache=cache, timeout=120)
  seconds = time.time() - t0
  lines = r.stderr.strip().splitlines()
  compiled = [p for p in glob.glob(os.path.join(cache, '**'), recursive=True) if os.path.isfile(p)]
  return {'name': name, 'returncode': r.returncode, 'lines': lines, 'seconds': seconds,
          'words_missing': [w for w in words if not lines or w not in lines[-1]],
          'unchanged': before == (listing(workdir), sorted(os.listdir(workdir)),
                                  os.stat(workdir).st_mtime_ns),
          'compiled': compiled}
