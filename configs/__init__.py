"""Config files: `load` reads one as the CLI's --config does (without overrides)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(spec):
  """get_config() of the config file `spec` ('path' or 'path:arg'; a relative path is tried from
  the working directory, then from the repository root)."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  mod_spec = importlib.util.spec_from_file_location('_config_file', path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))
