"""main.py CLI: each bad input exits non-zero with one line on stderr naming the problem and the
fix, before anything is compiled or written (the workdir is never created)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG = 'configs/tiny/digits_ddpmpp.py'


def run_main(args, env_extra=None, timeout=120):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(env_extra or {})
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _junk_file(tmp_path):
  p = tmp_path / 'junk.ckpt'
  p.write_text('not a checkpoint')
  return str(p)


# (name, extra args, words the one line must contain, extra env)
BAD = [
  ('missing config', ['--config=configs/nope.py'], ['configs/nope.py', 'does not exist'], None),
  ('unknown override', [f'--config={CONFIG}', '--config.training.foo=1'],
   ['training.foo', 'unknown config field'], None),
  ('unknown sde', [f'--config={CONFIG}', '--config.training.sde=bogus'],
   ["Unknown SDE 'bogus'", '--config.training.sde'], None),
  ('unknown model', [f'--config={CONFIG}', '--config.model.name=bogus'],
   ["Unknown model 'bogus'", '--config.model.name'], None),
  ('unknown dataset', [f'--config={CONFIG}', '--config.data.dataset=BOGUS'],
   ["Unknown dataset 'BOGUS'", '--config.data.dataset'], None),
  ('order 4', [f'--config={CONFIG}', '--config.training.score_matching_order=4'],
   ['score_matching_order is 4', '1, 2 or 3'], None),
  ('order 3 without reduce_mean', [f'--config={CONFIG}', '--config.training.score_matching_order=3',
                                   '--config.training.reduce_mean=False'],
   ['Order-3', 'reduce_mean=True'], None),
  ('batch vs devices', [f'--config={CONFIG}', '--config.training.batch_size=12'],
   ['batch_size=12', 'not divisible by the 8 devices', 'multiple of 8'],
   {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}),
  ('image size', [f'--config={CONFIG}', '--config.data.image_size=15'],
   ['image_size=15', 'divisible by 2'], None),
  ('missing restore_from', [f'--config={CONFIG}', '--config.training.restore_from=/no/such/ckpt'],
   ['/no/such/ckpt', 'does not exist', 'restore_from'], None),
  ('unreadable restore_from', [f'--config={CONFIG}', '--config.training.restore_from=JUNK'],
   ['not a flax msgpack checkpoint', 'restore_from'], None),
  ('missing mode', [f'--config={CONFIG}', '--mode='], ['--mode'], None),
]


@pytest.mark.parametrize('name,args,words,env', BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line(tmp_path, name, args, words, env):
  workdir = tmp_path / 'wd'
  args = [a.replace('JUNK', _junk_file(tmp_path)) for a in args]
  base = [f'--workdir={workdir}']
  if not any(a.startswith('--mode') for a in args):
    base.append('--mode=train')
  r = run_main(base + args, env)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
  assert len(lines) == 1, (name, r.stderr)
  for w in words:
    assert w in lines[0], (name, w, lines[0])
  assert not workdir.exists(), name


def test_workdir_is_a_file(tmp_path):
  f = tmp_path / 'afile'
  f.write_text('x')
  r = run_main([f'--workdir={f}', '--mode=train', f'--config={CONFIG}'])
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and 'is a file' in lines[0], r.stderr
  assert f.read_text() == 'x'
