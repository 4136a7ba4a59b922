"""run_lib.train through the CLI (python main.py ... --mode train) on the tiny DIGITS DDPM++ config.

To keep compile time small on a 2-core CPU, the tests shrink the U-Net to one resolution level
without attention (harness.SMALL) and share a persistent JAX compilation cache between their
subprocesses, so one trained workdir (conftest's `trained` fixture, shared with eval_test.py) and
the runs that reuse its program (resume, fine-tune, non-finite stop) compile once.
"""
import glob
import os
import re
import shutil

import flax
import jax
import numpy as np
import pytest
from PIL import Image

import checkpoints
from harness import ok as _ok
from harness import run_main, toy_args, train_args
from restore_from_test import STEP, foreign_file


def logged_losses(text, kind='training'):
  """{step: (loss, loss1, loss2, loss3)} from the console / stdout.txt log lines."""
  out = {}
  pat = (rf'step: (\d+), {kind}_loss: (\S+), {kind}_loss1: (\S+), {kind}_loss2: (\S+), '
         rf'{kind}_loss3: ([-+.\deE]+)')
  for m in re.finditer(pat, text):
    out[int(m.group(1))] = tuple(float(m.group(i).rstrip(',')) for i in range(2, 6))
  return out


def _sharding():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _raw(step_dir):
  return jax.tree_util.tree_map(np.asarray, checkpoints.restore_raw(str(step_dir), _sharding()))


def test_order1_writes_checkpoints_tensorboard_samples(trained):
  log = (trained / 'stdout.txt').read_text()
  losses = logged_losses(log)
  assert sorted(losses) == [1, 2, 3, 4]
  assert all(np.isfinite(v).all() and v[2] == v[3] == 0. for v in losses.values())
  assert sorted(logged_losses(log, 'eval')) == [2, 4]
  assert sorted(os.listdir(trained / 'checkpoints')) == ['checkpoint_1', 'checkpoint_2']
  assert sorted(os.listdir(trained / 'checkpoints-meta')) == ['checkpoint_2']  # latest only
  assert int(_raw(trained / 'checkpoints' / 'checkpoint_2')['step']) == 4
  assert int(_raw(trained / 'checkpoints' / 'checkpoint_1')['step']) == 2

  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(str(trained / 'tensorboard'), size_guidance={'tensors': 0})
  acc.Reload()
  tags = set(acc.Tags()['tensors'])
  assert {'training_loss', 'training_loss1', 'training_loss2', 'training_loss3', 'eval_loss'} <= tags
  tb = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors('training_loss')}
  assert sorted(tb) == [1, 2, 3, 4]
  np.testing.assert_allclose([tb[s] for s in range(1, 5)], [losses[s][0] for s in range(1, 5)],
                             rtol=1e-5)

  for step in (2, 4):
    d = trained / 'samples' / f'iter_{step}'
    png = Image.open(d / 'sample.png')
    assert png.size == (4 * 18 + 2, 4 * 18 + 2)  # 16 samples of 16x16, 4 per row, 2 px padding
    sample = np.load(d / 'sample.npz')['samples']
    assert sample.shape == (16, 16, 16, 3) and np.isfinite(sample).all()


@pytest.mark.slow
def test_third_order_trains(tmp_path):
  """Order 3 through the CLI logs its three DSM terms (the order-2 loss is its first two; each
  order's loss against autodiff: losses_test.py)."""
  workdir = tmp_path / 'wd'
  # Snapshot sampling does not depend on the order (the order-1 runs above check it).
  _ok(run_main(train_args(workdir, n_iters=1, order=3, freq=1, eval_freq=1000, sampling=False)))
  loss, l1, l2, l3 = logged_losses((workdir / 'stdout.txt').read_text())[1]
  assert np.isfinite([loss, l1, l2, l3]).all() and l2 > 0 and l3 > 0
  np.testing.assert_allclose(loss, l1 + l2 + l3, rtol=1e-4)
  assert os.listdir(workdir / 'checkpoints') == ['checkpoint_1']


@pytest.mark.slow
def test_rerun_resumes_from_checkpoints_meta(trained, tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(trained, workdir)
  # Interrupted after the pre-emption save of step 4, before the periodic one.
  shutil.rmtree(workdir / 'checkpoints' / 'checkpoint_2')
  before = (workdir / 'stdout.txt').read_text()
  r = _ok(run_main(train_args(workdir, n_iters=6, sampling=False)))
  after = (workdir / 'stdout.txt').read_text()[len(before):]
  meta = os.path.join(str(workdir), 'checkpoints-meta', 'checkpoint_2')
  assert f'Resuming training from {meta} at step 4.' in after, r.stderr[-3000:]
  assert sorted(logged_losses(after)) == [5, 6]
  assert sorted(os.listdir(workdir / 'checkpoints-meta')) == ['checkpoint_3']
  assert int(_raw(workdir / 'checkpoints' / 'checkpoint_3')['step']) == 6


def test_damaged_meta_checkpoint_falls_back(trained, tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(trained, workdir)
  for f in glob.glob(str(workdir / 'checkpoints-meta' / 'checkpoint_2' / 'state' / '**' / 'd' / '*'),
                     recursive=True):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)
  _ok(run_main(train_args(workdir, n_iters=4, sampling=False)))
  log = (workdir / 'stdout.txt').read_text()
  bad = os.path.join(str(workdir), 'checkpoints-meta', 'checkpoint_2')
  good = os.path.join(str(workdir), 'checkpoints', 'checkpoint_2')
  assert re.search(rf'Checkpoint {re.escape(bad)} is corrupted or truncated .*falling back', log)
  assert f'Resuming training from {good} at step 4.' in log


def _write_legacy(path, params, params_ema, step, nan=False):
  """A score_sde/score_flow State msgpack: optimizer.target, GroupNorm scale/bias (1, 1, 1, C)."""

  def legacy(tree):
    def fix(kp, v):
      v = np.array(v)
      if 'GroupNorm' in jax.tree_util.keystr(kp) and v.ndim == 1:
        v = v.reshape(1, 1, 1, -1)
      return v
    return jax.tree_util.tree_map_with_path(fix, tree)

  target = legacy(params)
  if nan:
    leaf = target['Conv_0']['kernel']
    leaf[...] = np.nan
  state = {
    'step': np.asarray(step),
    'optimizer': {'target': target, 'state': {'step': np.asarray(step), 'param_states': {}}},
    'lr': np.float32(2e-4),
    'model_state': {},
    'ema_rate': np.float32(0.9999),
    'params_ema': legacy(params_ema),
    'rng': np.zeros(2, np.uint32),
  }
  path.write_bytes(flax.serialization.msgpack_serialize(state))


def test_restore_from_legacy_checkpoint(trained, tmp_path):
  src = _raw(trained / 'checkpoints' / 'checkpoint_2')
  legacy = tmp_path / 'checkpoint_26'
  _write_legacy(legacy, src['params'], src['params_ema'], step=int(src['step']))
  assert flax.serialization.msgpack_restore(legacy.read_bytes())['optimizer']['target'][
    'GroupNorm_0']['scale'].ndim == 4
  workdir = tmp_path / 'wd'
  _ok(run_main(train_args(workdir, n_iters=1, freq=1, eval_freq=1000, sampling=False,
                          extra=[f'--config.training.restore_from={legacy}',
                                 '--config.training.restore_optimizer=False'])))
  log = (workdir / 'stdout.txt').read_text()
  n_arrays = len(jax.tree_util.tree_leaves(src['params']))
  m = re.search(r'Fine-tuning: Loaded legacy flax msgpack (\S+) \(trained (\d+) steps\): params '
                r'\((\d+) arrays, ([\d,]+) values\), params_ema, model_state \(0 arrays\); '
                r'(\d+) GroupNorm arrays per tree reshaped', log)
  assert m, log
  assert m.group(1) == str(legacy) and int(m.group(2)) == 4 and int(m.group(3)) == n_arrays
  n_gn = sum('GroupNorm' in jax.tree_util.keystr(kp)
             for kp, _ in jax.tree_util.tree_flatten_with_path(src['params'])[0])
  assert int(m.group(5)) == n_gn > 0
  assert sorted(logged_losses(log)) == [1]  # step 0 -> 1: a fresh step count
  out = _raw(workdir / 'checkpoints' / 'checkpoint_1')
  assert int(out['step']) == 1
  # The first update has lr 0 (warmup), so the params are exactly the loaded ones, and the EMA
  # moved from the loaded EMA: ema = rate * loaded_ema + (1 - rate) * params.
  jax.tree_util.tree_map(np.testing.assert_array_equal, out['params'], src['params'])
  rate = 0.99
  jax.tree_util.tree_map(
    lambda e, le, p: np.testing.assert_allclose(e, rate * le + (1 - rate) * p, rtol=1e-5, atol=1e-7),
    out['params_ema'], src['params_ema'], out['params'])
  # Fresh optimiser: Adam's step count is 1 after one update.
  counts = [v for k, v in checkpoints.flatten(out['opt_state']).items() if k.endswith('count')]
  assert counts and all(int(c) == 1 for c in counts)


def test_nonfinite_stops_with_exit_3_and_no_checkpoint(trained, tmp_path):
  src = _raw(trained / 'checkpoints' / 'checkpoint_2')
  legacy = tmp_path / 'nan.msgpack'
  _write_legacy(legacy, src['params'], src['params_ema'], step=4, nan=True)
  workdir = tmp_path / 'wd'
  r = run_main(train_args(workdir, n_iters=2, freq=1, eval_freq=1000, sampling=False,
                          extra=[f'--config.training.restore_from={legacy}',
                                 '--config.training.restore_optimizer=False']))
  assert r.returncode == 3, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('main.py: error: Non-finite loss at step 1 '), last
  assert "training.nonfinite='skip'" in last
  assert 'Non-finite loss at step 1' in (workdir / 'stdout.txt').read_text()
  assert not os.listdir(workdir / 'checkpoints') and not os.listdir(workdir / 'checkpoints-meta')


@pytest.mark.slow
def test_eight_devices_same_losses(trained, tmp_path):
  """The same global batches on 8 simulated CPU devices, each device's 2 rows split into 2
  microbatches (training.n_microbatches), give the 1-device whole-batch loss trajectory."""
  workdir = tmp_path / 'wd'
  _ok(run_main(train_args(workdir, n_iters=3, eval_freq=1000, sampling=False,
                          extra=['--config.training.n_microbatches=2']),
               env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}))
  log8 = (workdir / 'stdout.txt').read_text()
  assert '(8 devices, 1 process' in log8
  one = logged_losses((trained / 'stdout.txt').read_text())
  eight = logged_losses(log8)
  assert sorted(eight) == [1, 2, 3]
  for s in (1, 2, 3):
    np.testing.assert_allclose(eight[s], one[s], rtol=1e-4, atol=1e-7)



def test_cli_refuses_a_foreign_start_before_any_work(tmp_path):
  path = tmp_path / 'checkpoint_26'
  foreign_file(path, 'wrong config')
  workdir = tmp_path / 'wd'
  r = run_main(train_args(workdir, n_iters=STEP + 2, extra=[
    f'--config.training.restore_from={path}']))
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert 'do not match the model' in lines[0] and 'vs model (32,)' in lines[0], lines[0]
  assert not workdir.exists()


def test_toy_run_never_imports_tensorflow(tmp_path):
  """TensorFlow (seconds of start-up) is for image data and Inception; a toy run skips it."""
  program = ('import runpy, sys; sys.argv[0] = "main.py"\n'
             'try:\n  runpy.run_path("main.py", run_name="__main__")\n'
             'finally:\n  print("tensorflow imported:", "tensorflow" in sys.modules)')
  r = _ok(run_main(toy_args(tmp_path / 'wd', n_iters=2), program=program))
  assert 'tensorflow imported: False' in r.stdout, r.stdout[-2000:]
  assert (tmp_path / 'wd' / 'checkpoints' / 'checkpoint_1').is_dir()
