"""The per-batch evaluations of the bits/dim loop (eval_lib.evaluate): bits/dim by the ODE or the
bound and the ScoreODE diagnostics (BatchPart), the K-sample importance-weighted estimate, and
the means, standard errors and per-time tables they are summarised into."""
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import likelihood
import names
import parallel
from eval_files import save_npz, write_text


class BatchPart(NamedTuple):
  """One per-batch evaluation of the bits/dim loop.

  fn(rng, params, model_state, batch) -> dict of arrays, per example (B,) or per batch (scalar);
  batch = {'image': dequantized data in the model's space (B, ...), 'deq_bpd': (B,) the
  dequantizer's bits/dim correction}. Saved to ckpt_N/<name>/batch_R_I.npz, skipped when stored,
  and averaged into the summary (keys prefixed '<name>_' unless name is 'bpd').
  """
  name: str
  fn: Callable[..., Any]


def iw_bpd(bpd_draws, dim):
  """K-sample importance-weighted bits/dim from per-draw bits/dim (K, B): -log2 of the mean
  over draws of 2^(-D bpd_k), over D (K = 1: bpd itself; decreases toward -log2 P(x) / D)."""
  k = bpd_draws.shape[0]
  log_mean = jax.scipy.special.logsumexp(-bpd_draws * dim * np.log(2.), axis=0) - np.log(k)
  return -log_mean / (dim * np.log(2.))


def run_part(part, keys, params, model_state, draws):
  """part.fn on each dequantized draw (keys[k], draws[k]); with K > 1 draws its 'bpd' becomes
  iw_bpd of the K draws and 'bpd_k1' the mean of the per-draw bits/dim (the K = 1 estimate)."""
  outs = [part.fn(key, params, model_state, batch) for key, batch in zip(keys, draws)]
  if len(outs) == 1:
    return outs[0]
  per_draw = jnp.stack([o['bpd'] for o in outs])
  out = dict(outs[0], bpd=iw_bpd(per_draw, int(np.prod(draws[0]['image'].shape[1:]))),
             bpd_k1=jnp.mean(per_draw, axis=0))
  if 'nfe' in out:
    out['nfe'] = sum(o['nfe'] for o in outs)
  return out


def get_batch_parts(config, sde, model, inverse_scaler):
  """The per-batch evaluations of the bits/dim loop (see BatchPart), in the order they run."""
  import bound_likelihood
  e = config.eval
  images = not names.is_toy(config)
  eps = config.training.smallest_time
  parts = []
  if e.enable_bpd:
    if e.bound:
      bound_fn = bound_likelihood.get_bound_fn(
        sde, model, inverse_scaler, dsm=e.dsm, eps=eps, importance_weighting=True, offset=e.offset,
        N=e.bound_num_times, hutchinson_type=e.hutchinson_type, data_is_images=images,
        return_nll=True, bits=likelihood.num_bits(config))

      def bpd_fn(rng, params, model_state, batch):
        bpd, nll = bound_fn(rng, params, model_state, batch['image'])
        return _bpd_outputs(bpd + batch['deq_bpd'], nll, None, images)
    else:
      method = str(e.likelihood_solver).lower()
      lik_fn = likelihood.get_likelihood_fn(
        sde, model, inverse_scaler, hutchinson_type=e.hutchinson_type, rtol=e.rtol, atol=e.atol,
        method=method, eps=eps, exact_div=likelihood.use_exact_div(config), data_is_images=images,
        return_nll=True, bits=likelihood.num_bits(config))

      def bpd_fn(rng, params, model_state, batch):
        data = batch['image'] if method == 'jax' else parallel.host(batch['image'])
        bpd, _, nfe, nll = lik_fn(rng, params, model_state, data)
        return _bpd_outputs(bpd + batch['deq_bpd'], nll, nfe, images)
    parts.append(BatchPart('bpd', bpd_fn))
  if e.enable_ode_score:
    import ode_score
    score_gap_fn = ode_score.get_ode_score_fn_from_config(config, sde, model)

    def ode_score_fn(rng, params, model_state, batch):
      # (nt,) batch means of the ScoreODE score diagnostics on the same dequantized batches.
      return score_gap_fn(rng, params, model_state, batch['image'])
    parts.append(BatchPart('ode_score', ode_score_fn))
  return parts


def ode_score_summary(per_batch, ckpt_dir, is_main):
  """Per-time means over batches of the ode_score part -> ckpt_N/ode_score.{npz,csv}; the
  summary keeps the mean over t of each diagnostic."""
  import ode_score
  means = {k: np.mean(np.stack(v), axis=0) for k, v in per_batch.items() if k != 'seconds'}
  if is_main:
    save_npz(os.path.join(ckpt_dir, 'ode_score.npz'), **means)
    keys = ['ts'] + [k for k in ode_score.DIAGNOSTICS if k in means]
    lines = [','.join(keys)] + [','.join(f'{means[k][i]:.8g}' for k in keys)
                                for i in range(len(means['ts']))]
    write_text(os.path.join(ckpt_dir, 'ode_score.csv'), '\n'.join(lines) + '\n')
  return {f'ode_score_{k}': float(np.mean(means[k])) for k in ode_score.DIAGNOSTICS
          if k in means}


def _bpd_outputs(bpd, nll, nfe, images):
  out = {'bpd': bpd}
  if not images:
    out['nll'] = nll  # nats, for flat toy data (whose published numbers are NLLs)
  if nfe is not None:
    out['nfe'] = jnp.asarray(nfe)
  return out


def mean_results(per_batch, prefix=''):
  """{key: [arrays per batch]} -> means over examples (per-example keys) or batches (scalars),
  with the count and standard error of the per-example ones."""
  out = {}
  for k, arrays in per_batch.items():
    name = f'{prefix}{k}'
    if all(np.ndim(a) == 0 for a in arrays):
      out[name] = float(np.mean(arrays))
    else:
      v = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
      out[name] = float(v.mean())
      out[f'{name}_n'] = int(v.size)
      out[f'{name}_sem'] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float('nan')
  return out


def _mean_sem(v):
  v = np.asarray(v, np.float64)
  sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float('nan')
  return {'mean': float(v.mean()), 'sem': sem, 'n': int(v.size)}


def repeat_reports(bpd_batches, index):
  """Per-repeat and per-batch bits/dim (mean, standard error, count) of per-example bpd arrays
  listed in the order of index [(repeat, batch)], and the standard error between repeat means."""
  per_batch = [dict(repeat=r, batch=i, **_mean_sem(np.ravel(v)))
               for (r, i), v in zip(index, bpd_batches)]
  repeats = sorted({r for r, _ in index})
  per_repeat = [dict(repeat=r, **_mean_sem(np.concatenate(
    [np.ravel(v) for (q, _), v in zip(index, bpd_batches) if q == r]))) for r in repeats]
  means = [row['mean'] for row in per_repeat]
  return {'bpd_per_repeat': per_repeat, 'bpd_per_batch': per_batch,
          'bpd_between_repeats_sem': _mean_sem(means)['sem']}
