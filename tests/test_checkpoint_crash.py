"""A process saving checkpoints is SIGKILLed at random moments; nothing is lost.

A "zygote" child imports lib.checkpoints once and forks a saver per round (so
a round costs a fork, not a jax import). The saver writes checkpoints in a
loop (keep=3, keep_every_n_steps=5, half of them through an AsyncManager,
a chunked array) continuing from the latest step on disk. The test kills it
after a random (seeded) delay, then checks that the newest checkpoints, and
so the latest one, are complete, restore and equals the state saved at its
step, that the latest step never goes backwards, and that the next save
succeeds.
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 60

_STATE = textwrap.dedent('''
    def state(step):
      return {'w': np.full(600_000, step, np.float32),  # chunked (4 chunks)
              'b': np.arange(1000, dtype=np.int64) + step,
              'step': step, 'meta': {'name': f'step {step}'}}
''')

_ZYGOTE = _STATE + textwrap.dedent('''
    import logging, os, random, sys, warnings
    import numpy as np
    from gintrain.lib import checkpoints, serialization
    warnings.simplefilter('ignore')
    logging.disable(logging.WARNING)  # "waiting for the previous save" 
    serialization.MAX_CHUNK_SIZE = 2**19
    ckpt_dir = sys.argv[1]

    def save_forever(seed):
      rng = random.Random(seed)
      manager = checkpoints.AsyncManager()
      steps = checkpoints.available_steps(ckpt_dir)
      step = steps[-1] + 1 if steps else 0
      while True:
        if rng.random() < 0.5:
          manager.wait_previous_save()
          checkpoints.save_checkpoint(ckpt_dir, state(step), step, keep=3,
                                      keep_every_n_steps=5)
        else:
          checkpoints.save_checkpoint(ckpt_dir, state(step), step, keep=3,
                                      keep_every_n_steps=5,
                                      async_manager=manager)
        step += 1

    for line in sys.stdin:
      pid = os.fork()
      if pid == 0:
        try:
          save_forever(int(line))
        finally:
          os._exit(1)
      print(pid, flush=True)
      print(os.waitpid(pid, 0)[1], flush=True)
''')

namespace = {'np': np}
exec(_STATE, namespace)  # pylint: disable=exec-used
state = namespace['state']


def assert_state(restored, step):
  expected = state(step)
  assert restored['step'] == step and restored['meta'] == expected['meta']
  np.testing.assert_array_equal(restored['w'], expected['w'])
  np.testing.assert_array_equal(restored['b'], expected['b'])


def test_sigkill_at_random_moments(tmp_path):
  ckpt_dir = str(tmp_path / 'ckpts')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1')
  stderr = open(tmp_path / 'stderr', 'w+')  # pylint: disable=consider-using-with
  zygote = subprocess.Popen(
      [sys.executable, '-c', _ZYGOTE, ckpt_dir], env=env, text=True,
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
  rng = random.Random(20240531)
  last_step = -1
  interrupted_writes = saver_steps = 0
  try:
    for round_ in range(ROUNDS):
      zygote.stdin.write(f'{round_}\n')
      zygote.stdin.flush()
      pid = int(zygote.stdout.readline())
      time.sleep(rng.choice([0.0, 0.01, rng.uniform(0.0, 0.3)]))
      os.kill(pid, signal.SIGKILL)
      status = int(zygote.stdout.readline())
      assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
          f'the saver died by itself (status {status})')
      names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
      interrupted_writes += any(
          checkpoint_naming.is_tmp_name(n, 'checkpoint_') for n in names)

      paths = checkpoints.natural_sort(
          os.path.join(ckpt_dir, n) for n in names
          if not checkpoint_naming.is_tmp_name(n, 'checkpoint_'))
      latest = checkpoints.latest_checkpoint(ckpt_dir)
      assert latest == (paths[-1] if paths else None)
      if latest is None:
        assert last_step == -1
        continue
      for path in paths[-5:]:  # the newest checkpoints are complete
        step = int(path.rsplit('_', 1)[1])
        assert_state(checkpoints.restore_checkpoint(path, None), step)
      step = checkpoints.available_steps(ckpt_dir)[-1]
      assert step >= last_step, 'a committed checkpoint was lost'
      saver_steps += step - max(last_step, 0)
      assert_state(checkpoints.restore_checkpoint(ckpt_dir, None), step)
      # The next save succeeds (a stale tmp file does not get in the way).
      checkpoints.save_checkpoint(ckpt_dir, state(step + 1), step + 1,
                                  keep=3, keep_every_n_steps=5)
      assert_state(checkpoints.restore_checkpoint(ckpt_dir, None), step + 1)
      last_step = step + 1
  finally:
    zygote.stdin.close()
    zygote.wait(timeout=30)
    stderr.seek(0)
  assert zygote.returncode == 0, stderr.read()
  assert saver_steps > ROUNDS, 'the saver made too little progress'
  assert interrupted_writes > 0, 'no kill landed during a write'
  print(f'{saver_steps} saves by the killed saver, {interrupted_writes} kills'
        ' left a partial tmp file')
