"""The paper's synthetic experiment on a CPU (`make demo`).

For each toy dataset (1-D mixture of Gaussians, 2-D checkerboard; VE as the original toy code):
train a first-order score model, fine-tune it from that checkpoint with first (the fair baseline:
the same run continued equally long), second and third-order DSM under the same steps, batch,
learning-rate schedule and EMA, and evaluate each by its exact probability-flow ODE NLL (exact
divergence, RK45 at 1e-5) on fresh samples, against the true NLL of the same samples. Every stage
goes through the code CIFAR-10 uses (run_lib.train with training.restore_from, losses, sde_lib,
likelihood). Independent stages run side by side in --jobs worker processes.

Writes under --workdir: results.csv / results.md (one row per dataset and order, with the steps
per second of its fine-tuning stage and of its dataset's base stage; results.md names the CPU),
density_<dataset>.png (Figure 1: data, first- and third-order ODE densities) and one training
workdir per stage. Rerunning resumes: finished stages and evaluations are read back.
"""
import concurrent.futures as cf
import csv
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
import numpy as np
import tqdm

import toy_data

DATASETS = {'mog1d': 'MOG1D', 'checkerboard': 'CHECKERBOARD'}
# The plotted window of each dataset (the density grid spans it).
WINDOWS = {'mog1d': (-1.3, 1.3), 'checkerboard': (-4.5, 4.5)}
# Relative cost of a step by (dim, order) at batch 1000 (benchmarks/train_step.py --toy), used
# only to start the longest stages first.
STEP_COST = {(1, 1): 1., (1, 2): 2.0, (1, 3): 3.0, (2, 1): 1., (2, 2): 2.8, (2, 3): 5.1}
PLOTTED_ORDERS = (1, 3)
# Each dataset's budget (docs/toy_demo.md, "What each lever did"): the 2-D data gain from more,
# smaller batches; the 1-D third order from larger ones.
PROTOCOL = {'mog1d': dict(batch_size=1000, base_steps=3000, finetune_steps=2000),
            'checkerboard': dict(batch_size=500, base_steps=4000, finetune_steps=3000)}

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/demo', 'Folder of the whole demo (stages, figures, table).')
flags.DEFINE_list('datasets', ['mog1d', 'checkerboard'], 'Toy datasets: mog1d, checkerboard.')
flags.DEFINE_enum('sde', 've', ['ve', 'vp'], 'VE (the original toy code) or VP.')
flags.DEFINE_list('orders', ['1', '2', '3'], 'Fine-tuning orders (1 is the baseline).')
flags.DEFINE_integer('base_steps', None, 'First-order training steps before fine-tuning '
                     '(default: the dataset\'s, see PROTOCOL).')
flags.DEFINE_integer('finetune_steps', None, 'Fine-tuning steps, every order the same (default: '
                     'the dataset\'s).')
flags.DEFINE_integer('batch_size', None, 'Training batch of every stage (default: the dataset\'s; '
                     'the original: 5000).')
flags.DEFINE_float('finetune_lr', 3e-4, 'Peak learning rate of the fine-tuning stages (the base '
                   'run keeps the config\'s 1e-3).')
flags.DEFINE_enum('finetune_schedule', 'cosine', ['constant', 'cosine'],
                  'Learning-rate schedule of the fine-tuning stages (config.optim.schedule).')
flags.DEFINE_list('loss_weights', ['1', '0.5', '0.1'],
                  'Weights of the order 1/2/3 terms (the original toy code: 1, 0.5, 0.1).')
flags.DEFINE_enum('eval_weights', 'ema', ['ema', 'raw'], 'Score the EMA weights (as the original) '
                  'or the raw ones.')
flags.DEFINE_list('decoder_layers', ['512', '512'], 'Widths of the MLP decoder (the original: '
                  '512, 512; narrower layers make every step cheaper).')
flags.DEFINE_integer('eval_points', 10_000, 'Fresh samples for the NLL of each model.')
flags.DEFINE_integer('grid', 600, 'Density grid points (per axis for 2-D data: grid // 10).')
flags.DEFINE_integer('seed', 0, 'Seed of training and of the evaluation samples.')
flags.DEFINE_integer('jobs', 2, 'Stages trained side by side (worker processes sharing the '
                     'cores).')


# ------------------------------------------------------------------------------------------------
# One stage (runs in a worker process)
# ------------------------------------------------------------------------------------------------

def stage_config(opts, dataset, order, steps, restore_from=''):
  """The toy config of one stage: opts = dataset_opts(dataset)."""
  from configs.toy import checkerboard_ve, checkerboard_vp, mog1d_ve, mog1d_vp
  module = {('mog1d', 've'): mog1d_ve, ('mog1d', 'vp'): mog1d_vp,
            ('checkerboard', 've'): checkerboard_ve, ('checkerboard', 'vp'): checkerboard_vp}
  config = module[(dataset, opts['sde'])].get_config()
  config.seed = opts['seed']
  config.model.decoder_layers = tuple(int(w) for w in opts['decoder_layers'])
  t = config.training
  t.score_matching_order = order
  t.n_iters = steps
  t.batch_size = opts['batch_size']
  t.restore_from = restore_from
  t.restore_optimizer = False  # every order starts a fresh optimizer from the base weights
  t.loss_weights = tuple(float(w) for w in opts['loss_weights'])
  t.n_jitted_steps = next(k for k in (10, 5, 2, 1) if steps % k == 0)
  t.snapshot_freq = steps
  t.snapshot_freq_for_preemption = max(t.n_jitted_steps, min(500, steps) // t.n_jitted_steps
                                       * t.n_jitted_steps)
  t.eval_freq = steps
  t.log_freq = steps
  t.snapshot_sampling = False
  if restore_from:
    config.optim.lr = opts['finetune_lr']
    config.optim.schedule = opts['finetune_schedule']
  return config


def grid_points(dataset, grid):
  lo, hi = WINDOWS[dataset]
  if dataset == 'mog1d':
    return np.linspace(lo, hi, grid, dtype=np.float32)[:, None]
  axis = np.linspace(lo, hi, grid // 10, dtype=np.float32)
  return np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)


def eval_points(dataset, opts):
  return toy_data.sample_toy(DATASETS[dataset], 10_000 + opts['seed'], opts['eval_points'])


def exact_nll(config, params, model_state, x, chunk=5000):
  """(NLL per point in nats, max NFE): exact-divergence ODE likelihood at the config's rtol/atol."""
  import jax
  import likelihood
  import sde_lib
  from models import utils as mutils
  sde, eps = sde_lib.get_sde(config)
  model = mutils.get_model(config.model.name)(config=config)
  fn = jax.jit(likelihood.get_likelihood_fn(
    sde, model, None, rtol=config.eval.rtol, atol=config.eval.atol, eps=eps,
    exact_div=likelihood.use_exact_div(config), data_is_images=False, return_nll=True))
  out, nfe = [], 0
  for i in range(0, len(x), chunk):
    _, _, n, value = fn(jax.random.PRNGKey(0), params, model_state, x[i:i + chunk])
    out.append(np.asarray(value, np.float64))
    nfe = max(nfe, int(n))
  return np.concatenate(out), nfe


def train_stage(config, stage, slot):
  """(state, {'train_s', 'steps_per_s'}) of run_lib.train on one stage (resumable).

  steps_per_s is the stage's steps over the wall time of run_lib.train (compile and data set-up
  included, other stages running side by side), None when the stage resumed part-way; the row is
  kept in train.json, so a rerun reads it back rather than timing a resume.
  """
  import names
  import run_lib
  workdir = stage['workdir']
  path = os.path.join(workdir, 'train.json')
  saved = None
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  fresh = not any(names.checkpoint_numbers(os.path.join(workdir, d))
                  for d in (names.CHECKPOINTS, names.CHECKPOINTS_META))
  tic = time.time()
  state = run_lib.train(config, workdir, progress_desc=f'{stage["dataset"]} {stage["name"]}',
                        progress_position=slot)
  if saved is not None:
    return state, saved
  train_s = time.time() - tic
  row = {'train_s': train_s, 'steps_per_s': stage['steps'] / train_s if fresh else None}
  with open(path, 'w') as f:
    json.dump(row, f)
  return state, row


def run_stage(stage, slot):
  """Train one stage (resumable) and, for fine-tuning stages, evaluate it; cached in its folder."""
  dataset, order, kind, opts = stage['dataset'], stage['order'], stage['kind'], stage['opts']
  workdir = stage['workdir']
  cache = os.path.join(workdir, 'eval')
  if kind == 'finetune' and os.path.exists(cache + '.json'):
    with open(cache + '.json') as f:
      return json.load(f)
  config = stage_config(opts, dataset, order, stage['steps'], stage['restore_from'])
  state, row = train_stage(config, stage, slot)
  row = dict(row)
  if kind == 'finetune':
    tic = time.time()
    x = eval_points(dataset, opts)
    params = state.params_ema if opts['eval_weights'] == 'ema' else state.params
    nll, nfe = exact_nll(config, params, state.model_state, x)
    grid_logp = np.zeros(0)
    if order in PLOTTED_ORDERS:
      grid_logp = -exact_nll(config, params, state.model_state,
                             grid_points(dataset, opts['grid']))[0]
    np.savez(cache + '.npz', nll=nll, grid_logp=grid_logp)
    row.update(dataset=dataset, order=order, steps=opts['base_steps'] + opts['finetune_steps'],
               nfe=nfe, eval_s=time.time() - tic)
    with open(cache + '.json', 'w') as f:
      json.dump(row, f)
  return row


def _init_worker(lock):
  """A shared tqdm lock for the workers' progress bars."""
  tqdm.tqdm.set_lock(lock)
  logging.set_verbosity(logging.WARNING)


# ------------------------------------------------------------------------------------------------
# The schedule of stages (main process)
# ------------------------------------------------------------------------------------------------

def dataset_opts(dataset):
  """Everything a stage of `dataset` needs (picklable for the workers): flags over PROTOCOL."""
  opts = {k: getattr(FLAGS, k) for k in ('sde', 'seed', 'loss_weights', 'finetune_lr',
                                          'finetune_schedule', 'eval_points', 'grid',
                                          'eval_weights', 'decoder_layers')}
  for k, v in PROTOCOL[dataset].items():
    opts[k] = v if getattr(FLAGS, k) is None else getattr(FLAGS, k)
  return opts


def make_stages():
  stages = []
  for dataset in FLAGS.datasets:
    opts = dataset_opts(dataset)
    root = os.path.join(FLAGS.workdir, dataset)
    dim = toy_data.toy_dim(DATASETS[dataset])
    base = os.path.join(root, 'order1_base')
    scale = opts['batch_size'] / 1000.
    stages.append(dict(dataset=dataset, order=1, kind='base', name='order 1 (base)', opts=opts,
                       workdir=base, steps=opts['base_steps'], restore_from='', after=None,
                       cost=opts['base_steps'] * scale))
    for order in sorted({int(o) for o in FLAGS.orders} | {1}):
      stages.append(dict(dataset=dataset, order=order, kind='finetune', opts=opts,
                         name=f'order {order} (fine-tune)',
                         workdir=os.path.join(root, f'order{order}'), steps=opts['finetune_steps'],
                         restore_from=os.path.join(base, 'checkpoints'),
                         after=base, cost=opts['finetune_steps'] * scale * STEP_COST[(dim, order)]))
  return stages


def run_all(stages):
  """Run every stage on FLAGS.jobs workers, longest ready stage first; {workdir: row}."""
  done, running, results = set(), {}, {}
  pending = list(stages)
  free = list(range(FLAGS.jobs))
  ctx = multiprocessing.get_context('spawn')
  lock = ctx.RLock()  # one lock for every process's progress bars
  tqdm.tqdm.set_lock(lock)
  with cf.ProcessPoolExecutor(FLAGS.jobs, mp_context=ctx, initializer=_init_worker,
                              initargs=(lock,)) as pool:
    while pending or running:
      ready = sorted((s for s in pending if s['after'] is None or s['after'] in done),
                     key=lambda s: -s['cost'])
      while ready and free:
        stage = ready.pop(0)
        pending.remove(stage)
        slot = free.pop(0)
        running[pool.submit(run_stage, stage, slot)] = (stage, slot)
      finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
      for fut in finished:
        stage, slot = running.pop(fut)
        free.append(slot)
        row = fut.result()
        done.add(stage['workdir'])
        results[stage['workdir']] = row
        what = f'[{stage["dataset"]}] {stage["name"]}: trained in {row["train_s"]:.0f} s'
        if row.get('steps_per_s'):
          what += f' ({row["steps_per_s"]:.1f} steps/s)'
        if 'eval_s' in row:
          what += f', NLL of {FLAGS.eval_points} points in {row["eval_s"]:.0f} s (NFE {row["nfe"]})'
        tqdm.tqdm.write(what)
  return results


# ------------------------------------------------------------------------------------------------
# Table and figures
# ------------------------------------------------------------------------------------------------

def _mean_se(d):
  return float(np.mean(d)), float(np.std(d) / np.sqrt(len(d)))


def dataset_rows(dataset, stages, results):
  """Rows of one dataset: NLL and true NLL on the same points, gap, paired difference to order 1,
  and the share of the first-order gap closed."""
  true = -toy_data.toy_log_prob(DATASETS[dataset], eval_points(dataset, dataset_opts(dataset)))
  rows, nlls = [], {}
  base = next(s for s in stages if s['dataset'] == dataset and s['kind'] == 'base')
  for s in stages:
    if s['dataset'] != dataset or s['kind'] != 'finetune':
      continue
    nlls[s['order']] = np.load(os.path.join(s['workdir'], 'eval.npz'))['nll']
    r = dict(results[s['workdir']])
    r['base_steps_per_s'] = results[base['workdir']].get('steps_per_s')
    r['nll'], r['nll_stderr'] = _mean_se(nlls[s['order']])
    r['true_nll'] = float(true.mean())
    r['gap'], r['gap_stderr'] = _mean_se(nlls[s['order']] - true)
    rows.append(r)
  for r in rows:
    if r['order'] != 1 and 1 in nlls:
      r['vs_order1'], r['vs_order1_stderr'] = _mean_se(nlls[r['order']] - nlls[1])
      base_gap = next(q['gap'] for q in rows if q['order'] == 1)
      r['gap_closed'] = 1. - r['gap'] / base_gap if base_gap > 0 else float('nan')
  return rows


CSV_KEYS = ['dataset', 'order', 'steps', 'nll', 'true_nll', 'gap', 'nll_stderr', 'gap_stderr',
            'vs_order1', 'vs_order1_stderr', 'gap_closed', 'nfe', 'train_s', 'eval_s',
            'steps_per_s', 'base_steps_per_s']


def _rate(value):
  return '-' if value is None else f'{value:.1f}'


def write_table(rows):
  """results.csv and results.md; the markdown names the CPU, so that a reader can tell a slower
  machine from slower code by the steps per second."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'benchmarks'))
  import bench_common
  with open(os.path.join(FLAGS.workdir, 'results.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(CSV_KEYS)
    for r in rows:
      w.writerow(['' if r.get(k) is None else r[k] for k in CSV_KEYS])
  lines = [f'CPU {bench_common.cpu_model()} ({os.cpu_count()} visible cores), {FLAGS.jobs} '
           'stages trained side by side; steps/s: fine-tuning stage (its dataset\'s base stage).',
           '', '| dataset | order | steps | NLL (nats) | true NLL | gap | NLL - order 1 (paired) | '
           'gap closed | steps/s |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    paired = (f'{r["vs_order1"]:+.4f} +- {r["vs_order1_stderr"]:.4f}' if 'vs_order1' in r
              else '-')
    closed = f'{100 * r["gap_closed"]:.0f}%' if 'gap_closed' in r else '-'
    lines.append(f'| {r["dataset"]} | {r["order"]} | {r["steps"]} | {r["nll"]:.4f} +- '
                 f'{r["nll_stderr"]:.4f} | {r["true_nll"]:.4f} | {r["gap"]:.4f} +- '
                 f'{r["gap_stderr"]:.4f} | {paired} | {closed} | {_rate(r.get("steps_per_s"))} '
                 f'({_rate(r.get("base_steps_per_s"))}) |')
  lines.append('')
  for r in rows:
    if 'gap_closed' in r:
      sig = r['vs_order1'] < -2 * r['vs_order1_stderr']
      lines.append(f'{r["dataset"]}: order {r["order"]} closes {100 * r["gap_closed"]:.0f}% of the '
                   f'first-order gap to the true NLL ({"more" if sig else "not more"} than 2 '
                   'standard errors below order 1 on the same points).')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


def plot_density(dataset, stages, path):
  """Figure 1: the data density and the first- and third-order ODE densities on one scale."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  x = grid_points(dataset, FLAGS.grid)
  dens = {'data q(x)': np.exp(toy_data.toy_log_prob(DATASETS[dataset], x))}
  for s in stages:
    if s['dataset'] == dataset and s['kind'] == 'finetune' and s['order'] in PLOTTED_ORDERS:
      logp = np.load(os.path.join(s['workdir'], 'eval.npz'))['grid_logp']
      steps = s['opts']['base_steps'] + s['steps']
      dens[f'order {s["order"]}, {steps} steps'] = np.exp(logp)
  lo, hi = WINDOWS[dataset]
  if dataset == 'mog1d':
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    styles = iter([('tab:red', '--'), ('tab:blue', '-')])
    for label, p in dens.items():
      if label.startswith('data'):
        ax.fill_between(x[:, 0], p, color='0.85', label=label)
      else:
        color, ls = next(styles)
        ax.plot(x[:, 0], p, color=color, ls=ls, lw=1.4, label=f'ScoreODE {label}')
    ax.set_xlabel('x')
    ax.set_ylabel('density')
    ax.set_title('1-D mixture of Gaussians: ScoreODE densities vs data')
    ax.legend(fontsize=8)
  else:
    k = FLAGS.grid // 10
    vmax = 2 * dens['data q(x)'].max()  # the first-order spikes saturate rather than hide the rest
    fig, axes = plt.subplots(1, len(dens), figsize=(3.6 * len(dens), 3.8))
    for ax, (label, p) in zip(np.atleast_1d(axes), dens.items()):
      im = ax.imshow(p.reshape(k, k), origin='lower', extent=(lo, hi, lo, hi), cmap='viridis',
                     vmin=0., vmax=vmax)
      ax.set_title(label if label.startswith('data') else f'ScoreODE {label}', fontsize=9)
    fig.colorbar(im, ax=np.atleast_1d(axes).tolist(), shrink=0.8, extend='max', label='density')
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for ds in FLAGS.datasets:
    if ds not in DATASETS:
      raise app.UsageError(f'Unknown toy dataset {ds!r}: use mog1d or checkerboard.')
  if FLAGS.jobs < 1:
    raise app.UsageError(f'--jobs must be at least 1, got {FLAGS.jobs}.')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  tic = time.time()
  stages = make_stages()
  for s in stages:
    print(f'  python main.py --config configs/toy/{s["dataset"]}_{FLAGS.sde}.py '
          f'--workdir {s["workdir"]} --mode train '
          f'--config.training.score_matching_order={s["order"]} '
          f'--config.training.n_iters={s["steps"]} '
          f'--config.training.batch_size={s["opts"]["batch_size"]}'
          + (f' --config.model.decoder_layers="({",".join(FLAGS.decoder_layers)},)"'
             if FLAGS.decoder_layers != ['512', '512'] else '')
          + (f' --config.training.restore_from={s["restore_from"]} '
             '--config.training.restore_optimizer=False '
             f'--config.optim.lr={FLAGS.finetune_lr} '
             f'--config.optim.schedule={FLAGS.finetune_schedule}' if s['restore_from'] else ''))
  results = run_all(stages)
  rows = []
  for ds in FLAGS.datasets:
    rows += dataset_rows(ds, stages, results)
    plot_density(ds, stages, os.path.join(FLAGS.workdir, f'density_{ds}.png'))
  write_table(rows)
  print(f'Demo done in {(time.time() - tic) / 60:.1f} min; outputs in {FLAGS.workdir}.')


if __name__ == '__main__':
  app.run(main)
