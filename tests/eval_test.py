"""run_lib.evaluate / run_lib.fid_stats through the CLI on the tiny trained checkpoint of conftest's
`trained` fixture: the files of an eval run, a SIGKILLed run (mid bits/dim, then mid sampling)
rerun to the identical results of an uninterrupted one, one-line errors before anything is
written, the jitted vs scipy likelihood routes on the trained model, and a score_sde-layout file
of the same weights (eval.restore_from) scored exactly as the checkpoint.

The Inception network is evaluation_test's fake SavedModel (pool_3 = mean pixel @ W) with a 16-d
pool_3 and 10 logits, so that FID's d x d square roots stay cheap; its dataset stats file is made
by --mode fid_stats. Eval sizes: batch 8, two bits/dim batches, two sampling rounds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import config_checks
import evaluation
from configs.tiny.digits_ddpmpp import get_config
from harness import CONFIG, ROOT, SMALL, main_env, ok, run_main
from evaluation_test import _FakeInception
from restore_from_test import foreign_file
from train_test import _raw, _write_legacy

POOL_W = np.random.RandomState(5).randn(3, 16).astype(np.float32)
LOGITS_W = (np.random.RandomState(6).randn(16, 10) / 4).astype(np.float32)
N_LOSS_BATCHES = (1797 // 5) // 8  # DIGITS test split (last 20%) in batches of 8


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  """Fake Inception SavedModel and the DIGITS stats file written by --mode fid_stats."""
  import tensorflow as tf
  root = tmp_path_factory.mktemp('eval_assets')
  module = _FakeInception(POOL_W, LOGITS_W)
  tf.saved_model.save(module, str(root / 'inception'), signatures={'default': module.__call__})
  a = {'inception': str(root / 'inception'), 'stats_dir': str(root / 'stats')}
  ok(run_main([f'--config={CONFIG}', f'--workdir={root / "wd"}', '--mode=fid_stats', *SMALL,
               f'--config.eval.inception_handle={a["inception"]}',
               f'--config.eval.stats_dir={a["stats_dir"]}', '--config.eval.stats_num_images=64',
               '--config.eval.batch_size=8']))
  return a


@pytest.fixture(scope='module')
def workdir(trained, tmp_path_factory):
  """A workdir holding a copy of the trained checkpoints (the shared one stays read-only)."""
  wd = tmp_path_factory.mktemp('eval') / 'wd'
  shutil.copytree(trained / 'checkpoints', wd / 'checkpoints')
  return wd


def eval_args(workdir, folder, assets, extra=()):
  return [f'--config={CONFIG}', f'--workdir={workdir}', '--mode=eval', f'--eval_folder={folder}',
          *SMALL, '--config.eval.batch_size=8', '--config.eval.begin_ckpt=2',
          '--config.eval.end_ckpt=2', '--config.eval.num_bpd_batches=2',
          '--config.eval.num_repeats=1', '--config.eval.enable_loss=True',
          '--config.eval.enable_bpd=True', '--config.eval.enable_sampling=True',
          '--config.eval.num_samples=16', f'--config.eval.inception_handle={assets["inception"]}',
          f'--config.eval.stats_dir={assets["stats_dir"]}', *extra]


@pytest.fixture(scope='module')
def full(workdir, assets):
  """An uninterrupted eval run: loss, bits/dim (2 batches), sampling (2 rounds)."""
  ok(run_main(eval_args(workdir, 'full', assets)))
  return workdir / 'full'


def load(path):
  with np.load(path) as d:
    return {k: d[k] for k in d.files}


def test_eval_writes_results(full, assets):
  ck = full / 'ckpt_2'
  assert sorted(os.listdir(ck / 'bpd')) == ['batch_0_0.npz', 'batch_0_1.npz']
  assert sorted(os.listdir(ck / 'samples')) == ['samples_0.npz', 'samples_1.npz']
  summary = json.loads((ck / 'summary.json').read_text())
  assert summary['ckpt'] == 2 and summary['step'] == 4

  bpds = [load(ck / 'bpd' / f'batch_0_{i}.npz') for i in range(2)]
  for b in bpds:
    assert b['bpd'].shape == (8,) and np.isfinite(b['bpd']).all() and b['nfe'] > 10
  allb = np.concatenate([b['bpd'] for b in bpds])
  assert summary['bpd_n'] == 16
  np.testing.assert_allclose(summary['bpd'], allb.mean(), rtol=1e-6)
  assert 8 < summary['bpd'] < 30  # a 4-step model: finite, far from good

  loss = load(ck / 'loss.npz')
  assert loss['loss'].shape == (N_LOSS_BATCHES,) and np.isfinite(loss['loss']).all()
  np.testing.assert_allclose(summary['eval_loss'], loss['loss'].mean(), rtol=1e-6)

  # Samples: uint8 images and the fake Inception's outputs, checked against its formula.
  rounds = [load(ck / 'samples' / f'samples_{r}.npz') for r in range(2)]
  for d in rounds:
    assert d['samples'].shape == (8, 16, 16, 3) and d['samples'].dtype == np.uint8
    x = (d['samples'].astype(np.float64) - 127.5) / 127.5
    pool = x.mean(axis=(1, 2)) @ POOL_W
    np.testing.assert_allclose(d['pool_3'], pool, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d['logits'], pool @ LOGITS_W, rtol=1e-3, atol=1e-3)
  data_pools = np.load(os.path.join(assets['stats_dir'], 'digits_stats.npz'))['pool_3']
  assert data_pools.shape == (64, 16)
  ref = evaluation.compute_metrics(np.concatenate([d['logits'] for d in rounds]),
                                   np.concatenate([d['pool_3'] for d in rounds]), data_pools)
  for k in ('IS', 'fid', 'kid'):
    np.testing.assert_allclose(summary[k], ref[k], rtol=1e-9)
  assert summary['num_samples'] == 16

  csv = (full / 'summary.csv').read_text().splitlines()
  assert len(csv) == 2 and csv[0].startswith('ckpt,step,') and csv[1].startswith('2,4,')
  log = (full / 'stdout.txt').read_text()
  assert 'ckpt: 2, repeat: 0, batch: 1, mean bpd:' in log and 'ckpt-2 --- step: 4' in log


def _run_until(args, path, timeout=600):
  """Start main.py ARGS; SIGKILL it as soon as `path` exists (it must appear)."""
  proc = subprocess.Popen([sys.executable, 'main.py', *args], cwd=ROOT, env=main_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  start = time.time()
  try:
    while not os.path.exists(path):
      if proc.poll() is not None:
        raise AssertionError(f'run ended (rc {proc.returncode}) before {path}: '
                             f'{proc.stderr.read()[-3000:]}')
      assert time.time() - start < timeout, f'{path} did not appear'
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow
def test_killed_eval_resumes_identically(full, workdir, assets):
  args = eval_args(workdir, 'resumed', assets)
  ck = workdir / 'resumed' / 'ckpt_2'
  _run_until(args, ck / 'bpd' / 'batch_0_0.npz')  # killed mid bits/dim
  assert not (ck / 'bpd' / 'batch_0_1.npz').exists()
  _run_until(args, ck / 'samples' / 'samples_0.npz')  # killed mid sampling
  assert (ck / 'bpd' / 'batch_0_1.npz').exists() and not (ck / 'samples' / 'samples_1.npz').exists()
  assert not (ck / 'summary.json').exists()
  assert not [f for d in ('bpd', 'samples') for f in os.listdir(ck / d) if 'tmp' in f]
  ok(run_main(args))

  ref = full / 'ckpt_2'
  for sub, names in (('bpd', ['batch_0_0.npz', 'batch_0_1.npz']),
                     ('samples', ['samples_0.npz', 'samples_1.npz'])):
    assert sorted(os.listdir(ck / sub)) == names
    for n in names:
      a, b = load(ref / sub / n), load(ck / sub / n)
      for k in a:
        if k != 'seconds':
          np.testing.assert_array_equal(a[k], b[k], err_msg=f'{sub}/{n}:{k}')
  np.testing.assert_array_equal(load(ref / 'loss.npz')['loss'], load(ck / 'loss.npz')['loss'])
  s_ref = json.loads((ref / 'summary.json').read_text())
  s = json.loads((ck / 'summary.json').read_text())
  for k in ('bpd', 'bpd_n', 'nfe', 'eval_loss', 'IS', 'fid', 'kid', 'num_samples'):
    assert s[k] == s_ref[k], k


def test_scipy_route_matches_jitted(full, workdir, assets):
  ok(run_main(eval_args(workdir, 'scipy', assets, [
    '--config.eval.likelihood_solver=scipy', '--config.eval.num_bpd_batches=1',
    '--config.eval.enable_loss=False', '--config.eval.enable_sampling=False'])))
  jax_b = load(full / 'ckpt_2' / 'bpd' / 'batch_0_0.npz')
  sp_b = load(workdir / 'scipy' / 'ckpt_2' / 'bpd' / 'batch_0_0.npz')
  np.testing.assert_allclose(sp_b['bpd'], jax_b['bpd'], atol=0.01)
  assert abs(int(sp_b['nfe']) - int(jax_b['nfe'])) <= 0.1 * int(jax_b['nfe']), (sp_b['nfe'],
                                                                                jax_b['nfe'])
  print(f"jax: bpd {jax_b['bpd'].mean():.5f} nfe {int(jax_b['nfe'])}; scipy: bpd "
        f"{sp_b['bpd'].mean():.5f} nfe {int(sp_b['nfe'])} ({float(sp_b['seconds']):.1f} s)")


def _released(path, step_dir, ema=True):
  """A score_sde State msgpack at path (GroupNorm (1, 1, 1, C), flax.optim target) of step_dir's
  weights: its params and EMA, or with ema=False its params as params_ema too."""
  src = _raw(step_dir)
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_legacy(path, src['params'], src['params_ema'] if ema else src['params'], int(src['step']))
  return path


def test_released_file_scores_as_the_checkpoint(full, workdir, assets, tmp_path):
  """checkpoint_2's weights as a score_sde file named checkpoint_2 (its noise is checkpoint 2's),
  scored into a new workdir: loss, every bits/dim batch, the samples and IS/FID/KID of `full`,
  exactly; begin_ckpt / end_ckpt are ignored."""
  path = _released(tmp_path / 'released' / 'checkpoint_2', workdir / 'checkpoints' / 'checkpoint_2')
  wd = tmp_path / 'runs' / 'released'
  ok(run_main(eval_args(wd, 'eval', assets, [f'--config.eval.restore_from={path}'])))
  got, ref = wd / 'eval' / 'checkpoint_2', full / 'ckpt_2'
  files = ['loss.npz', 'bpd/batch_0_0.npz', 'bpd/batch_0_1.npz', 'samples/samples_0.npz',
           'samples/samples_1.npz']
  for f in files:
    a, b = load(got / f), load(ref / f)
    assert set(a) == set(b), f
    for k in set(a) - {'seconds'}:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{f}: {k}')
  s, s_ref = (json.loads((d / 'summary.json').read_text()) for d in (got, ref))
  for k in ('ckpt', 'step', 'bpd', 'bpd_n', 'nfe', 'eval_loss', 'IS', 'fid', 'kid', 'num_samples'):
    assert s[k] == s_ref[k], k
  assert s['restore_from'] == (got / 'source.txt').read_text().strip() == os.path.realpath(path)
  assert sorted(os.listdir(wd / 'eval')) == ['checkpoint_2', 'settings.json', 'stdout.txt',
                                             'summary.csv']
  assert 'Loaded legacy flax msgpack' in (wd / 'eval' / 'stdout.txt').read_text()


def test_released_file_scores_its_params_ema(workdir, tmp_path):
  """Two files that differ only in params_ema give different eval losses; a second file of the
  same name is refused in one line where the first one's results are."""
  step_dir = workdir / 'checkpoints' / 'checkpoint_2'
  ema = _released(tmp_path / 'a' / 'checkpoint_2', step_dir)
  raw = _released(tmp_path / 'b' / 'checkpoint_2', step_dir, ema=False)
  wd = tmp_path / 'wd'

  def score(path, folder):
    return run_main([f'--config={CONFIG}', f'--workdir={wd}', '--mode=eval', *SMALL,
                     f'--eval_folder={folder}', '--config.eval.batch_size=8',
                     '--config.eval.enable_loss=True', '--config.eval.enable_bpd=False',
                     '--config.eval.enable_sampling=False', f'--config.eval.restore_from={path}'])

  ok(score(ema, 'eval'))
  import eval_lib
  with pytest.raises(ValueError, match=r'checkpoint_2 holds the results of .*/a/checkpoint_2, not '
                     r'of .*/b/checkpoint_2: pass another --eval_folder'):
    eval_lib.check_restore_from(_config(restore_from=str(raw)), str(wd), 'eval')
  ok(score(raw, 'eval_raw'))
  losses = [json.loads((wd / f / 'checkpoint_2' / 'summary.json').read_text())['eval_loss']
            for f in ('eval', 'eval_raw')]
  assert np.isfinite(losses).all() and losses[0] != losses[1], losses


def test_damaged_file_refused_before_any_work(tmp_path):
  path = tmp_path / 'checkpoint_26'
  foreign_file(path, 'truncated')
  wd = tmp_path / 'wd'
  r = run_main([f'--config={CONFIG}', f'--workdir={wd}', '--mode=eval', *SMALL,
                f'--config.eval.restore_from={path}'])
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert 'cannot be read as flax msgpack' in lines[0] and '--config.eval.restore_from' in lines[0]
  assert not wd.exists()


BAD = [
  ('missing stats', ['--config.eval.stats_dir=NOSTATS'],
   ['Inception stats file', 'digits_stats.npz', '--mode fid_stats']),
  ('missing checkpoint', ['--config.eval.begin_ckpt=7', '--config.eval.end_ckpt=7',
                          '--config.eval.enable_sampling=False'],
   ['checkpoint_7 not found', 'checkpoint_1, checkpoint_2', 'wait_for_ckpt']),
  ('unknown sampler', ['--config.sampling.method=bogus'],
   ["Unknown sampler 'bogus'", 'config.sampling.method']),
]


@pytest.mark.parametrize('name,extra,words', BAD, ids=[b[0] for b in BAD])
def test_bad_eval_input_one_line(workdir, assets, tmp_path, name, extra, words):
  extra = [a.replace('NOSTATS', str(tmp_path / 'nostats')) for a in extra]
  r = run_main(eval_args(workdir, 'bad', assets, extra))
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, (name, r.returncode, r.stderr[-2000:])
  for w in words:
    assert w in lines[0], (name, w, lines[0])
  assert not (workdir / 'bad').exists()


def _config(workdir_assets=None, **eval_fields):
  config = get_config()
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.eval.batch_size = 8
  for k, v in eval_fields.items():
    setattr(config.eval, k, v)
  if workdir_assets:
    config.eval.inception_handle = workdir_assets['inception']
    config.eval.stats_dir = workdir_assets['stats_dir']
  return config


def test_eval_config_checks(workdir, assets):
  wd = str(workdir)
  cases = [
    (dict(enable_sampling=True), ('sampling', 'predictor', 'nope'), "Unknown predictor 'nope'"),
    (dict(enable_sampling=True), ('sampling', 'corrector', 'nope'), "Unknown corrector 'nope'"),
    (dict(bpd_dataset='val'), None, "'train' or 'test'"),
    (dict(likelihood_solver='rk4'), None, "Unknown likelihood solver 'rk4'"),
    (dict(begin_ckpt=2, end_ckpt=1), None, 'end_ckpt=1 is below'),
    (dict(enable_sampling=True, inception_handle='/no/inception'), None, '/no/inception'),
  ]
  for fields, other, words in cases:
    config = _config(assets, **fields)
    if 'inception_handle' in fields:
      config.eval.inception_handle = fields['inception_handle']
    if other:
      setattr(config[other[0]], other[1], other[2])
    with pytest.raises(ValueError, match=words.replace('(', r'\(')):
      config_checks.validate_config(config, 'eval', wd)
  config_checks.validate_config(_config(assets, enable_sampling=True, begin_ckpt=1, end_ckpt=2),
                                'eval', wd)
  # A missing checkpoint is fine when waiting for it.
  config_checks.validate_config(_config(begin_ckpt=5, end_ckpt=5, wait_for_ckpt=True), 'eval', wd)
  # fid_stats never silently replaces a stats file.
  with pytest.raises(ValueError, match='already exists.*overwrite_stats=True'):
    config_checks.validate_config(_config(assets), 'fid_stats', wd)
  config_checks.validate_config(_config(assets, overwrite_stats=True), 'fid_stats', wd)


def test_wait_for_checkpoint(trained, tmp_path):
  """eval.wait_for_ckpt: the run waits for checkpoint_3, evaluates it once it is renamed into
  place (as orbax does); without it appearing the wait ends with a one-line error."""
  workdir = tmp_path / 'wd'
  shutil.copytree(trained / 'checkpoints', workdir / 'checkpoints')
  args = [f'--config={CONFIG}', f'--workdir={workdir}', '--mode=eval', '--eval_folder=waited',
          *SMALL, '--config.eval.batch_size=8', '--config.eval.begin_ckpt=3',
          '--config.eval.end_ckpt=3', '--config.eval.enable_bpd=False',
          '--config.eval.enable_loss=False', '--config.eval.wait_for_ckpt=True',
          '--config.eval.wait_poll=0.2', '--config.eval.wait_timeout=300']
  proc = subprocess.Popen([sys.executable, 'main.py', *args], cwd=ROOT, env=main_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  log = workdir / 'waited' / 'stdout.txt'
  try:
    deadline = time.time() + 300
    while not (log.exists() and 'Waiting for' in log.read_text()):
      assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
      time.sleep(0.1)
    shutil.copytree(workdir / 'checkpoints' / 'checkpoint_2', workdir / 'checkpoints' / 'tmp_3')
    os.rename(workdir / 'checkpoints' / 'tmp_3', workdir / 'checkpoints' / 'checkpoint_3')
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    proc.stderr.close()
  summary = json.loads((workdir / 'waited' / 'ckpt_3' / 'summary.json').read_text())
  assert summary['ckpt'] == 3 and summary['step'] == 4

  import run_lib
  config = _config(begin_ckpt=9, end_ckpt=9, wait_for_ckpt=True, wait_timeout=0.3, wait_poll=0.1,
                   enable_bpd=False, enable_loss=False)
  with pytest.raises(FileNotFoundError, match='checkpoint_9 did not appear within'):
    run_lib.evaluate(config, str(workdir), 'wait_timeout')


def test_toy_batch_part_reports_nats():
  """Flat toy data: the bits/dim part also returns the NLL in nats (bpd = nll / (dim ln 2), no
  8-bit offset), the data are not dequantized, and the divergence is exact (no Hutchinson probe:
  the NLL does not depend on the key)."""
  import jax
  import datasets
  import dequantizers
  import eval_batches
  import run_lib
  import sde_lib
  import toy_data
  from configs.toy import checkerboard_vp
  config = checkerboard_vp.get_config()
  config.eval.rtol = config.eval.atol = 1e-3
  sde, _ = sde_lib.get_sde(config)
  model, _, state = run_lib.build_state(config, jax.random.PRNGKey(0))
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  (part,) = eval_batches.get_batch_parts(config, sde, model, inverse_scaler)
  x = np.asarray(toy_data.sample_toy('CHECKERBOARD', 0, 4), np.float32)
  deq_x, corr = dequantizers.get_dequantize_fn(config, '.', 'deq')(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(deq_x, x)
  out = part.fn(jax.random.PRNGKey(2), state.params_ema, state.model_state,
                {'image': deq_x, 'deq_bpd': corr})
  assert set(out) == {'bpd', 'nll', 'nfe'} and int(out['nfe']) > 0
  assert np.isfinite(out['nll']).all()
  np.testing.assert_allclose(out['bpd'], np.asarray(out['nll']) / (2 * np.log(2.)), rtol=1e-5)
  again = part.fn(jax.random.PRNGKey(3), state.params_ema, state.model_state,
                  {'image': deq_x, 'deq_bpd': corr})
  np.testing.assert_array_equal(again['nll'], out['nll'])


def test_toy_eval_with_ode_score(tmp_path):
  """--mode eval on a toy MLP checkpoint: NLL in nats per batch, and the ScoreODE score gap
  (eval.enable_ode_score) stored per batch, then as ckpt_N/ode_score.{npz,csv} (one row per time)
  and in the summary."""
  import json
  import run_lib
  from configs.toy import mog1d_ve
  config = mog1d_ve.get_config()
  t = config.training
  t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption = 64, 2, 2, 2
  t.eval_freq, t.log_freq, t.snapshot_sampling = 2, 1, False
  config.model.encoder_layers, config.model.decoder_layers = (16,), (16,)
  config.model.temb_dim = 8
  run_lib.train(config, str(tmp_path))
  e = config.eval
  e.batch_size, e.num_bpd_batches, e.num_repeats = 32, 2, 1
  e.enable_loss, e.enable_ode_score, e.ode_score_nt = False, True, 4
  e.rtol = e.atol = 1e-3
  run_lib.evaluate(config, str(tmp_path), 'eval')
  ckpt_dir = tmp_path / 'eval' / 'ckpt_1'
  assert sorted(os.listdir(ckpt_dir / 'ode_score')) == ['batch_0_0.npz', 'batch_0_1.npz']
  rows = (ckpt_dir / 'ode_score.csv').read_text().splitlines()
  assert rows[0].startswith('ts,gap,') and len(rows) == 5
  table = np.loadtxt(ckpt_dir / 'ode_score.csv', delimiter=',', skiprows=1)
  assert np.all(np.isfinite(table)) and np.all(table[:, 1] >= 0)
  per_batch = [np.load(ckpt_dir / 'ode_score' / f)['gap'] for f in ('batch_0_0.npz',
                                                                    'batch_0_1.npz')]
  np.testing.assert_allclose(table[:, 1], np.mean(per_batch, axis=0), rtol=1e-6)
  summary = json.loads((ckpt_dir / 'summary.json').read_text())
  np.testing.assert_allclose(summary['ode_score_gap'], table[:, 1].mean(), rtol=1e-6)
  assert summary['nll_n'] == 64 and np.isfinite(summary['nll'])
