"""ode_solver.solve vs diffrax (Dopri5 + PIDController): steps, compile time and cost per step.

A damped 2-D rotation to t = --t1 at rtol = atol = --tol, states of --batch x 2, float32. Backs
the "why our own while_loop" note of ode_solver.py. diffrax is an optional extra, not in
requirements.txt: `pip install diffrax` first.

  .venv/bin/python benchmarks/ode_solver.py [--batch 1,256,4096] [--t1 200] [--tol 1e-6]
"""
import argparse
import time

import bench_common as bc  # also puts the repo root on sys.path
import jax
import jax.numpy as jnp

import ode_solver


def solvers(t1, tol):
  """Name -> jitted f(y0) -> number of attempted steps, for both solvers."""
  try:
    import diffrax
  except ImportError:
    raise SystemExit('diffrax is an optional extra: pip install diffrax') from None
  a = jnp.asarray([[-0.01, 2.], [-2., -0.01]])
  fn = lambda t, y: y @ a.T

  def ours(y0):
    _, _, info = ode_solver.solve(fn, y0, 0., t1, tol, tol, max_steps=100000, full_output=True)
    return info['n_accepted'] + info['n_rejected']

  def theirs(y0):
    controller = diffrax.PIDController(rtol=tol, atol=tol)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, _: fn(t, y)), diffrax.Dopri5(), 0., t1,
                              None, y0, stepsize_controller=controller, max_steps=100000,
                              saveat=diffrax.SaveAt(t1=True))
    return sol.stats['num_steps']

  return {'ode_solver': jax.jit(ours), 'diffrax': jax.jit(theirs)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--batch', default='1,256,4096', help='comma-separated batch sizes')
  parser.add_argument('--t1', type=float, default=200.)
  parser.add_argument('--tol', type=float, default=1e-6)
  args = parser.parse_args()
  print(bc.machine_line())
  fns = solvers(args.t1, args.tol)
  for batch in [int(b) for b in args.batch.split(',')]:
    y0 = jnp.ones((batch, 2))
    for name, f in fns.items():
      start = time.perf_counter()
      steps = int(f(y0))
      compile_s = time.perf_counter() - start
      run_s, _ = bc.median_time(f, y0)
      print(f'{name}: state {batch}x2, {steps} steps, compile+run {compile_s:.2f} s, '
            f'{run_s / steps * 1e6:.2f} us/step')


if __name__ == '__main__':
  main()
