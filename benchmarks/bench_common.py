"""Shared helpers of the benchmark scripts: machine line, timing, markdown/CSV tables.

Times on a shared CPU are noisy: every script reports ratios measured within one run, and
`median_time` takes the median of several repeats after a warm-up (compile) call.
"""
import csv
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if os.path.join(ROOT, 'scripts') not in sys.path:  # doc_sections
  sys.path.append(os.path.join(ROOT, 'scripts'))

import jax


def cpu_model():
  """CPU model name from /proc/cpuinfo ('unknown' elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def machine_line():
  """One line: CPU model, visible cores, jax version, backend and device count."""
  return (f'CPU {cpu_model()} ({os.cpu_count()} visible cores), jax {jax.__version__}, '
          f'backend {jax.default_backend()}, {jax.device_count()} device(s)')


def block(tree):
  """Wait for every array of a pytree."""
  return jax.tree_util.tree_map(
    lambda x: x.block_until_ready() if hasattr(x, 'block_until_ready') else x, tree)


def median_time(fn, *args, repeats=5):
  """(median seconds, all seconds) of fn(*args) over `repeats` calls after one warm-up call."""
  block(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def interleaved_times(calls, repeats=5):
  """{key: (median seconds, all seconds)} of calls {key: (fn, args)}, timed round-robin after one
  warm-up call each, so that a change of load on a shared machine hits every key alike."""
  for fn, args in calls.values():
    block(fn(*args))
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, (fn, args) in calls.items():
      start = time.perf_counter()
      block(fn(*args))
      times[k].append(time.perf_counter() - start)
  return {k: (statistics.median(v), v) for k, v in times.items()}


def fmt(x, digits=3):
  """Numbers for tables: None -> '-', floats with `digits` significant digits."""
  if x is None:
    return '-'
  if isinstance(x, float):
    return f'{x:.{digits}g}'
  return str(x)


def markdown_table(title, header, rows, notes=()):
  """A markdown block: title, machine line, the table and notes."""
  lines = [f'### {title}', '', f'Machine: {machine_line()}', '']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|' + '|'.join('---' for _ in header) + '|')
  for row in rows:
    lines.append('| ' + ' | '.join(fmt(c) for c in row) + ' |')
  if notes:
    lines.append('')
    lines.extend(f'- {n}' for n in notes)
  return '\n'.join(lines) + '\n'


def write_table(path, title, header, rows, notes=()):
  """Write the table to `path` (CSV if it ends in .csv, machine and notes as # lines; else
  markdown) and print it as markdown. Returns the markdown text."""
  text = markdown_table(title, header, rows, notes)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  if path.endswith('.csv'):
    with open(path, 'w', newline='') as f:
      f.write(f'# {title}\n# Machine: {machine_line()}\n')
      for n in notes:
        f.write(f'# {n}\n')
      writer = csv.writer(f)
      writer.writerow(header)
      for row in rows:
        writer.writerow([fmt(c, 6) for c in row])
  else:
    with open(path, 'w') as f:
      f.write(text)
  print()
  print(text)
  print(f'written to {path}')
  return text


def default_out(name):
  return os.path.join(ROOT, 'runs', 'bench', name)


# ------------------------------------------------------------------------------------------------
# Shared set-up: tiny configs, DIGITS batches, brief training.
# ------------------------------------------------------------------------------------------------
TINY = {'tiny_ddpmpp': 'configs/tiny/digits_ddpmpp.py', 'tiny_ncsnpp': 'configs/tiny/digits_ncsnpp.py'}


def tiny_config(name='tiny_ddpmpp', batch=16):
  """A tiny config pinned to nf 32, ch_mult (1, 2), one res block, 16x16x3, batch `batch`."""

  if name == 'tiny_ddpmpp':
    from configs.tiny import digits_ddpmpp as mod
  elif name == 'tiny_ncsnpp':
    from configs.tiny import digits_ncsnpp as mod
  else:
    raise SystemExit(f"Unknown tiny config '{name}': use tiny_ddpmpp or tiny_ncsnpp.")
  config = mod.get_config()
  config.model.nf = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.data.image_size = 16
  config.data.num_channels = 3
  config.training.batch_size = batch
  config.eval.batch_size = batch
  return config


def digits_batches(config, n_train_batches):
  """Scaled DIGITS train batches (list) and one scaled test batch (first of the test split)."""
  import datasets
  import jax.numpy as jnp
  import numpy as np
  scaler = datasets.get_data_scaler(config)
  train_ds, _, _ = datasets.get_dataset(config, evaluation=False)
  it = iter(train_ds)
  train = [scaler(jnp.asarray(np.asarray(next(it)['image']))) for _ in range(n_train_batches)]
  _, eval_ds, _ = datasets.get_dataset(config, evaluation=True, shuffle=False)
  test = scaler(jnp.asarray(np.asarray(next(iter(eval_ds))['image'])))
  return train, test


def train_briefly(config, sde, model, params, states, train_batches, steps, lr=2e-3):
  """`steps` order-1 DSM steps (Adam, train=True) cycling over `train_batches`.

  Returns (params, final loss). Used to get realistic NFE from an adaptive ODE solver (a random
  init gives an almost linear flow)."""
  import optax
  import losses
  loss_fn = losses.get_sde_loss_fn(
    sde, model, True, reduce_mean=True, continuous=True, likelihood_weighting=False,
    importance_weighting=False, eps=config.training.get('smallest_time', 1e-5),
    score_matching_order=1)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(rng, params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
      rng, params, states, {'image': batch})
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = jax.random.PRNGKey(123)
  loss = None
  for i in range(steps):
    rng, step_rng = jax.random.split(rng)
    params, opt_state, loss = step(step_rng, params, opt_state,
                                   train_batches[i % len(train_batches)])
  return params, None if loss is None else float(loss)
