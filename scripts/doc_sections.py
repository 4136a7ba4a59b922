"""Documentation sections written by a generator, between markers: scripts/recipes.py writes
docs/recipes.md's `recipes` section, benchmarks/memory.py docs/performance.md's `memory` section.

A section NAME is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; generators
rewrite it (`--write`) or say whether the file still matches them (`--check`, exit 1 if not).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')


def markers(name):
  return f'<!-- {name}:begin -->', f'<!-- {name}:end -->'


def section(text, name, where='the file'):
  """The text between NAME's markers (ValueError if they are missing)."""
  begin, end = markers(name)
  if begin not in text or end not in text:
    raise ValueError(f'{where} lacks the {begin} / {end} markers.')
  return text.split(begin, 1)[1].split(end, 1)[0].strip('\n') + '\n'


def read_section(path, name):
  """NAME's section of the file at path."""
  with open(path, encoding='utf-8') as f:
    return section(f.read(), name, os.path.relpath(path, ROOT))


def write_or_check(name, body, write, check, path):
  """--write: put body between NAME's markers in path; --check: exit 1 unless it is there already;
  neither: print body."""
  if not (write or check):
    print(body, end='')
    return
  with open(path, encoding='utf-8') as f:
    text = f.read()
  where = os.path.relpath(path, ROOT)
  if check:
    sys.exit(0 if section(text, name, where) == body else 1)
  begin, end = markers(name)
  section(text, name, where)  # refuse a file without the markers before writing anything
  head, rest = text.split(begin, 1)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(head + begin + '\n' + body + end + rest.split(end, 1)[1])
