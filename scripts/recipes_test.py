"""The paper's recipes (recipes.py) cannot rot: docs/recipes.md's `recipes` section is the
generated one; every command of every row parses with the CLI's own flags, asks for what its row
says (order, batch, start checkpoint, the checkpoint the fine-tune writes last or the released one
itself, the eval switches) and passes the config checks at tiny sizes; and each distinct command
shape runs, at tiny sizes, in one process (this file as a script, sharing the tests' compilation
cache) on mocked TFDS data, starting from a synthetic flax.optim checkpoint with the tiny model's
param tree.

Tiny sizes change only the keys in TINY (model width and depth, batches, steps, tolerances,
repeats, the fake Inception): the flags that select what is computed pass through unchanged.
"""
import contextlib
import json
import os
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest

# As a script (the tiny runs) this file imports the product from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs
import doc_sections
import recipes

STEP = 2  # the synthetic start checkpoint's step; the tiny fine-tune runs one step past it
TINY_CKPT = recipes.last_checkpoint(STEP + 1, 1)
TINY = {
  'config.model.nf': '16', 'config.model.ch_mult': '(1,)', 'config.model.num_res_blocks': '1',
  'config.model.attn_resolutions': '()', 'config.training.batch_size': '8',
  'config.training.n_iters': str(STEP + 1), 'config.training.snapshot_freq': '1',
  'config.training.snapshot_freq_for_preemption': '1', 'config.training.log_freq': '1',
  'config.training.eval_freq': '1000', 'config.training.n_jitted_steps': '1',
  'config.training.snapshot_sampling': 'False',
  'config.eval.batch_size': '8', 'config.eval.num_bpd_batches': '1',
  'config.eval.num_repeats': '1', 'config.eval.rtol': '1e-3', 'config.eval.atol': '1e-3',
  'config.eval.bound_num_times': '4', 'config.eval.num_samples': '8',
  'config.eval.stats_num_images': '16', 'config.sampling.rtol': '1e-3',
  'config.sampling.atol': '1e-3', 'config.deq.model': 'tiny', 'config.deq.n_iters': '1',
  'config.deq.warmup': '1', 'config.eval.begin_ckpt': str(TINY_CKPT),
  'config.eval.end_ckpt': str(TINY_CKPT), 'config.eval.ckpt_id': str(TINY_CKPT)}
PATHS = ('workdir', 'config.training.restore_from', 'config.eval.inception_handle',
         'config.eval.stats_dir', 'config.eval.restore_from')  # replaced by the test's own files
GIVEN_ONLY = ('config.eval.restore_from',)  # replaced where a command gives it, never added


def split(argv):
  """{flag: value} of a recipe command ('python main.py' dropped; every flag is --name=value)."""
  assert argv[:2] == ['python', 'main.py'], argv
  out = {}
  for a in argv[2:]:
    assert a.startswith('--') and '=' in a, a
    k, v = a[2:].split('=', 1)
    assert k not in out, f'--{k} given twice'
    out[k] = v
  return out


def tiny(argv, paths):
  """The command at tiny sizes: TINY and `paths` (for PATHS) replace or add those flags only
  (GIVEN_ONLY's: replace only)."""
  flags = split(argv)
  flags.update({k: v for k, v in TINY.items()})
  flags.update({k: v for k, v in paths.items() if k not in GIVEN_ONLY or k in flags})
  return ['--' + k + '=' + v for k, v in flags.items()]


def parse(args):
  """(config, flags) as main.py parses `args` (its flags on a fresh absl FlagValues)."""
  from absl import flags
  import main
  fv = flags.FlagValues()
  main.define_flags(fv, ['main.py', *args])
  fv(['main.py', *args])
  return fv.config, fv


@contextlib.contextmanager
def mocked_tfds():
  """TFDS builders report themselves prepared and yield 16 random 32x32 uint8 images."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  import datasets

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    images = np.random.RandomState(0).randint(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': np.zeros(16, np.int64)})
  with tfds.testing.mock_data(num_examples=16, as_dataset_fn=as_dataset), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True), \
      mock.patch.object(datasets, 'SHUFFLE_BUFFER_SIZE', 8):
    yield


# ------------------------------------------------------------------------------------------------
# Every row: docs/recipes.md is generated, the commands parse and say what the row says
# ------------------------------------------------------------------------------------------------

def test_doc_section_is_the_generated_one():
  assert doc_sections.read_section(recipes.DOC, recipes.SECTION) == recipes.markdown(), (
    'docs/recipes.md differs from recipes.py: run python scripts/recipes.py --write')


# The paper's published CIFAR-10 results (Lu et al., ICML 2022; VE, second / third order).
PUBLISHED = '3.44 / 3.38 bits/dim, FID 2.37 / 2.95'


def test_paper_numbers_are_the_published_ones():
  """Every paper number in a row is one of the paper's published results."""
  numbers = {r.paper for r in recipes.rows()} - {recipes.NOT_HELD}
  assert numbers and all(n in PUBLISHED for n in numbers), (numbers, PUBLISHED)


@pytest.fixture(scope='module')
def fakes(tmp_path_factory):
  """A placeholder start file, Inception folder and stats files: what the config checks look at."""
  root = tmp_path_factory.mktemp('recipe_checks')
  (root / 'inception').mkdir()
  (root / 'stats').mkdir()
  for name in ('cifar10', 'imagenet32'):
    (root / 'stats' / f'{name}_stats.npz').write_bytes(b'')
  (root / 'start').write_bytes(b'\x80')  # an empty msgpack map: check_readable accepts it
  return {'config.training.restore_from': str(root / 'start'),
          'config.eval.restore_from': str(root / 'start'),
          'config.eval.inception_handle': str(root / 'inception'),
          'config.eval.stats_dir': str(root / 'stats'), 'workdir': str(root / 'wd')}


def test_every_command_parses_says_its_row_and_passes_the_checks(fakes):
  import config_checks
  import deq_lib
  from models import flowpp
  rows = recipes.rows()
  assert len(rows) == 3 * (4 + 4 + 3)  # 3 orders x (VP, VE CIFAR-10: 4 results; ImageNet: 3)
  with mocked_tfds():
    for row in rows:
      full = configs.load(row.exp.config)
      last = recipes.last_checkpoint(full.training.n_iters, full.training.snapshot_freq)
      n_released = 0
      for label, argv in row.commands:
        config, fv = parse(argv[2:])
        assert fv.mode == label
        released = fv.workdir == recipes.released_workdir(row.exp)
        # The released checkpoint itself is scored in order 1's rows, from the start file.
        assert config.eval.restore_from == (row.exp.start if released else '')
        n_released += released
        if label == 'train':
          t = config.training
          assert (t.score_matching_order, t.batch_size, t.restore_from) == (
            row.order, recipes.BATCH[row.order], row.exp.start)
          # The config ships mle_score_ode's order-3 batch and the run length it trained to.
          assert recipes.BATCH[3] == full.training.batch_size
          assert t.n_iters == full.training.n_iters
          assert row.exp.start_step is None or row.exp.start_step < t.n_iters
        if label == 'eval':
          e = config.eval
          assert released or e.begin_ckpt == e.end_ckpt == last
          assert (e.enable_bpd, e.bound, e.dequantizer, e.enable_sampling) == {
            'bpd': (True, False, False, False), 'bound': (True, True, False, False),
            'bpd_deq': (True, False, True, False), 'fid': (False, False, False, True)}[row.result]
          assert e.enable_sampling or e.num_repeats == full.eval.num_repeats
        if label == 'train_deq':  # the Flow++ score_flow built for the dataset ('auto')
          assert (released or config.eval.ckpt_id == last) and fv.deq_folder == 'deq'
          deq_lib.check_config(config)
          assert flowpp.model_name(config) == {'CIFAR10': 'cifar10',
                                               'ImageNet': 'imagenet32'}[config.data.dataset]
        if row.result == 'bpd_deq' and label == 'eval':
          assert fv.deq_folder == 'deq'
        if fv.workdir != 'runs/paper/fid_stats' and not released:
          assert fv.workdir == recipes.workdir(row.exp, row.order)
        paths = dict(fakes, **({'config.eval.stats_dir': fakes['workdir']}
                               if label == 'fid_stats' else {}))  # fid_stats refuses to overwrite
        config, fv = parse(tiny(argv, paths))
        config_checks.validate_config(config, fv.mode, None)
      assert (n_released > 0) == (row.order == 1), (row.exp.key, row.order, row.result)


# ------------------------------------------------------------------------------------------------
# Each distinct command shape runs at tiny sizes
# ------------------------------------------------------------------------------------------------

def _start_file(path, argv):
  """A flax.optim msgpack at path with the param tree of argv's tiny model (small random
  weights, random Adam moments, step STEP), written as restore_from_test writes score_sde's
  State."""
  import jax
  import train_lib
  from restore_from_test import write_flax_optim
  config, _ = parse(argv)
  state = jax.eval_shape(lambda r: train_lib.build_state(config, r)[2], jax.random.PRNGKey(0))
  r = np.random.RandomState(1)
  params = jax.tree_util.tree_map(
    lambda x: (0.05 * r.randn(*x.shape)).astype(x.dtype), state.params)
  write_flax_optim(path, params, 3, step=STEP)


def _fake_inception(path):
  """evaluation_test's fake Inception SavedModel (16-d pool_3, 10 logits) at path."""
  import tensorflow as tf
  from evaluation_test import _FakeInception
  module = _FakeInception(np.random.RandomState(5).randn(3, 16).astype(np.float32),
                          (np.random.RandomState(6).randn(16, 10) / 4).astype(np.float32))
  tf.saved_model.save(module, str(path), signatures={'default': module.__call__})


# What runs (the 60 s this file may add to a cold suite allow no more): the fine-tune, bits/dim,
# the bound, fid_stats and FID of the VE CIFAR-10 row of order RUN_ORDER, and the bits/dim of the
# released checkpoint itself (RUN_RELEASED: its other evals differ from the fine-tuned ones in
# --config.eval.restore_from only); the other rows differ from these in the order (the
# fine-tune's compiled step: tests/train_test.py trains orders 2 and 3), the config or the workdir
# only (checked above). The dequantizer rows' train_deq + eval shape is the one tests/deq_test.py
# runs through the CLI; here their commands are parsed and checked only.
RUN_EXPERIMENT, RUN_ORDER = 'cifar10_ve', 1
RUN_RESULTS = ('bpd', 'bound', 'fid')
RUN_RELEASED = ('bpd',)


def plan(tmp_path):
  """The tiny argument lists run_shapes runs, in order (the fine-tune once, fid_stats once)."""
  rows = {r.result: r for r in recipes.rows()
          if (r.exp.key, r.order) == (RUN_EXPERIMENT, RUN_ORDER) and r.result in RUN_RESULTS}
  start = str(tmp_path / 'start' / 'checkpoint_26')
  paths = {'workdir': str(tmp_path / 'wd'), 'config.training.restore_from': start,
           'config.eval.restore_from': start,
           'config.eval.inception_handle': str(tmp_path / 'inception'),
           'config.eval.stats_dir': str(tmp_path / 'stats')}
  out = []
  for result in RUN_RESULTS:
    for label, argv in rows[result].commands:
      released = split(argv)['workdir'] == recipes.released_workdir(rows[result].exp)
      if released and result not in RUN_RELEASED:
        continue
      args = tiny(argv, dict(paths, workdir=str(tmp_path / 'released')) if released else paths)
      if args not in out:
        out.append(args)
  return out


@pytest.mark.slow
def test_command_shapes_run_at_tiny_size(tmp_path):
  """One process runs the plan; each command exits 0 and leaves what its row reads."""
  import checkpoints
  from harness import ROOT, main_env
  args = plan(tmp_path)
  (tmp_path / 'start').mkdir()
  _start_file(tmp_path / 'start' / 'checkpoint_26', args[0])
  _fake_inception(tmp_path / 'inception')
  with open(tmp_path / 'plan.json', 'w') as f:
    json.dump(args, f)
  r = subprocess.run([sys.executable, __file__, str(tmp_path / 'plan.json')], cwd=ROOT,
                     env=main_env(), capture_output=True, text=True, timeout=900)
  done = [json.loads(row) for row in r.stdout.splitlines() if row.startswith('{')]
  for d in done:
    print(f"{d['seconds']:6.1f} s  {' '.join(a for a in d['args'] if 'mode' in a or 'folder' in a)}")
  assert len(done) == len(args) and all(d['code'] == 0 for d in done), (
    [d for d in done if d['code']], r.stderr[-3000:])
  wd = tmp_path / 'wd'
  summary = lambda folder: json.load(open(wd / folder / f'ckpt_{TINY_CKPT}' / 'summary.json'))
  assert (wd / 'checkpoints' / f'checkpoint_{TINY_CKPT}').is_dir()
  _, meta = checkpoints.read_metadata(wd / 'checkpoints' / f'checkpoint_{TINY_CKPT}')
  assert meta['step'] == STEP + 1  # the start file's step continued
  for folder in ('eval_bpd', 'eval_bound'):
    assert np.isfinite(summary(folder)['bpd']), folder
  assert np.isfinite(summary('eval_fid')['fid'])
  assert (tmp_path / 'stats' / 'cifar10_stats.npz').is_file()
  released = json.load(open(tmp_path / 'released' / 'eval_bpd' / 'checkpoint_26' / 'summary.json'))
  assert released['step'] == STEP and np.isfinite(released['bpd'])


def _runner_main(plan_path):
  """Script mode: run the plan's main.py argument lists in this process, in order, on mocked
  TFDS; print one JSON line per command ({args, seconds, code, error})."""
  import io
  from absl import logging as absl_logging
  import main
  absl_logging.set_verbosity(absl_logging.WARNING)
  with open(plan_path) as f:
    plan = json.load(f)
  with mocked_tfds():
    for args in plan:
      tic, err, code = time.time(), io.StringIO(), 0
      try:
        with contextlib.redirect_stderr(err):
          main.run(parse(args)[1])
      except SystemExit as e:
        code = e.code
      print(json.dumps({'args': args, 'seconds': round(time.time() - tic, 1), 'code': code,
                        'error': err.getvalue()[-2000:] if code else ''}), flush=True)
      if code:
        break


if __name__ == '__main__':
  _runner_main(sys.argv[1])
