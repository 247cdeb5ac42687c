"""Two real processes (2 x 2 CPU devices) on sharded checkpoints (issue 21):

* a checkpoint written by one process (one msgpack file) restored by two,
  each reading only the byte ranges its devices hold (a read counter);
* a packed save whose part fails on one process fails on both at once,
  the other naming the failed process, instead of waiting for jax's
  commit barrier to time out.

The checks run in tests/mp_sharded_worker.py (one start of both processes).
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'mp_sharded_worker.py')
TIMEOUT_S = 120


def _run(root):
  port = harness.free_port()
  env = harness.env(devices=2)
  logs = [open(os.path.join(root, f'worker{i}.log'), 'w+')  # pylint: disable=consider-using-with
          for i in range(2)]
  procs = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, WORKER, str(i), str(port), str(root)], cwd=REPO,
      env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  deadline = time.monotonic() + TIMEOUT_S
  failed_at = None
  try:
    while None in [p.poll() for p in procs]:
      now = time.monotonic()
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = now
      # a failed process leaves the other at a barrier
      if now > deadline or (failed_at and now > failed_at + 10):
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  return [p.returncode for p in procs], outputs


def test_slice_reads_of_a_one_process_checkpoint_and_failed_parts(tmp_path):
  codes, outputs = _run(tmp_path)
  report = '\n'.join(f'----- worker {i} (exit {c}) -----\n{out[-6000:]}'
                     for i, (c, out) in enumerate(zip(codes, outputs)))
  assert codes == [0, 0], report
  for i, out in enumerate(outputs):
    assert f'WORKER OK {i}' in out, report
  names = os.listdir(tmp_path)
  assert 'checkpoint_6_gda' in names and 'checkpoint_5_gda' not in names, (
      names)
