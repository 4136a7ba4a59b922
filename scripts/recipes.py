"""The paper's image results that the original code covers, as commands of this CLI: the one
place the `recipes` section of docs/recipes.md is generated from (`python scripts/recipes.py
--write`; `--check` says whether docs/recipes.md still matches) and that recipes_test.py runs at
tiny sizes.

A recipe row: one experiment (a released first-order checkpoint and its config), one DSM order
(1: first-order training continued for the same steps, the fair baseline; 2; 3), one result
(exact bits/dim by the probability-flow ODE with uniform dequantization, the variational bound,
bits/dim with score_flow's Flow++ dequantizer, FID), the commands that give it (order 1's also
score the released checkpoint itself, --config.eval.restore_from), the paper's number where it is
transcribed here, and an estimate of accelerator hours.
"""
import argparse
import dataclasses
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs
import doc_sections

SECTION = 'recipes'  # the generated section of DOC (doc_sections)
DOC = os.path.join(doc_sections.DOCS, 'recipes.md')

ORDERS = (1, 2, 3)
# mle_score_ode's default configs: "First and second order score: batch_size = 128" (commented
# out) and "Third score: batch_size = 48" (the value the configs ship; ours too).
BATCH = {1: 128, 2: 128, 3: 48}

# ---- the hours estimate: every figure below is an assumption or a CPU measurement, none is an
# accelerator measurement.
ASSUMED_TFLOPS = 40.  # sustained float32 (TF32) throughput of one current data-centre GPU: a guess
# XLA cost analysis of the order-2 / order-3 step over order 1, full-size CIFAR-10 DDPM++ and
# NCSN++ (docs/performance.md, train step: 2.02x and 4.10x for both); assumed for the deep
# DDPM++ too.
ORDER_FLOPS = {1: 1., 2: 2.02, 3: 4.10}
ASSUMED_NFE = 200  # function evaluations per adaptive RK45 solve (bits/dim, ODE sampler): a guess
FID_SAMPLES = 50000
TEST_IMAGES = {'CIFAR10': 10000, 'ImageNet': 50000}

RESULTS = {  # name: what the eval measures
  'bpd': 'bits/dim, probability-flow ODE (uniform dequantization)',
  'bound': 'variational bound, bits/dim',
  'bpd_deq': 'bits/dim, ODE with the Flow++ dequantizer (train_deq, then eval)',
  'fid': 'FID, 50k ODE samples',
}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A released first-order checkpoint, the config it fine-tunes with and the cost figures."""
  key: str
  title: str
  config: str
  start: str  # the path the commands read the released checkpoint from (after downloading it)
  source: str  # where it was published and what its file is
  start_step: Optional[int]  # the step stored in the file, where known from the original configs
  gflop: float  # XLA flops of one order-1 training step (value and grad) per example, measured
  results: tuple = ('bpd', 'bound', 'bpd_deq', 'fid')


_STATE = ("a flax msgpack of score_sde's `State`: `step`, `optimizer` (flax.optim Adam: `target` = "
          'the params, `state.step`, `state.param_states.*.{grad_ema, grad_sq_ema}`), `lr`, '
          '`model_state`, `ema_rate`, `params_ema`, `rng`; GroupNorm scale / bias may be stored '
          '(1, 1, 1, C). `training.restore_from` continues all of it (Adam moments, step, EMA)')

EXPERIMENTS = (
  Experiment(
    'cifar10_vp', 'CIFAR-10, VP SDE, DDPM++ deep', 'configs/vp/cifar10_ddpmpp_deep_continuous.py',
    'released/score_flow/cifar10_deep_vp/checkpoints/checkpoint_19',
    "score_flow's Google Drive (linked from its README and mle_score_ode's): the folder "
    '`cifar10_deep_vp...` whose name matches the config (deep, VP, no `likelihood`, no `iw`; '
    'which flip variant the paper took is not stated), `checkpoints/checkpoint_19`, the last of '
    "score_flow's 950,001-step run (n_iters 950001, eval checkpoint 19 in its config); " + _STATE,
    950000, 105.15),
  Experiment(
    'cifar10_ve', 'CIFAR-10, VE SDE, NCSN++', 'configs/ve/cifar10_ncsnpp_continuous.py',
    'released/score_sde/ve/cifar10_ncsnpp_continuous/checkpoint_26',
    "score_sde's Google Drive (linked from mle_score_ode's README): the checkpoint of "
    '`cifar10_ncsnpp_continuous`, `checkpoint_26`, the last of the 1,300,001-step run '
    '(26 x snapshot_freq 50,000; the number is our reading of the configs, the step is read '
    'from the file); ' + _STATE, 1300000, 61.53),
  Experiment(
    'imagenet32_ve', 'ImageNet 32x32, VE SDE, NCSN++', 'configs/ve/imagenet32_ncsnpp_continuous.py',
    'released/mle_score_ode/imagenet32_ve/checkpoint',
    "the authors' own first-order model (score_sde released none), on the Releases page of "
    'LuChengTHU/mle_score_ode (its step is read from the file); ' + _STATE,
    None, 61.53, ('bpd', 'bound', 'bpd_deq')),
)

# The paper's published CIFAR-10 results (Lu et al., ICML 2022; VE, second / third order): 3.44 /
# 3.38 bits/dim, FID 2.37 / 2.95. It does not say which dequantization the bits/dim used; the
# README of the paper's code (mle_score_ode) says its models were not trained with variational
# dequantization.
PAPER = {('cifar10_ve', 2, 'bpd'): '3.44', ('cifar10_ve', 3, 'bpd'): '3.38',
         ('cifar10_ve', 2, 'fid'): '2.37', ('cifar10_ve', 3, 'fid'): '2.95'}
NOT_HELD = 'in the paper, not transcribed here'


def last_checkpoint(n_iters, snapshot_freq):
  """The number of the last checkpoint_N a run to n_iters writes (train_lib.run_loop saves
  checkpoint_{step // snapshot_freq} at every multiple of snapshot_freq and at n_iters)."""
  return max(n_iters // snapshot_freq, 1)


def workdir(exp, order):
  """The fine-tuning run's workdir of one experiment and order (its evals read it too)."""
  return f'runs/paper/{exp.key}_order{order}'


def released_workdir(exp):
  """The workdir where the released checkpoint itself is scored (and its dequantizer trained)."""
  return f'runs/paper/{exp.key}_released'


def _main(config, wd, mode, *args):
  """A main.py command as an argument list (every flag --name=value, as recipes_test parses)."""
  return ['python', 'main.py', f'--config={config}', f'--workdir={wd}', f'--mode={mode}', *args]


def finetune_command(exp, order, n_iters):
  """Fine-tune the released checkpoint with order-`order` DSM to the config's n_iters."""
  return _main(exp.config, workdir(exp, order), 'train',
               f'--config.training.score_matching_order={order}',
               f'--config.training.restore_from={exp.start}',
               f'--config.training.batch_size={BATCH[order]}', f'--config.training.n_iters={n_iters}')


def eval_commands(exp, order, result, ckpt, num_repeats):
  """[(label, argv)] of one result on checkpoint_ckpt of the fine-tuned workdir."""
  pick = [f'--config.eval.begin_ckpt={ckpt}', f'--config.eval.end_ckpt={ckpt}']
  return _evals(exp, workdir(exp, order), result, pick, [f'--config.eval.ckpt_id={ckpt}'],
                num_repeats)


def released_commands(exp, result, num_repeats):
  """[(label, argv)] of one result on the released checkpoint itself (the start file, scored as
  it is: --config.eval.restore_from, its EMA params)."""
  pick = [f'--config.eval.restore_from={exp.start}']
  return _evals(exp, released_workdir(exp), result, pick, pick, num_repeats)


def _evals(exp, wd, result, pick, deq_pick, num_repeats):
  """[(label, argv)] of one result in workdir wd on the checkpoint the flags `pick` (eval) and
  `deq_pick` (train_deq) name."""
  bpd = ['--config.eval.enable_bpd=True', '--config.eval.enable_sampling=False',
         '--config.eval.bpd_dataset=test', f'--config.eval.num_repeats={num_repeats}', *pick]
  if result == 'bpd':
    return [('eval', _main(exp.config, wd, 'eval', '--eval_folder=eval_bpd', *bpd))]
  if result == 'bound':
    return [('eval', _main(exp.config, wd, 'eval', '--eval_folder=eval_bound', *bpd,
                           '--config.eval.bound=True'))]
  if result == 'bpd_deq':
    return [('train_deq', _main(exp.config, wd, 'train_deq', '--deq_folder=deq', *deq_pick)),
            ('eval', _main(exp.config, wd, 'eval', '--eval_folder=eval_deq', '--deq_folder=deq',
                           *bpd, '--config.eval.dequantizer=True'))]
  if result == 'fid':
    return [('fid_stats', _main(exp.config, 'runs/paper/fid_stats', 'fid_stats')),
            ('eval', _main(exp.config, wd, 'eval', '--eval_folder=eval_fid',
                           '--config.eval.enable_bpd=False', '--config.eval.enable_sampling=True',
                           f'--config.eval.num_samples={FID_SAMPLES}', *pick))]
  raise ValueError(f'unknown result {result!r}: one of {", ".join(RESULTS)}')


@dataclasses.dataclass(frozen=True)
class Row:
  """One result of one experiment and order: its commands, the paper's number, the hours."""
  exp: Experiment
  order: int
  result: str
  commands: tuple  # ((label, argv), ...): the fine-tune, its evals, then (order 1) the released
  paper: str
  hours: str


def _hours(seconds):
  """Seconds as hours with one decimal."""
  return f'{seconds / 3600:.1f}'


def _cost(exp, order, result, config):
  """'fine-tune h + eval h' (an estimate from the assumptions above) for one row."""
  rate = ASSUMED_TFLOPS * 1e3  # GFLOP/s
  per_100k = 1e5 * BATCH[order] * exp.gflop * ORDER_FLOPS[order] / rate
  if exp.start_step is None:
    train = f'{_hours(per_100k)} per 100k steps'
  else:
    train = _hours(per_100k * (config.training.n_iters - exp.start_step) / 1e5)
  images = TEST_IMAGES[config.data.dataset] * config.eval.num_repeats
  forward = exp.gflop / 3  # a forward pass: about a third of a value-and-grad step
  evals = {'bpd': images * ASSUMED_NFE * exp.gflop,  # forward + one vector-Jacobian product
           'bound': images * config.eval.bound_num_times * forward,
           'fid': FID_SAMPLES * ASSUMED_NFE * forward}
  if result not in evals:
    return f'{train} + eval as bpd ({_hours(evals["bpd"] / rate)}) + train_deq (not estimated)'
  return f'{train} + {_hours(evals[result] / rate)}'


def rows():
  """Every recipe row, experiments in EXPERIMENTS order, then order, then result."""
  out = []
  for exp in EXPERIMENTS:
    config = configs.load(exp.config)
    t = config.training
    ckpt = last_checkpoint(t.n_iters, t.snapshot_freq)
    for order in ORDERS:
      for result in exp.results:
        cmds = (('train', finetune_command(exp, order, t.n_iters)),
                *eval_commands(exp, order, result, ckpt, config.eval.num_repeats),
                *(released_commands(exp, result, config.eval.num_repeats) if order == 1 else ()))
        out.append(Row(exp, order, result, cmds, PAPER.get((exp.key, order, result), NOT_HELD),
                       _cost(exp, order, result, config)))
  return out


def _shell(argv):
  """An argument list as the line docs/recipes.md shows (no value needs quoting)."""
  return ' '.join(argv)


def markdown():
  """docs/recipes.md's generated section body (between its doc_sections markers)."""
  all_rows = rows()
  lines = [
    '| experiment | order | result | paper | accelerator hours (estimate: fine-tune + eval) |',
    '|---|---|---|---|---|']
  for r in all_rows:
    lines.append(f'| {r.exp.title} | {r.order} | {RESULTS[r.result]} | {r.paper} | {r.hours} |')
  lines += ['', 'Hours are estimates, not measurements: steps x batch x the XLA flops of one '
            f'training step per example (measured here on CPU: {EXPERIMENTS[1].gflop} GFLOP for '
            f'NCSN++, {EXPERIMENTS[0].gflop} for DDPM++ deep, order 1; orders 2 / 3 at '
            f'{ORDER_FLOPS[2]}x / {ORDER_FLOPS[3]}x) at an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s '
            f'sustained on one GPU; evals assume {ASSUMED_NFE} function evaluations per ODE '
            'solve (forward + one vector-Jacobian product for bits/dim, forward only for the '
            'bound and sampling); Inception and the dequantizer\'s training are not counted. '
            'Order 1\'s evals run twice, on its fine-tuned checkpoint and on the released one '
            'itself.', '',
            'Paper numbers: the published CIFAR-10 results (VE, second / third order: 3.44 / '
            '3.38 bits/dim, FID 2.37 / 2.95). The paper does not name the dequantization; they '
            'sit in the uniform rows because the README of its code (mle_score_ode) says the '
            f'models were not trained with variational dequantization. "{NOT_HELD}": see the '
            'paper (arXiv 2206.08265).']
  seen, stats = set(), {}  # each command once; fid_stats once per dataset (one stats file)
  for exp in EXPERIMENTS:
    config = configs.load(exp.config)
    mine = [r for r in all_rows if r.exp is exp]
    lines += ['', f'**{exp.title}** (`{exp.config}`). Start from {exp.source}. Download it to '
              f'`{exp.start}` (or change that path). Fine-tuning runs to the config\'s '
              f'n_iters ({config.training.n_iters:,}), as the original code resumed the released '
              'checkpoint until then (set --config.training.n_iters for another length). '
              'Evaluations read the last checkpoint that run writes; order 1\'s also score the '
              f'released file as it is (`--config.eval.restore_from`, in '
              f'`{released_workdir(exp)}`).', '', '```sh']
    for r in mine:
      for label, argv in r.commands:
        line = _shell(argv)
        if label == 'fid_stats':
          if stats.setdefault(config.data.dataset, line) != line:
            line = f'# Inception stats of {config.data.dataset}: made by the fid_stats command above'

        if line not in seen:
          seen.add(line)
          lines.append(line)
    lines.append('```')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--write', action='store_true', help='rewrite the section in docs/recipes.md')
  parser.add_argument('--check', action='store_true', help='exit 1 if docs/recipes.md differs')
  args = parser.parse_args()
  doc_sections.write_or_check(SECTION, markdown(), args.write, args.check, DOC)


if __name__ == '__main__':
  main()
