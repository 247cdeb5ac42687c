"""Two real processes (2 x 2 CPU devices) on sharded checkpoints (issue 21):

* a checkpoint written by one process (one msgpack file) restored by two,
  each reading only the byte ranges its devices hold (a read counter);
* a packed save whose part fails on one process fails on both at once,
  the other naming the failed process, instead of waiting for jax's
  commit barrier to time out;
* the runner's resume of a 1-process checkpoint with a block-hashed
  integrity sidecar: each process reads its slices (and the framing), each
  block checked; a flipped byte in one process's slice fails both.

The checks run in tests/mp_sharded_worker.py (one start of both processes).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'mp_sharded_worker.py')
TIMEOUT_S = 120


def test_slice_reads_of_a_one_process_checkpoint_and_failed_parts(tmp_path):
  codes, outputs = harness.run_workers(WORKER, tmp_path, timeout=TIMEOUT_S)
  report = '\n'.join(f'----- worker {i} (exit {c}) -----\n{out[-6000:]}'
                     for i, (c, out) in enumerate(zip(codes, outputs)))
  assert codes == [0, 0], report
  for i, out in enumerate(outputs):
    assert f'WORKER OK {i}' in out, report
  names = os.listdir(tmp_path)
  assert 'checkpoint_6_gda' in names and 'checkpoint_5_gda' not in names, (
      names)
