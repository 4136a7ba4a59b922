"""Run the fault-injection trials of tests/reliability.py; print the table of docs/reliability.md.

  .venv/bin/python scripts/reliability_table.py [--kills 12] [--seed 0] [--json out.json]

Each row is one kind of fault, how many times it was injected and what happened; --json also
writes every trial's record (kill moments, resume steps, checksums, timings). Takes a few minutes
on a 2-core CPU (each trial is a python main.py subprocess on the toy MOG1D config).
"""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)

import reliability as rt


def _checked(check, rec):
  """(ok, note): whether the record passes the test's assertions."""
  try:
    check(rec)
    return True, ''
  except AssertionError as e:
    return False, f' FAILED: {str(e)[:300]}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=12)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='write every record here')
  args = parser.parse_args()
  rows, records = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    base = rt.train_base(os.path.join(tmp, 'base'))

    rec = rt.sigkill_trials(os.path.join(tmp, 'sigkill'), kills=args.kills, seed=args.seed)
    records['sigkill'] = rec
    ok, note = _checked(lambda r: rt.check_sigkill_record(r, min_kills=args.kills), rec)
    resumed = sorted({t['resume_step'] for t in rec['trials'] if t['resume_step'] is not None})
    rows.append(('SIGKILL at seeded random moments (start-up, training loop, as a checkpoint '
                 'tmp dir appears), restarted with the same command',
                 f"{rec['kills']} kills ({rec['kills_during_checkpoint_write']} during a checkpoint "
                 'write)',
                 ('each restart resumed from the newest complete checkpoint (steps '
                  f"{', '.join(map(str, resumed))}); no tmp dir left; final params "
                  f"{'bitwise equal' if rec['bitwise_equal'] else 'DIFFERENT'} to an uninterrupted "
                  f"run (checksum {rec['checksums'][0][0] if rec['checksums'][0] else '?'})"
                  if ok else 'FAILED') + note))

    rec = rt.nonfinite_stop_trial(base, os.path.join(tmp, 'stop'))
    records['nonfinite_stop'] = rec
    ok = (rec['returncode'] == 3 and 'Non-finite loss at step 6' in rec['last_line']
          and rec['checkpoints_unchanged'])
    rows.append(("NaN in every input of step 6, training.nonfinite='stop'", '1',
                 f"exit {rec['returncode']}, one line: `{rec['last_line'][:70]}...`; checkpoints "
                 f"{'byte-identical (files, sizes, mtimes)' if rec['checkpoints_unchanged'] else 'CHANGED'}"
                 + ('' if ok else ' FAILED')))

    rec = rt.nonfinite_skip_trial(base, os.path.join(tmp, 'skip'))
    records['nonfinite_skip'] = rec
    ok = (rec['returncode'] == 0 and rec['all_finite'] and rec['step6_kept_step5']
          and rec['logged_skips'] == 1)
    rows.append(("NaN in every input of step 6, training.nonfinite='skip'", '1',
                 f"exit {rec['returncode']}, skipped steps counted: {rec['logged_skips']}; step-6 "
                 f"params/EMA/optimizer state {'= step 5' if rec['step6_kept_step5'] else 'CHANGED'}; "
                 f"saved arrays {'all finite' if rec['all_finite'] else 'NON-FINITE'}"
                 + ('' if ok else ' FAILED')))

    outcomes = []
    for damage in sorted(rt.DAMAGE):
      rec = rt.damaged_trial(base, os.path.join(tmp, 'damage', damage.replace(' ', '_')), damage)
      records[f'damaged: {damage}'] = rec
      ok = rec['returncode'] == 0 and rec['named'] == rec['damaged'] and rec['resume_step'] == 2
      outcomes.append(f"{damage}: {'named, resumed at step 2' if ok else 'FAILED'}")
    rows.append(('Latest meta and periodic checkpoints damaged on disk', str(len(rt.DAMAGE)),
                 '; '.join(outcomes)))
    rec = rt.damaged_trial(base, os.path.join(tmp, 'damage_all'), 'garbled array bytes',
                           all_checkpoints=True)
    records['damaged: all'] = rec
    rows.append(('Every checkpoint damaged', '1',
                 f"exit {rec['returncode']}, one line naming them and the fix; checkpoints "
                 f"{'untouched' if rec['unchanged'] else 'CHANGED'}"))

    bad_tmp = os.path.join(tmp, 'bad')
    os.makedirs(bad_tmp)
    recs = [rt.bad_input_trial(base, bad_tmp, *case) for case in rt.BAD_INPUT]
    records['bad_input'] = recs
    good = [r for r in recs if r['returncode'] == 2 and len(r['lines']) == 1
            and not r['words_missing'] and r['unchanged'] and not r['compiled']]
    bad = [r['name'] for r in recs if r not in good]
    rows.append(('Bad input: ' + ', '.join(r['name'] for r in recs), str(len(recs)),
                 f'{len(good)}/{len(recs)} exit 2 with one stderr line naming problem and fix, '
                 'workdir files and mtimes unchanged, nothing compiled; '
                 f"{min(r['seconds'] for r in recs):.1f}-{max(r['seconds'] for r in recs):.1f} s "
                 'each' + (f"; FAILED: {', '.join(bad)}" if bad else '')))

  print('| fault | trials | outcome |')
  print('|---|---|---|')
  for row in rows:
    print('| ' + ' | '.join(c.replace('|', '/') for c in row) + ' |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=1, default=str)


if __name__ == '__main__':
  main()
