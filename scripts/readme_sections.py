"""README sections written by a generator (scripts/recipes.py, benchmarks/memory.py), between
markers.

A section NAME is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; generators
rewrite it (`--write`) or say whether README.md still matches them (`--check`, exit 1 if not).
"""
import os
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def markers(name):
  return f'<!-- {name}:begin -->', f'<!-- {name}:end -->'


def section(text, name):
  """The text between NAME's markers (ValueError if they are missing)."""
  begin, end = markers(name)
  if begin not in text or end not in text:
    raise ValueError(f'README.md lacks the {begin} / {end} markers.')
  return text.split(begin, 1)[1].split(end, 1)[0].strip('\n') + '\n'


def write_or_check(name, body, write, check, path=README):
  """--write: put body between NAME's markers in path; --check: exit 1 unless it is there already;
  neither: print body."""
  if not (write or check):
    print(body, end='')
    return
  with open(path) as f:
    text = f.read()
  if check:
    sys.exit(0 if section(text, name) == body else 1)
  begin, end = markers(name)
  section(text, name)  # refuse a README without the markers before writing anything
  head, rest = text.split(begin, 1)
  with open(path, 'w') as f:
    f.write(head + begin + '\n' + body + end + rest.split(end, 1)[1])
