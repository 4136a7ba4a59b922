"""main.py CLI: each bad input exits non-zero with one line on stderr naming the problem and the
fix, before anything is compiled or written (the workdir is never created)."""
import functools

import pytest

import reliability
from harness import CONFIG
from harness import run_main as _run_main

run_main = functools.partial(_run_main, timeout=120)


def _junk_file(tmp_path):
  p = tmp_path / 'junk.ckpt'
  p.write_text('not a checkpoint')
  return str(p)


# (name, extra args, words the one line must contain, extra env), shared with the reliability table
BAD = reliability.BAD_CLI


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
