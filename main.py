"""Training and evaluation CLI (the score_sde / score_flow / mle_score_ode interface).

  python main.py --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/vp --mode train \
      --config.training.score_matching_order=2

Exit codes: 0 done; 2 bad input (one line on stderr naming the problem and the fix);
3 training stopped on a non-finite loss (training.nonfinite='stop'); 1 anything else.
"""
import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags

import configs
import names

FLAGS = flags.FLAGS


def define_flags(flag_values, argv=None):
  """The CLI's flags on flag_values: FLAGS here (config overrides found in sys.argv); recipes_test
  parses docs/recipes.md's commands with a fresh absl FlagValues and their argv, as this CLI
  does."""
  fv = {'flag_values': flag_values}
  config_flags.DEFINE_config_file('config', None, 'Training configuration.', lock_config=True,
                                  sys_argv=argv, **fv)
  flags.DEFINE_string('workdir', None, 'Work directory.', **fv)
  flags.DEFINE_enum('mode', None, list(names.MODES),
                    'Running mode: train, eval, train_deq (variational dequantizer) or fid_stats.',
                    **fv)
  flags.DEFINE_string('eval_folder', names.EVAL_FOLDER,
                      'The folder name for storing evaluation results.', **fv)
  flags.DEFINE_string('deq_folder', names.DEQ_FOLDER,
                      'The folder name for dequantizer training.', **fv)
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-host: host:port of process 0 for jax.distributed.initialize.', **fv)
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.', **fv)
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.', **fv)
  flags.DEFINE_bool('distributed', False,
                    'Multi-host: jax.distributed.initialize() from the cluster environment (Cloud '
                    'TPU, SLURM, Open MPI, Kubernetes) when no --coordinator_address is given.',
                    **fv)
  flags.mark_flags_as_required(['workdir', 'config', 'mode'], **fv)


define_flags(FLAGS)

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def fail(msg, code=EXIT_BAD_INPUT):
  """One line on stderr, then exit."""
  print(f'main.py: error: {" ".join(str(msg).split())}', file=sys.stderr, flush=True)
  sys.exit(code)


def _config_arg(argv):
  """The value given to --config (None if absent)."""
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv):
  """[(dotted.path, raw)] for every --config.a.b=value / --config.a.b value / --noconfig.flag."""
  out = []
  for i, a in enumerate(argv):
    for pre in ('--config.', '--noconfig.'):
      if a.startswith(pre):
        key = a[len(pre):].split('=', 1)[0]
        out.append(key)
  return out


def _unknown_override(argv):
  """The first --config.x.y whose path the config file lacks, or None."""
  spec = _config_arg(argv)
  try:
    config = configs.load(spec)
  except Exception:
    return None
  for key in _overrides(argv):
    node = config
    for part in key.split('.'):
      if hasattr(node, 'keys') and part in node.keys():
        node = node[part]
      else:
        return key
  return None


def _unknown_field(bad, spec):
  """Exit: an override names a field the config does not have."""
  fail(f"unknown config field '{bad}' in --config.{bad}: {spec} has no such field; check the "
       'name against that file and configs/base_config.py.')


def parse_flags(argv):
  """absl flag parsing whose every failure is one line on stderr and exit code 2."""
  spec = _config_arg(argv)
  if spec is not None:
    path = spec.split(':', 1)[0]
    if not os.path.isfile(path):
      fail(f"config file '{path}' does not exist: pass --config=PATH to a config file such as "
           'configs/tiny/digits_ddpmpp.py.')
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    bad = _unknown_override(argv) if spec else None
    if bad:
      _unknown_field(bad, spec)
    fail(f'{" ".join(str(e).splitlines()[0].split()).rstrip(".")}. Run python main.py --helpshort '
         'for usage.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = _unknown_override(argv) if spec else None
    if bad:
      _unknown_field(bad, spec)
    fail(f'bad --config override ({type(e).__name__}: {e}): check the names and values.')
  return rest


def _trace_to_file():
  """The traceback of the exception being handled, into stdout.txt only (stderr keeps one line)."""
  import traceback
  for h in logging.getLogger().handlers:
    if isinstance(h, logging.StreamHandler) and getattr(h.stream, 'name', '').endswith(
        names.LOG_FILE):
      h.stream.write(traceback.format_exc())
      h.flush()


def main(argv):
  """absl's entry point: the job of the command line's flags (FLAGS)."""
  del argv
  run(FLAGS)


def run(fv):
  """The job the parsed flags fv name (main.py's flags, see define_flags)."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  try:
    config = fv.config
  except (IOError, OSError) as e:
    fail(f'config {_config_arg(sys.argv)} cannot be loaded: {str(e).splitlines()[0]}. Fix the path.')
  # Backend probing (e.g. 'Unable to initialize backend tpu') is not news on stderr.
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  import jax
  if fv.coordinator_address:
    jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                               num_processes=fv.num_processes, process_id=fv.process_id)
  elif fv.distributed:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      fail(f'--distributed found no cluster to join ({str(e).splitlines()[0]}): run it under '
           'SLURM / Cloud TPU / Open MPI, or give --coordinator_address, --num_processes and '
           '--process_id.')

  import config_checks
  workdir, mode = fv.workdir, fv.mode
  try:
    config_checks.validate_config(config, mode, workdir)
  except (ValueError, FileNotFoundError) as e:
    fail(e)

  import run_lib
  import train_lib
  absl_logging.get_absl_handler().addFilter(train_lib.QuietLibraries())

  handler = None
  try:
    if mode == 'train':
      train_lib.check_restore_from(config, workdir)  # before the workdir is made
      os.makedirs(workdir, exist_ok=True)
      handler = train_lib.log_to_file(workdir)
      run_lib.train(config, workdir, check=False)
    elif mode == 'eval':
      import eval_lib
      eval_lib.check_restore_from(config, workdir, fv.eval_folder)  # before the eval folder
      eval_dir = os.path.join(workdir, fv.eval_folder)
      os.makedirs(eval_dir, exist_ok=True)
      handler = train_lib.log_to_file(eval_dir)
      run_lib.evaluate(config, workdir, fv.eval_folder, fv.deq_folder, check=False)
    elif mode == 'train_deq':
      import deq_lib
      deq_lib.check_config(config, workdir)  # before the dequantizer's folder is made
      deq_dir = names.deq_dir(workdir, fv.deq_folder)
      os.makedirs(deq_dir, exist_ok=True)
      handler = train_lib.log_to_file(deq_dir)
      run_lib.train_deq(config, workdir, fv.deq_folder, check=False)
    elif mode == 'fid_stats':
      os.makedirs(workdir, exist_ok=True)
      handler = train_lib.log_to_file(workdir)
      run_lib.fid_stats(config, workdir, check=False)
  except run_lib.NonFiniteError as e:
    logging.error('%s', e)
    fail(e, EXIT_NONFINITE)
  except (ValueError, FileNotFoundError) as e:
    _trace_to_file()
    fail(e)
  finally:
    train_lib.close_log(handler)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
