"""The module structure: no import cycle between the project's modules (imports inside functions
count), every top-level module part of the product (reached from main.py), names without
TensorFlow or JAX, and modules short enough to read."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 470


def _modules():
  """{name: path} of the top-level modules (not tests or pytest's conftest) and of the models
  package's modules."""
  out = {}
  for folder, prefix in ((ROOT, ''), (os.path.join(ROOT, 'models'), 'models.')):
    for f in os.listdir(folder):
      if f.endswith('.py') and not f.endswith('_test.py') and f not in ('__init__.py',
                                                                        'conftest.py'):
        out[prefix + f[:-3]] = os.path.join(folder, f)
  return out


def _imports(path, known):
  """The project modules that the file at path imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    found.update(n for n in names if n in known)
  return found


def _cycle(graph):
  """One import cycle as a list of names, or None."""
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, stack + [nxt])
        if found:
          return found
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_no_import_cycle():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  assert graph['run_lib'] >= {'train_lib', 'eval_lib', 'deq_lib'}  # the walk sees imports
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_every_top_level_module_is_reached_from_main():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  reached, todo = set(), ['main']
  while todo:
    name = todo.pop()
    if name not in reached:
      reached.add(name)
      todo.extend(graph[name])
  assert not sorted(m for m in modules if '.' not in m and m not in reached)


def test_cycle_finder_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_names_module_needs_neither_tensorflow_nor_jax():
  code = ('import sys, names, toy_data; '
          'print(sorted(m for m in ("jax", "tensorflow") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == '[]', out


def test_modules_are_short():
  long = {name: n for name, path in _modules().items()
          if (n := len(open(path).read().splitlines())) > MAX_LINES}
  assert not long, f'modules over {MAX_LINES} lines: {long}'
