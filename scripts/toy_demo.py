"""The paper's synthetic experiment on a CPU (`make demo`).

For each toy dataset: train a first-order score model, fine-tune it from that checkpoint with
first (the fair baseline: the same run continued equally long), second and third-order DSM, and
evaluate each by the exact probability-flow ODE NLL (exact divergence) on fresh samples, against
the data's true NLL. Everything goes through the code CIFAR-10 uses (run_lib.train with
training.restore_from, losses, sde_lib, likelihood, sampling). Writes under --workdir:
results.csv / results.md (dataset, order, steps, nll, true_nll, gap), density_<dataset>.png,
samples_<dataset>.png (2-D), and one training workdir per stage. Rerunning resumes: finished
stages and evaluations are read back.
"""
import csv
import json
import logging
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # pylint: disable=wrong-import-position
import likelihood  # pylint: disable=wrong-import-position
import ode_score  # pylint: disable=wrong-import-position
import run_lib  # pylint: disable=wrong-import-position
import sampling  # pylint: disable=wrong-import-position
import sde_lib  # pylint: disable=wrong-import-position
from configs.toy import checkerboard_ve, checkerboard_vp, mog1d_ve, mog1d_vp  # pylint: disable=wrong-import-position
from models import utils as mutils  # pylint: disable=wrong-import-position

CONFIGS = {('mog1d', 've'): mog1d_ve, ('mog1d', 'vp'): mog1d_vp,
           ('checkerboard', 've'): checkerboard_ve, ('checkerboard', 'vp'): checkerboard_vp}
# The plotted window and the density grid of each dataset.
WINDOWS = {'mog1d': (-1.3, 1.3), 'checkerboard': (-4.5, 4.5)}

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/demo', 'Folder of the whole demo (stages, figures, table).')
flags.DEFINE_list('datasets', ['mog1d'], 'Toy datasets: mog1d, checkerboard (slower).')
flags.DEFINE_enum('sde', 've', ['ve', 'vp'], 'VE (the original toy code) or VP.')
flags.DEFINE_list('orders', ['1', '2', '3'], 'Fine-tuning orders.')
flags.DEFINE_integer('base_steps', 3000, 'First-order training steps before fine-tuning.')
flags.DEFINE_integer('finetune_steps', 1500, 'Fine-tuning steps (every order, the same).')
flags.DEFINE_integer('batch_size', 1000, 'Training batch (the original: 5000).')
flags.DEFINE_float('finetune_lr', 1e-4, 'Learning rate of the fine-tuning stages (0: the config\'s '
                   '1e-3, as the base run).')
flags.DEFINE_integer('eval_points', 5000, 'Fresh samples for the NLL of each model.')
flags.DEFINE_integer('grid', 600, 'Density grid points (per axis for 2-D data: grid // 6).')
flags.DEFINE_integer('seed', 0, 'Seed of training and of the evaluation samples.')
flags.DEFINE_integer('gap_points', 2000, 'Fresh samples for the ODE-score gap (issue 9).')
flags.DEFINE_integer('gap_nt', 20, 'Times at which the ODE-score gap is read.')


def stage_config(dataset, order, steps, restore_from=''):
  config = CONFIGS[(dataset, FLAGS.sde)].get_config()
  config.seed = FLAGS.seed
  t = config.training
  t.score_matching_order = order
  t.n_iters = steps
  t.batch_size = FLAGS.batch_size
  t.restore_from = restore_from
  t.snapshot_freq = steps
  t.snapshot_freq_for_preemption = min(250, steps)
  t.eval_freq = steps
  t.log_freq = min(500, steps)
  t.snapshot_sampling = False
  if restore_from and FLAGS.finetune_lr > 0:
    config.optim.lr = FLAGS.finetune_lr
  return config


def train_stage(config, workdir):
  """run_lib.train (resumes, or returns at once when the stage is finished) -> EMA params."""
  print(f'  python main.py --config configs/toy/{config.data.dataset.lower()}_{FLAGS.sde}.py '
        f'--workdir {workdir} --mode train '
        f'--config.training.score_matching_order={config.training.score_matching_order} '
        f'--config.training.n_iters={config.training.n_iters}'
        + (f' --config.training.restore_from={config.training.restore_from}'
           if config.training.restore_from else ''), flush=True)
  state = run_lib.train(config, workdir)
  return state.params_ema, state.model_state


def nll_fn(config):
  """Exact-divergence ODE NLL (nats per example) of flat data at rtol = atol = 1e-5."""
  sde, eps = sde_lib.get_sde(config)
  model = mutils.get_model(config.model.name)(config=config)
  fn = likelihood.get_likelihood_fn(sde, model, None, rtol=config.eval.rtol, atol=config.eval.atol,
                                    eps=eps, exact_div=True, data_is_images=False,
                                    return_nll=True)

  def nll(params, model_state, x, chunk=5000):
    out, nfe = [], []
    for i in range(0, len(x), chunk):
      _, _, n, value = fn(jax.random.PRNGKey(0), params, model_state, x[i:i + chunk])
      out.append(np.asarray(value))
      nfe.append(int(n))
    return np.concatenate(out), max(nfe)

  return nll


def grid_points(dataset):
  lo, hi = WINDOWS[dataset]
  if dataset == 'mog1d':
    return np.linspace(lo, hi, FLAGS.grid, dtype=np.float32)[:, None]
  axis = np.linspace(lo, hi, FLAGS.grid // 6, dtype=np.float32)
  return np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)


def evaluate_stage(dataset, order, steps, config, params, model_state, cache):
  """NLL on fresh samples and the density on a grid, cached as json + npz in the stage folder."""
  if os.path.exists(cache + '.json'):
    with open(cache + '.json') as f:
      return json.load(f), np.load(cache + '.npz')['logp']
  name = config.data.dataset
  x = datasets.sample_toy(name, 10_000 + FLAGS.seed, FLAGS.eval_points)
  nll = nll_fn(config)
  tic = time.time()
  values, nfe = nll(params, model_state, x)
  grid_nll, _ = nll(params, model_state, grid_points(dataset))
  true_nll = datasets.toy_true_nll(name)
  row = {'dataset': dataset, 'order': order, 'steps': steps, 'nll': float(values.mean()),
         'nll_stderr': float(values.std() / np.sqrt(len(values))), 'true_nll': true_nll,
         'gap': float(values.mean()) - true_nll, 'nfe': nfe, 'eval_s': time.time() - tic}
  np.savez(cache + '.npz', logp=-grid_nll, nll=values)
  with open(cache + '.json', 'w') as f:
    json.dump(row, f)
  return row, -grid_nll


def gap_stage(config, params, model_state, cache):
  """g^2 E|grad log p_t^ODE - s_theta|^2 at gap_nt times on fresh samples (cached npz)."""
  if os.path.exists(cache):
    return dict(np.load(cache))
  sde, eps = sde_lib.get_sde(config)
  model = mutils.get_model(config.model.name)(config=config)
  fn = jax.jit(ode_score.get_ode_score_fn(sde, model, nt=FLAGS.gap_nt, eps=eps,
                                          rtol=config.eval.rtol, atol=config.eval.atol,
                                          exact_div=True))
  x = datasets.sample_toy(config.data.dataset, 20_000 + FLAGS.seed, FLAGS.gap_points)
  out = {k: np.asarray(v) for k, v in fn(jax.random.PRNGKey(0), params, model_state, x).items()}
  np.savez(cache, **out)
  return out


def sample_stage(config, params, model_state, cache, n=2000):
  """ODE samples of a 2-D model (cached)."""
  if os.path.exists(cache):
    return np.load(cache)['samples']
  sde, eps = sde_lib.get_sde(config)
  model = mutils.get_model(config.model.name)(config=config)
  fn = sampling.get_sampling_fn(config, sde, model, (n, config.data.dim),
                                datasets.get_data_inverse_scaler(config), eps)
  samples = np.asarray(fn(jax.random.PRNGKey(FLAGS.seed), params, model_state)[0])
  np.savez(cache, samples=samples)
  return samples


def plot_density_1d(dataset, logps, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  x = grid_points(dataset)
  fig, ax = plt.subplots(figsize=(6, 3.6))
  true = np.exp(datasets.toy_log_prob(dataset.upper(), x))
  ax.fill_between(x[:, 0], true, color='0.85', label='data q(x)')
  styles = {1: ('tab:red', '--'), 2: ('tab:green', '-.'), 3: ('tab:blue', '-')}
  for label, (order, logp) in logps.items():
    color, ls = styles[order]
    ax.plot(x[:, 0], np.exp(logp), color=color, ls=ls, lw=1.4, label=label)
  ax.set_xlabel('x')
  ax.set_ylabel('density')
  ax.set_title('ScoreODE density p(x) vs data (1-D mixture of Gaussians)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def plot_2d(dataset, logps, samples, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  lo, hi = WINDOWS[dataset]
  k = FLAGS.grid // 6
  n = len(logps)
  fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
  for j, (label, (_, logp)) in enumerate(logps.items()):
    axes[0, j].imshow(np.exp(logp).reshape(k, k), origin='lower', extent=(lo, hi, lo, hi),
                      cmap='viridis')
    axes[0, j].set_title(f'p(x): {label}', fontsize=9)
    s = samples[label]
    axes[1, j].scatter(s[:, 0], s[:, 1], s=1, alpha=0.5)
    axes[1, j].set_xlim(lo, hi)
    axes[1, j].set_ylim(lo, hi)
    axes[1, j].set_aspect('equal')
    axes[1, j].set_title(f'ODE samples: {label}', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_dataset(dataset):
  root = os.path.join(FLAGS.workdir, dataset)
  base_dir = os.path.join(root, 'order1_base')
  stages = [(1, FLAGS.base_steps, base_dir, '')]
  for order in sorted(int(o) for o in FLAGS.orders):
    stages.append((order, FLAGS.finetune_steps, os.path.join(root, f'order{order}'),
                   os.path.join(base_dir, 'checkpoints')))
  rows, logps, samples, gaps = [], {}, {}, {}
  for i, (order, steps, workdir, restore) in enumerate(stages):
    done = FLAGS.base_steps + (steps if restore else 0)
    what = ('first-order training' if not restore else
            f'fine-tuning with order {order} from the first-order checkpoint')
    print(f'[{dataset}] stage {i + 1}/{len(stages)}: {what} ({steps} steps)', flush=True)
    config = stage_config(dataset, order, steps, restore)
    params, model_state = train_stage(config, workdir)
    row, logp = evaluate_stage(dataset, order, done, config, params, model_state,
                               os.path.join(workdir, 'eval'))
    print(f'[{dataset}] order {order}, {done} steps: NLL {row["nll"]:.4f} +- '
          f'{row["nll_stderr"]:.4f} nats (true {row["true_nll"]:.4f}, gap {row["gap"]:.4f}, '
          f'NFE {row["nfe"]})', flush=True)
    label = f'order {order}, {done} steps'
    if restore:
      gaps[label] = gap_stage(config, params, model_state, os.path.join(workdir, 'ode_gap.npz'))
      row['ode_score_gap'] = float(np.mean(gaps[label]['gap']))
      print(f'[{dataset}] order {order}: ODE-score gap g^2 E|s_ode - s_theta|^2, mean over t: '
            f'{row["ode_score_gap"]:.4g}', flush=True)
    rows.append(row)
    if restore and order in (1, 3) or config.data.dim == 2 and restore:
      logps[label] = (order, logp)
    if config.data.dim == 2 and restore:
      samples[label] = sample_stage(config, params, model_state,
                                    os.path.join(workdir, 'samples_ode.npz'))
  paired_differences(rows, [os.path.join(w, 'eval.npz') for _, _, w, _ in stages])
  if dataset == 'mog1d':
    plot_density_1d(dataset, logps, os.path.join(FLAGS.workdir, f'density_{dataset}.png'))
  else:
    plot_2d(dataset, logps, samples, os.path.join(FLAGS.workdir, f'density_{dataset}.png'))
  ode_score.plot_gap(gaps, os.path.join(FLAGS.workdir, f'ode_score_gap_{dataset}.png'),
                     title=f'{dataset}: ODE score vs model score')
  return rows


def paired_differences(rows, caches):
  """NLL of each fine-tuned model minus the continued first-order one's on the same points (the
  evaluation samples are shared, so the paired standard error is much smaller than each NLL's)."""
  nlls = [np.load(c)['nll'] for c in caches]
  ref = next((i for i, r in enumerate(rows) if r['order'] == 1 and i > 0), None)
  for i, r in enumerate(rows):
    if ref is not None and i > 0:
      d = nlls[i] - nlls[ref]
      r['vs_order1'] = float(d.mean())
      r['vs_order1_stderr'] = float(d.std() / np.sqrt(len(d)))


def write_table(rows):
  keys = ['dataset', 'order', 'steps', 'nll', 'true_nll', 'gap']
  with open(os.path.join(FLAGS.workdir, 'results.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    extra = ['nll_stderr', 'nfe', 'ode_score_gap', 'vs_order1', 'vs_order1_stderr']
    w.writerow(keys + extra)
    for r in rows:
      w.writerow([r[k] for k in keys] + [r.get(k, '') for k in extra])
  lines = ['| dataset | order | steps | NLL (nats) | true NLL | gap | NLL - order 1 (paired) | '
           'ODE-score gap (mean over t) |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    ode_gap = f'{r["ode_score_gap"]:.4g}' if 'ode_score_gap' in r else '-'
    paired = (f'{r["vs_order1"]:+.4f} +- {r["vs_order1_stderr"]:.4f}' if 'vs_order1' in r
              else '-')
    lines.append(f'| {r["dataset"]} | {r["order"]} | {r["steps"]} | {r["nll"]:.4f} +- '
                 f'{r["nll_stderr"]:.4f} | {r["true_nll"]:.4f} | {r["gap"]:.4f} | {paired} | '
                 f'{ode_gap} |')
  for ds in dict.fromkeys(r['dataset'] for r in rows):
    final = {r['order']: r for r in rows if r['dataset'] == ds and r['steps'] == max(
      q['steps'] for q in rows if q['dataset'] == ds)}
    if 1 in final and 3 in final and final[1]['gap'] > 0:
      closed = 1. - final[3]['gap'] / final[1]['gap']
      lines.append(f'\n{ds}: third-order fine-tuning closes {100 * closed:.0f}% of the first-order '
                   'gap to the true NLL (same total steps).')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  for ds in FLAGS.datasets:
    if (ds, FLAGS.sde) not in CONFIGS:
      raise app.UsageError(f'Unknown toy dataset {ds!r}: use mog1d or checkerboard.')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  tic = time.time()
  rows = []
  for ds in FLAGS.datasets:
    rows += run_dataset(ds)
    write_table(rows)
  print(f'Demo done in {(time.time() - tic) / 60:.1f} min; outputs in {FLAGS.workdir}.')


if __name__ == '__main__':
  app.run(main)
