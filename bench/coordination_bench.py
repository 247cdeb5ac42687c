"""Host coordination cost per step and checkpoint commit time vs the number of
processes (for docs/scaling.md).

For each process count N (default 1, 2, 4, 8), N processes x 1 CPU device
start on 127.0.0.1 (``launch/local.sh``) and measure, each over
``--steps`` steps:

* ``check``: the runner's per-step preemption check
  (``runner.parallel.preemption.should_stop``: a lock and a flag read; a
  watcher thread long-polls the coordination service);
* ``old check``: the agreement the runner used before, a barrier plus a
  key-value listing at every step (``distributed.processes_with_flag``);
* ``barrier``: one coordination-service barrier
  (``distributed.barrier``), the unit of every agreement;
* ``commit``: a checkpoint of a state split over all processes
  (``save_checkpoint_multiprocess`` with jax's array manager: placeholder
  file, every process's shards, barrier, commit), from the call to
  ``wait_until_finished``.

Medians over steps, of the slowest process. The machine has 2 cores, so at
N > 2 processes share cores: the figures are upper bounds for hosts that
each have their own.

  python bench/coordination_bench.py [--processes 1,2,4,8] [--steps 200]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'bench', 'results', 'coordination_bench.md')


def _worker(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from gintrain.runner.parallel import distributed  # pylint: disable=g-import-not-at-top
  from gintrain.runner.parallel import preemption  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer('steps', 200, '')
  flags.DEFINE_string('dir', '', '')

  def main(_):
    distributed.initialize()
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    from jax.experimental.array_serialization import serialization as ser  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top

    steps = flags.FLAGS.steps
    preemption.install()
    out = {}

    def measure(name, fn, count=steps):
      times = []
      for step in range(1, count + 1):
        t = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - t)
      mine = statistics.median(times)
      if jax.process_count() > 1:
        mine = float(np.max(multihost_utils.process_allgather(
            np.float64(mine))))
      out[name] = mine

    measure('check', lambda s: preemption.should_stop(s, 1))
    preemption.close_agreement()
    measure('old check',
            lambda s: distributed.processes_with_flag('old_preempt', False))
    measure('barrier', lambda s: distributed.barrier('bench'))
    mesh = jax.make_mesh((jax.device_count(),), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.jit(lambda: {'w': jax.numpy.ones((1024, 1024))},
                    out_shardings={'w': NamedSharding(mesh, P('data'))})()
    manager = ser.GlobalAsyncCheckpointManager(timeout_secs=300)

    def commit(step):
      checkpoints.save_checkpoint_multiprocess(
          flags.FLAGS.dir, {'state': state}, step, keep=2,
          gda_manager=manager if jax.process_count() > 1 else None)
      if jax.process_count() > 1:
        manager.wait_until_finished()
    measure('commit', commit, count=max(5, steps // 20))
    if jax.process_index() == 0:
      print('RESULT ' + json.dumps(out), flush=True)

  app.run(main, argv=[sys.argv[0]] + argv)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--processes', default='1,2,4,8')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--port', type=int, default=24360)
  parser.add_argument('--worker', action='store_true')
  args, rest = parser.parse_known_args()
  if args.worker:
    _worker(rest)
    return
  results = {}
  for i, n in enumerate(int(x) for x in args.processes.split(',')):
    with tempfile.TemporaryDirectory() as d:
      cmd = [os.path.join(REPO, 'launch', 'local.sh'), '-n', str(n), '-p',
             str(args.port + i), '-d', '1', '--', sys.executable,
             os.path.abspath(__file__), '--worker', f'--steps={args.steps}',
             f'--dir={d}']
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            check=False, timeout=900)
    found = [l for l in proc.stdout.splitlines() if 'RESULT ' in l]
    if proc.returncode or not found:
      sys.exit(f'{n} processes failed ({proc.returncode}):\n'
               f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    results[n] = json.loads(found[-1].split('RESULT ', 1)[1])
    print(n, results[n], flush=True)
  lines = ['| processes | per-step check (µs) | old per-step agreement (ms) |'
           ' barrier (ms) | checkpoint commit (ms) |',
           '|---|---|---|---|---|']
  for n, r in results.items():
    lines.append(f'| {n} | {1e6 * r["check"]:.1f} |'
                 f' {1e3 * r["old check"]:.2f} | {1e3 * r["barrier"]:.2f} |'
                 f' {1e3 * r["commit"]:.1f} |')
  table = '\n'.join(lines)
  print(table)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  main()
