"""How evaluation results are stored: atomic writes of .npz and text files, the settings.json
that keeps results of different settings out of one eval folder, the source.txt that keeps the
results of two checkpoint files of one name apart, and summary.csv."""
import csv
import io
import json
import os

import numpy as np

import names

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


def save_npz(path, **arrays):
  """np.savez_compressed to a temporary file, then an atomic rename onto path."""
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def write_text(path, text):
  """text to a temporary file, then an atomic rename onto path."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def load_npz(path):
  """{name: array} of an .npz file, read whole."""
  with np.load(path) as data:
    return {k: np.asarray(data[k]) for k in data.files}


def result_settings(config):
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
  now = result_settings(config)
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


def check_source(folder, path, record):
  """Refuse a folder that holds the results of another file of the same name (folder/source.txt:
  the real path of the checkpoint file its results are of); with `record`, write it on first use."""
  source, now = os.path.join(folder, 'source.txt'), os.path.realpath(path)
  if os.path.isfile(source):
    with open(source) as f:
      before = f.read().strip()
    if before != now:
      raise ValueError(f'{folder} holds the results of {before}, not of {now}: pass another '
                       '--eval_folder, or delete that folder to start over.')
  elif record:
    write_text(source, now + '\n')


def write_summary_csv(eval_dir):
  """summary.csv rebuilt from the summary.json of every checkpoint's folder (ckpt_N, or the name
  of an eval.restore_from file): one row each (idempotent, so a rerun never duplicates a row)."""
  rows = []
  for name in os.listdir(eval_dir):
    path = os.path.join(eval_dir, name, names.EVAL_SUMMARY)
    if os.path.isfile(path):
      with open(path) as f:
        rows.append(json.load(f))
  rows = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
  rows.sort(key=lambda r: (r['ckpt'], r.get('restore_from', '')))
  keys = ['ckpt', 'step'] + sorted({k for r in rows for k in r} - {'ckpt', 'step'})
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys)
  writer.writeheader()
  writer.writerows(rows)
  write_text(os.path.join(eval_dir, names.EVAL_SUMMARY_CSV), buf.getvalue())
