"""benchmarks/memory.py: its configs, the grid run (children, resume), recommend, docs section."""
import os
import subprocess
import sys

import memory  # benchmarks/ is on sys.path in pytest (the test's folder) and when run from here
import doc_sections
from harness import main_env

HERE = os.path.dirname(os.path.abspath(__file__))


def test_config_for_sets_the_setting_on_the_full_size_configs():
  for name in memory.FULL:
    config = memory.config_for(name, 128, 3, 4, 'convs')
    t = config.training
    assert (t.batch_size, t.score_matching_order, t.n_microbatches, t.remat) == (128, 3, 4, 'convs')
    assert t.reduce_mean and config.data.image_size == 32 and config.model.nf == 128


def _row(config, order, n, remat, peak):
  return dict(config=config, batch='128', order=str(order), n_microbatches=str(n), remat=remat,
              peak_gib=str(peak), temp_gib='0', args_gib='0', compile_s='0', time_ratio='')


def _timing(order, n, remat, ratio):
  return dict(_row('tiny_ddpmpp', order, n, remat, 0), batch='16', time_ratio=str(ratio))


def test_recommend_takes_the_fastest_setting_that_fits_with_headroom():
  rows = [_row('cifar10_ddpmpp', 3, 1, 'none', 95.), _row('cifar10_ddpmpp', 3, 2, 'none', 48.),
          _row('cifar10_ddpmpp', 3, 4, 'none', 20.), _row('cifar10_ddpmpp', 3, 1, 'convs', 30.),
          _timing(3, 2, 'none', 1.3), _timing(3, 4, 'none', 1.1), _timing(3, 1, 'convs', 1.2)]
  # 80 GB: 95 GiB does not fit; 2 microbatches (48 GiB) fit but cost 1.3x; 4 cost 1.1x.
  (row, factor), = memory.recommend(rows, 80).values()
  assert (row['n_microbatches'], row['remat'], factor) == ('4', 'none', 1.1)
  # 20 GiB = 21.5 GB is more than 90% of 22 GB, and nothing smaller was measured.
  assert memory.recommend(rows, 22) == {}
  assert memory.recommend(rows, 24)[('cifar10_ddpmpp', 3)][0]['n_microbatches'] == '4'
  # A setting whose time was not measured (16 microbatches) comes after every measured one.
  rows.append(_row('cifar10_ddpmpp', 3, 16, 'none', 5.))
  assert memory.recommend(rows, 24)[('cifar10_ddpmpp', 3)][0]['n_microbatches'] == '4'
  assert memory.recommend(rows, 16)[('cifar10_ddpmpp', 3)] == (rows[-1], None)
  # A split measured faster than the whole batch on the CPU (0.8x) does not displace a whole
  # batch that fits.
  rows += [_row('cifar10_ddpmpp', 1, 1, 'none', 23.), _row('cifar10_ddpmpp', 1, 4, 'none', 5.),
           _timing(1, 4, 'none', 0.8)]
  assert memory.recommend(rows, 40)[('cifar10_ddpmpp', 1)][0]['n_microbatches'] == '1'
  assert memory.recommend(rows, 16)[('cifar10_ddpmpp', 1)] == (rows[-2], 0.8)


def test_doc_section_is_generated_from_the_committed_rows():
  text = doc_sections.read_section(memory.DOC, memory.SECTION)
  assert text == memory.section_text(memory.read_rows(memory.RESULTS)), (
    'docs/performance.md differs from benchmarks/results/memory_cifar10.csv: run '
    'python benchmarks/memory.py doc --write')


def test_measure_compiles_each_setting_in_a_child_and_resumes(tmp_path):
  csv = tmp_path / 'rows.csv'
  cmd = [sys.executable, os.path.join(HERE, 'memory.py'), 'measure', '--configs', 'tiny_ddpmpp',
         '--batch', '4', '--orders', '1', '--microbatches', '1,2', '--remats', 'none',
         '--csv', str(csv)]
  env = main_env()
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {row['n_microbatches']: row for row in memory.read_rows(str(csv))}
  assert sorted(rows) == ['1', '2']
  whole, halves = float(rows['1']['temp_gib']), float(rows['2']['temp_gib'])
  assert 0 < halves < whole  # two slices of 2 rows hold less than 4 rows at once
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
  assert again.returncode == 0 and len(memory.read_rows(str(csv))) == 2  # nothing re-measured
