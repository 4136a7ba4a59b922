"""The parts of an evaluation (eval_lib.evaluate): the per-batch computations of the bits/dim loop
(BatchPart) and how results are stored (atomic files), checked against the settings that made
them, and summarised."""
import csv
import io
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import likelihood
import names
import parallel

# Fields whose change alters stored eval results: a rerun into the same eval folder must match.
_RESULT_FIELDS = {
  'seed': None, 'data': None, 'model': None, 'sampling': None,
  'training': ('sde', 'continuous', 'smallest_time', 'reduce_mean', 'likelihood_weighting',
               'importance_weighting', 'score_matching_order', 'loss_weights', 'exact_jacobian'),
  'eval': ('batch_size', 'bpd_dataset', 'bound', 'dsm', 'offset', 'bound_num_times', 'dequantizer',
           'rtol', 'atol', 'hutchinson_type', 'likelihood_solver', 'inception_handle',
           'ode_score_nt', 'num_deq_samples'),
}
# Newer fields left out of settings.json at these values, so older eval folders still match.
_OMITTED_AT = {('eval', 'num_deq_samples'): 1}


class BatchPart(NamedTuple):
  """One per-batch evaluation of the bits/dim loop.

  fn(rng, params, model_state, batch) -> dict of arrays, per example (B,) or per batch (scalar);
  batch = {'image': dequantized data in the model's space (B, ...), 'deq_bpd': (B,) the
  dequantizer's bits/dim correction}. Saved to ckpt_N/<name>/batch_R_I.npz, skipped when stored,
  and averaged into the summary (keys prefixed '<name>_' unless name is 'bpd').
  """
  name: str
  fn: Callable[..., Any]


def save_npz(path, **arrays):
  """np.savez_compressed to a temporary file, then an atomic rename onto path."""
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def write_text(path, text):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def load_npz(path):
  with np.load(path) as data:
    return {k: np.asarray(data[k]) for k in data.files}


def _result_settings(config):
  """The config fields that the stored results depend on (_RESULT_FIELDS), JSON-normalised."""
  out = {}
  for section, fields in _RESULT_FIELDS.items():
    node = config[section]
    if fields is None:
      out[section] = node.to_dict() if hasattr(node, 'to_dict') else node
    else:
      out[section] = {f: node[f] for f in fields
                      if f in node and _OMITTED_AT.get((section, f), object()) != node[f]}
  return json.loads(json.dumps(out, default=str, sort_keys=True))


def _flat(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else k))
  return out


def check_settings(eval_dir, config, is_main):
  """Refuse to mix results of different settings in one eval folder; record them on first use."""
  path = os.path.join(eval_dir, 'settings.json')
  now = _result_settings(config)
  if os.path.exists(path):
    with open(path) as f:
      before, after = _flat(json.load(f)), _flat(now)
    diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if diff:
      raise ValueError(f'{eval_dir} holds results made with other settings ({", ".join(diff[:6])}'
                       f'{" ..." if len(diff) > 6 else ""} differ): pass another --eval_folder, or '
                       'delete that folder to start over.')
  elif is_main:
    write_text(path, json.dumps(now, indent=2, sort_keys=True))


def get_dequantize_fn(config, workdir, deq_folder, sde=None, inverse_scaler=None):
  """dequantize_fn(rng, images in [0, 1]) -> (dequantized images in [0, 1], bpd correction (B,)).

  eval.dequantizer 'uniform' (score_flow's evaluation): (x * 255 + u) / 256, u ~ U[0, 1), no
  correction; 'flowpp': the Flow++ dequantizer of --mode train_deq (deq_lib.py);
  'truncated_normal' (needs sde and inverse_scaler): truncated_normal_dequantize_fn. Flat toy
  data are used as they are.
  """
  name = names.dequantizer_name(config.eval.dequantizer)
  if name == 'flowpp':
    import deq_lib
    return deq_lib.get_dequantize_fn(config, workdir, deq_folder)
  if names.is_toy(config):
    return lambda rng, x: (x, jnp.zeros(x.shape[:1], x.dtype))
  bits = likelihood.num_bits(config)
  if name == 'truncated_normal':
    return truncated_normal_dequantize_fn(sde, inverse_scaler, config.training.smallest_time, bits)

  @jax.jit
  def uniform(rng, images):
    u = jax.random.uniform(rng, images.shape, images.dtype)
    return likelihood.dequantize(images, u, bits), jnp.zeros(images.shape[:1], images.dtype)

  return uniform


def truncated_normal_dequantize_fn(sde, inverse_scaler, eps, bits=8):
  """i-DODE's training-free dequantizer (Zheng et al. 2023), as a get_dequantize_fn function.

  Noise in bin k of x = k / (2^b - 1) (position f in [0, 1) of likelihood.dequantize) is drawn
  from N(x, s^2) truncated to [0, 1], s = 2^b sigma_eps / (alpha_eps scale): the model's own
  perturbation at t = eps in pixel units (scale = d scaler / dx). i-DODE centred it on the bin
  centre, where its training data lay; ours lie at x (fraction x of the bin). The correction is
  log q(f) / (D ln 2), as Flow++'s: log q = log phi(z) - log s - log(Phi(b) - Phi(a)).
  """
  ones = jnp.ones((1,))
  mean, std = sde.marginal_prob(ones, jnp.full((1,), eps))
  slope = jax.grad(lambda x: jnp.sum(inverse_scaler(x)))(0.)
  s = float(2. ** bits * std[0] * slope / mean[0])

  @jax.jit
  def dequantize(rng, images):
    lower, upper = -images / s, (1. - images) / s
    z = jax.random.truncated_normal(rng, lower, upper, images.shape, images.dtype)
    f = jnp.clip(images + s * z, 0., 1. - 1e-6)
    log_z = jnp.log(jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower))
    log_q = jax.scipy.stats.norm.logpdf(z) - np.log(s) - log_z
    dim = int(np.prod(images.shape[1:]))
    correction = jnp.sum(log_q.reshape(images.shape[0], -1), axis=1) / (dim * np.log(2.))
    return likelihood.dequantize(images, f, bits), correction

  return dequantize


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


def write_summary_csv(eval_dir):
  """summary.csv rebuilt from every ckpt_N/summary.json: one row per checkpoint (idempotent, so a
  rerun never duplicates a row)."""
  rows = []
  for name in os.listdir(eval_dir):
    path = os.path.join(eval_dir, name, 'summary.json')
    if name.startswith('ckpt_') and os.path.isfile(path):
      with open(path) as f:
        rows.append(json.load(f))
  rows = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
  rows.sort(key=lambda r: r['ckpt'])
  keys = ['ckpt', 'step'] + sorted({k for r in rows for k in r} - {'ckpt', 'step'})
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys)
  writer.writeheader()
  writer.writerows(rows)
  write_text(os.path.join(eval_dir, 'summary.csv'), buf.getvalue())


