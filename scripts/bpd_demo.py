"""Bits/dim you can trust, on a CPU in minutes: data of exactly known entropy (PATTERNS, 8x8x1, four
grey levels scored as --bits-bit data), a tiny DDPM++ (VP) score model (run_lib.train), its exact
ODE bits/dim with uniform dequantization (run_lib.evaluate), the Flow++ dequantizer trained against
the frozen model (run_lib.train_deq), the ODE bits/dim with it, with i-DODE's truncated normal,
each with K = 1 and the K-sample importance-weighted estimate, and the variational bound of the
same model. Every dequantized bits/dim bounds the discrete cross-entropy, so none can fall below
the entropy; all are paired on the same test images.

  .venv/bin/python scripts/bpd_demo.py --workdir runs/bpd_demo

Writes results.csv, results.md, bpd_demo.png (bars with 2-SE error bars, data samples) to
--workdir; rerunning resumes every stage (checkpoints, stored eval batches).
"""
import argparse
import copy
import csv
import json
import logging
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configs


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default='runs/bpd_demo')
  p.add_argument('--config', default=os.path.join(ROOT, 'configs/tiny/patterns_ddpmpp.py'))
  p.add_argument('--bits', type=int, default=2, help='data.num_bits the four levels are scored at')
  p.add_argument('--score_steps', type=int, default=1000)
  p.add_argument('--deq_steps', type=int, default=600)
  p.add_argument('--deq_lr', type=float, default=2e-3)
  p.add_argument('--order2_steps', type=int, default=0,
                 help='also fine-tune with second-order DSM this many steps (ODE and bound)')
  p.add_argument('--n_eval', type=int, default=192, help='test images (multiple of 64)')
  p.add_argument('--K', type=int, default=4, help='dequantization draws per image')
  p.add_argument('--tol', type=float, default=1e-4, help='ODE rtol = atol')
  p.add_argument('--bound_times', type=int, default=100)
  p.add_argument('--eps', type=float, default=1e-3, help='training.smallest_time (train and eval)')
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def base_config(args):
  config = configs.load(args.config)
  config.seed = args.seed
  config.data.num_bits = args.bits
  config.training.smallest_time = args.eps
  t = config.training
  t.n_iters = t.snapshot_freq = args.score_steps
  t.snapshot_freq_for_preemption = t.eval_freq = min(250, args.score_steps)
  t.log_freq = min(50, args.score_steps)
  e = config.eval
  e.begin_ckpt = e.end_ckpt = e.ckpt_id = 1
  e.enable_loss, e.enable_bpd, e.bpd_dataset, e.num_repeats = False, True, 'test', 1
  e.num_bpd_batches = args.n_eval // e.batch_size
  e.rtol = e.atol = args.tol
  e.bound_num_times = args.bound_times
  config.deq.n_iters, config.deq.lr = args.deq_steps, args.deq_lr
  return config


def evaluate(config, workdir, folder, **fields):
  """run_lib.evaluate with config.eval fields set -> (summary, per-example arrays by key)."""
  import run_lib
  config = copy.deepcopy(config)  # keeps eval.dequantizer's any-type field
  for k, v in {'dequantizer': 'uniform', 'num_deq_samples': 1, 'bound': False, **fields}.items():
    config.eval[k] = v
  summary = run_lib.evaluate(config, workdir, eval_folder=folder)
  bpd_dir = os.path.join(workdir, folder, 'ckpt_1', 'bpd')
  names = sorted(os.listdir(bpd_dir), key=lambda n: int(n[:-4].split('_')[2]))
  arrays = {}
  for name in names:
    with np.load(os.path.join(bpd_dir, name)) as f:
      for k in ('bpd', 'bpd_k1'):
        if k in f.files:
          arrays.setdefault(k, []).append(np.ravel(f[k]))
  return summary, {k: np.concatenate(v).astype(np.float64) for k, v in arrays.items()}


def _se(v):
  return float(np.std(v, ddof=1) / np.sqrt(len(v)))


def rows_of(entropy, floor, runs, reference):
  """One table row per estimate: mean +- SE, gap to the entropy, paired difference to reference."""
  rows = [dict(estimate='entropy (exact)', protocol='-', bpd=entropy, se=0., gap=0.,
               diff=float('nan'), diff_se=float('nan'))]
  rows.append(dict(estimate='-log2 P(x) / D of the same test images', protocol='-',
                   bpd=float(np.mean(floor)), se=_se(floor), gap=float(np.mean(floor)) - entropy,
                   diff=float('nan'), diff_se=float('nan')))
  for name, protocol, v in runs:
    d = v - reference
    rows.append(dict(estimate=name, protocol=protocol, bpd=float(np.mean(v)), se=_se(v),
                     gap=float(np.mean(v)) - entropy, diff=float(np.mean(d)), diff_se=_se(d)))
  return rows


def write_outputs(workdir, rows, meta, images):
  keys = ['estimate', 'protocol', 'bpd', 'se', 'gap', 'diff', 'diff_se']
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  fmt = lambda x: '-' if np.isnan(x) else f'{x:.4f}'
  lines = ['| estimate | protocol | bits/dim +- SE | - entropy | - uniform K=1 (paired) |',
           '|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['estimate']} | {r['protocol']} | {r['bpd']:.4f} +- {r['se']:.4f} | "
                 f"{r['gap']:.4f} | {fmt(r['diff'])} +- {fmt(r['diff_se'])} |")
  text = '\n'.join(lines) + '\n\n' + json.dumps(meta) + '\n'
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text, flush=True)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig = plt.figure(figsize=(11, 4.5))
  ax = fig.add_axes([0.07, 0.35, 0.6, 0.6])
  shown = rows[2:]
  ax.bar(range(len(shown)), [r['bpd'] for r in shown], yerr=[2 * r['se'] for r in shown],
         color='tab:blue', capsize=3)
  ax.axhline(rows[0]['bpd'], color='k', ls='--', label=f"entropy {rows[0]['bpd']:.4f}")
  ax.set_xticks(range(len(shown)))
  ax.set_xticklabels([f"{r['estimate']}\n{r['protocol']}" for r in shown], rotation=60,
                     ha='right', fontsize=7)
  ax.set_ylabel('bits/dim (2 SE bars)')
  ax.legend()
  for j in range(8):
    a = fig.add_axes([0.72 + 0.065 * (j % 4), 0.55 - 0.2 * (j // 4), 0.06, 0.15])
    a.imshow(images[j, ..., 0], cmap='gray', vmin=0, vmax=255)
    a.axis('off')
  fig.text(0.72, 0.75, 'test images')
  fig.savefig(os.path.join(workdir, 'bpd_demo.png'), dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(message)s')
  for name in ('absl', 'orbax', 'jax'):
    logging.getLogger(name).setLevel(logging.WARNING)
  import patterns_data
  import run_lib
  wd = os.path.abspath(args.workdir)
  os.makedirs(wd, exist_ok=True)
  config = base_config(args)
  times, tic = {}, time.time()
  run_lib.train(config, wd)
  times['score'] = time.time() - tic
  K = args.K
  runs, tic = [], time.time()
  _, uni = evaluate(config, wd, 'eval_uniform', dequantizer='uniform', num_deq_samples=K)
  times['eval_uniform'] = time.time() - tic
  tic = time.time()
  run_lib.train_deq(config, wd)
  times['deq'] = time.time() - tic
  tic = time.time()
  _, flow = evaluate(config, wd, 'eval_flowpp', dequantizer='flowpp', num_deq_samples=K)
  _, tn = evaluate(config, wd, 'eval_tn', dequantizer='truncated_normal', num_deq_samples=K)
  _, bound = evaluate(config, wd, 'eval_bound', dequantizer='uniform', bound=True)
  _, flow_bound = evaluate(config, wd, 'eval_bound_flowpp', dequantizer='flowpp', bound=True)
  times['eval_rest'] = time.time() - tic
  runs = []
  for name, r in (('uniform', uni), ('Flow++', flow), ('truncated normal', tn)):
    runs.append((name, 'ODE, K=1', r.get('bpd_k1', r['bpd'])))
    if K > 1:
      runs.append((name, f'ODE, K={K}', r['bpd']))
  runs += [
          ('uniform', f'bound (N={args.bound_times}), K=1', bound['bpd']),
          ('Flow++', f'bound (N={args.bound_times}), K=1', flow_bound['bpd'])]
  if args.order2_steps:
    tic = time.time()
    w2 = os.path.join(wd, 'order2')
    c2 = copy.deepcopy(config)
    c2.training.score_matching_order = 2
    c2.training.restore_from = os.path.join(wd, 'checkpoints', 'checkpoint_1')
    c2.training.restore_optimizer = False
    c2.training.n_iters = c2.training.snapshot_freq = args.order2_steps
    c2.training.snapshot_freq_for_preemption = c2.training.eval_freq = min(250, args.order2_steps)
    run_lib.train(c2, w2)
    _, o2 = evaluate(c2, w2, 'eval_uniform', dequantizer='uniform')
    _, o2b = evaluate(c2, w2, 'eval_bound', dequantizer='uniform', bound=True)
    runs += [('order 2: uniform', 'ODE, K=1', o2['bpd']),
             ('order 2: uniform', f'bound (N={args.bound_times}), K=1', o2b['bpd'])]
    times['order2'] = time.time() - tic
  test_images = patterns_data.pattern_arrays(config)['test'][0][:len(uni['bpd'])]
  floor = -patterns_data.log2_prob(config, test_images) / np.prod(test_images.shape[1:])
  rows = rows_of(patterns_data.entropy_bits_per_dim(config), floor, runs, runs[0][2])
  meta = {'n_eval': int(len(uni['bpd'])), 'K': K, 'bits': args.bits, 'tol': args.tol,
          'score_steps': args.score_steps, 'deq_steps': args.deq_steps,
          'seconds': {k: round(v, 1) for k, v in times.items()}}
  write_outputs(wd, rows, meta, test_images)
  return rows, meta


if __name__ == '__main__':
  main()
