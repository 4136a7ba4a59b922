"""Layout of the files git tracks: assets/ as in score_sde, every local link and image of README.md
and docs/*.md present, no data, no checkpoints, no run outputs. Needs only git; skipped outside a
git checkout."""
import os
import posixpath
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Data sets, checkpoints, arrays and pickles: computed or downloaded, never committed.
DATA_SUFFIXES = ('.npz', '.npy', '.msgpack', '.ckpt', '.pkl', '.pickle', '.tfrecord', '.h5')
OUTPUT_DIRS = ('runs', 'checkpoints', 'checkpoints-meta')


@pytest.fixture(scope='module')
def tracked():
  """The set of paths (relative to the repository root) in git's index."""
  if shutil.which('git') is None:
    pytest.skip('git is not installed')
  res = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=False)
  if res.returncode != 0:
    pytest.skip('not a git checkout')
  return set(res.stdout.decode().split('\0')) - {''}


def test_stats_readme_tells_how_to_compute_stats(tracked):
  assert 'assets/stats/README.md' in tracked
  with open(os.path.join(ROOT, 'assets/stats/README.md'), encoding='utf-8') as f:
    assert '--mode fid_stats' in f.read()


def heading_anchors(text):
  """The anchors GitHub gives the headings of a markdown text (lower case, punctuation dropped,
  spaces as hyphens, -1, -2, ... on repeats)."""
  anchors, seen = set(), {}
  for line in _prose(text).splitlines():
    m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
    if not m:
      continue
    slug = re.sub(r'[^\w\- ]', '', m.group(1).lower()).replace(' ', '-')
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f'{slug}-{n}')
  return anchors


def _prose(text):
  """text without fenced code blocks and inline code spans (links there are not links)."""
  text = re.sub(r'^```.*?^```', '', text, flags=re.M | re.S)
  return re.sub(r'`[^`\n]*`', '', text)


def broken_links(path, text, tracked, read=None):
  """The local links and images of the markdown file `path` (relative to the repository root)
  whose target git does not track, or whose #anchor is not a heading of the target markdown
  file. http(s) and mailto links are skipped; read(path) gives another file's text."""
  prose = _prose(text)
  targets = re.findall(r'\]\(\s*<?([^)\s>]+)', prose) + re.findall(r'<img[^>]+src="([^"]+)"', prose)
  bad = []
  for target in targets:
    if re.match(r'[a-z]+:', target):
      continue
    file_part, _, anchor = target.partition('#')
    dest = posixpath.normpath(posixpath.join(posixpath.dirname(path), file_part)) if file_part \
      else path
    if dest not in tracked and not any(t.startswith(dest + '/') for t in tracked):
      bad.append(f'{path}: {target} (not tracked)')
    elif anchor and dest.endswith('.md') and read is not None:
      if anchor not in heading_anchors(text if dest == path else read(dest)):
        bad.append(f'{path}: {target} (no such heading)')
  return bad


def _read(path):
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    return f.read()


def test_docs_links_and_images_are_tracked(tracked):
  docs = ['README.md'] + sorted(p for p in tracked if re.fullmatch(r'docs/[^/]+\.md', p))
  bad = [b for doc in docs for b in broken_links(doc, _read(doc), tracked, _read)]
  assert not bad, 'links to files git does not track or to missing headings:\n' + '\n'.join(bad)


def test_broken_links_are_found():
  tracked = {'README.md', 'docs/a.md', 'assets/figures/x.png'}
  text = {'docs/a.md': '# A title\n\n## Second part\n'}
  good = ('[a](docs/a.md) [b](docs/a.md#second-part) ![x](assets/figures/x.png) [c](#top) '
          '[d](https://example.com/nope.md) `[e](missing.md)`\n# Top\n')
  assert broken_links('README.md', good, tracked, text.get) == []
  bad = '[a](docs/b.md) ![x](assets/x.png) [c](docs/a.md#third) <img src="y.png">'
  assert len(broken_links('README.md', bad, tracked, text.get)) == 4
  assert broken_links('docs/a.md', '![x](../assets/figures/x.png) [r](../README.md)', tracked,
                      text.get) == []


def test_no_data_checkpoints_or_run_outputs_tracked(tracked):
  bad = sorted(p for p in tracked if p.lower().endswith(DATA_SUFFIXES)
               or any(d in OUTPUT_DIRS for d in p.split('/')[:-1]))
  assert not bad, f'data sets, checkpoints or run outputs are tracked: {bad}'
