"""200 sharded (packed) saves in a row keep the host memory flat (issue 21).

The CI version: one process with 8 CPU devices saves a 4 MiB state split
over them through the packed writer (``lib.multiprocess_arrays``, jax's
commit thread, our background writer), 200 times, half with host copies
(the library default) and half reading the device buffers in the writer
(``buffers_stay_valid``, the runner's way), each from a new state, keeping
the two newest. A leak of one copy per save would add 800 MB; the RSS, the
thread count and the open files must stay flat. The last checkpoint
restores exactly.

``GINTRAIN_SLOW=1``: the same with 2 real processes through
``save_checkpoint_multiprocess`` on a 256 MiB state, RSS of each process
printed (``-s``). Measured (2 cores, load ~20, 712 s): process 0 551-604 MiB,
process 1 784-829 MiB over saves 30-200, the mean of the last five samples
2.3% / 2.4% over the first five: up and down by a slice, no growth.
"""

import gc
import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import multiprocess_arrays as mpa

SAVES = 200
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
  with open('/proc/self/status', encoding='ascii') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS:'))


def _open_files() -> int:
  return len(os.listdir('/proc/self/fd'))


def test_200_packed_saves_keep_host_memory_flat(tmp_path):
  mesh = Mesh(np.array(jax.devices()).reshape(8), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  make = jax.jit(lambda k: {f'w{i}': jax.random.normal(
      jax.random.fold_in(k, i), (512, 512)) for i in range(4)},
                 out_shardings=sharding)
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=60)
  root = str(tmp_path)
  rss, threads, files = [], [], []
  state = None
  for step in range(1, SAVES + 1):
    state = make(jax.random.key(step))  # a new state each save
    ckpt, tmp = f'{root}/checkpoint_{step}', f'{root}/.tmp_{step}'
    mpa.prepare_array_dir(tmp, ckpt, list(state), 'packed')
    mpa.save_multiprocess_arrays(
        mgr, list(state.items()), tmp, ckpt,
        on_commit=lambda t=tmp, c=ckpt: mpa.commit_array_dir(t, c),
        array_format='packed', buffers_stay_valid=step % 2 == 0)
    if step > 2:  # keep the two newest
      shutil.rmtree(mpa.array_dir(f'{root}/checkpoint_{step - 2}'))
    if step % 10 == 0:
      mgr.wait_until_finished()
      gc.collect()
      rss.append(_rss())
      threads.append(threading.active_count())
      files.append(_open_files())
  mgr.wait_until_finished()
  assert sorted(os.listdir(root)) == [f'checkpoint_{SAVES - 1}_gda',
                                      f'checkpoint_{SAVES}_gda']
  # Flat after the first tens of saves (allocator and thread pools warm).
  settled = rss[2:]
  growth = (max(settled) - settled[0]) / settled[0]
  print(f'RSS after saves 30..{SAVES}: {settled[0] >> 20}..'
        f'{max(settled) >> 20} MiB (growth {growth:.1%}; state 4 MiB,'
        f' {SAVES * 4} MiB written)')
  assert growth <= 0.10, [r >> 20 for r in rss]
  assert max(settled) - settled[0] < 4 * SAVES // 10 << 20, rss
  assert max(threads[2:]) == threads[2], threads
  assert max(files[2:]) == files[2], files
  placeholders = {k: mpa.MP_ARRAY_PH + k for k in state}
  got = mpa.read_arrays(placeholders, f'{root}/checkpoint_{SAVES}',
                        {k: sharding for k in state})
  for k in state:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))


_WORKER = r'''
import gc, os, sys, time, warnings
import jax
jax.distributed.initialize(os.environ['GINTRAIN_COORD'],
                           int(os.environ['GINTRAIN_NPROC']),
                           int(os.environ['GINTRAIN_PROC']))
import numpy as np
from jax.experimental.array_serialization import serialization as ser
from gintrain.lib import checkpoints
warnings.simplefilter('ignore')
root, saves, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mesh = jax.make_mesh((jax.device_count(),), ('data',),
                     axis_types=(jax.sharding.AxisType.Auto,))
sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
n = mib // 16
make = jax.jit(lambda k: {f'w{i}': jax.random.normal(
    jax.random.fold_in(k, i), (1024, 4096)) for i in range(n)},
               out_shardings=sh)
mgr = ser.GlobalAsyncCheckpointManager(timeout_secs=600)
rss = []
t = time.perf_counter()
for step in range(1, saves + 1):
  state = make(jax.random.key(step))
  checkpoints.save_checkpoint_multiprocess(
      root, {'state': state}, step, keep=2, gda_manager=mgr,
      array_format='packed', buffers_stay_valid=step % 2 == 0)
  if step % 10 == 0:
    mgr.wait_until_finished()
    gc.collect()
    with open('/proc/self/status') as f:
      rss.append(next(int(l.split()[1]) >> 10 for l in f
                      if l.startswith('VmRSS:')))
mgr.wait_until_finished()
print('RSS_MIB', jax.process_index(), rss, 'seconds',
      round(time.perf_counter() - t, 1), flush=True)
'''


@pytest.mark.skipif(not os.environ.get('GINTRAIN_SLOW'),
                    reason='GINTRAIN_SLOW=1: 200 saves of 256 MiB on 2'
                    ' processes')
def test_200_saves_on_two_processes_keep_host_memory_flat(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
  import harness  # pylint: disable=g-import-not-at-top
  script = tmp_path / 'soak.py'
  script.write_text(_WORKER)
  port = harness.free_port()
  procs = []
  for i in range(2):
    environ = harness.env(devices=2, GINTRAIN_COORD=f'127.0.0.1:{port}',
                          GINTRAIN_NPROC='2', GINTRAIN_PROC=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / 'ckpt'), str(SAVES),
         '256'], env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=3000)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  for out in outs:
    line = [l for l in out.splitlines() if l.startswith('RSS_MIB')][0]
    print(line)
    rss = eval(line.split(' ', 2)[2].rsplit(' seconds', 1)[0])  # pylint: disable=eval-used
    # The allocator moves RSS up and down by a slice or two (16 MiB) from
    # save to save; the trend is what must stay flat: the mean of the last
    # five samples within 10% of the first five after the warm-up.
    first, last = np.mean(rss[2:7]), np.mean(rss[-5:])
    assert last <= 1.10 * first, line
