"""One of the 2 processes of tests/test_sharded_two_process.py.

Usage: python mp_sharded_worker.py PROCESS_ID PORT ROOT_DIR

2 processes x 2 CPU devices (XLA_FLAGS set by the test). Checks, on both
processes (the first failure exits non-zero; 'WORKER OK <id>' at the end):

1. A checkpoint written by one process (one msgpack file) restored by both
   into sharded targets: each process reads only its rows
   (``msgpack_slices.bytes_read``), values exact.
2. A packed save whose part fails on process 1 (its data file cannot be
   created) fails on both processes at once, the other naming process 1,
   long before jax's commit barrier would time out; nothing is committed;
   the manager does not hang on the failed commit and the next save works.
3. An asynchronous save without split arrays (process 0's file alone)
   whose write fails raises on process 1 too.
"""

import os
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoints
from gintrain.lib import checkpoints_multiprocess
from gintrain.lib import msgpack_slices
from gintrain.lib import multiprocess_arrays as mpa

PID = None
# 2 MiB and 1.5 MiB: both left unread until placed (MIN_BYTES is 1 MiB).
W = np.arange(1024 * 512, dtype=np.float32).reshape(1024, 512)
V = (np.arange(768 * 512, dtype=np.float32) * -1).reshape(768, 512)
SMALL = np.arange(10, dtype=np.float32)
BARRIER_S = 120


def log(msg):
  print(f'[{PID}] {msg}', flush=True)


def check(cond, msg):
  if not cond:
    raise AssertionError(msg)


def sync(name):
  multihost_utils.sync_global_devices(name)


def exact(arr, full, name):
  """Every shard this process holds equals its slice of ``full``."""
  check(arr.shape == full.shape, name)
  for shard in arr.addressable_shards:
    check(np.array_equal(np.asarray(shard.data), full[shard.index]),
          f'{name}: shard {shard.index} differs')


def one_process_checkpoint_read_by_two(root, mesh):
  d = os.path.join(root, 'single')
  if PID == 0:  # written as one process writes it: one msgpack file
    checkpoints.save_checkpoint(d, {'w': W, 'v': V, 's': SMALL, 'n': 3}, 1)
  sync('single written')

  def target(spec):
    sharding = NamedSharding(mesh, spec)
    return {'w': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=sharding),
            'v': jax.ShapeDtypeStruct(V.shape, V.dtype, sharding=sharding),
            's': jax.ShapeDtypeStruct(SMALL.shape, SMALL.dtype,
                                      sharding=NamedSharding(mesh, P())),
            'n': 0}
  before = msgpack_slices.bytes_read()
  out = checkpoints_multiprocess.restore_checkpoint(d, target(P('data')))
  read = msgpack_slices.bytes_read() - before
  for name, full in (('w', W), ('v', V), ('s', SMALL)):
    exact(out[name], full, name)
  check(out['n'] == 3, 'n')
  # Its 2 of the 4 row blocks of w and v: half of their bytes, nothing else.
  check(read == (W.nbytes + V.nbytes) // 2,
        f'read {read} bytes, its rows are {(W.nbytes + V.nbytes) // 2}')
  log(f'rows: read {read} bytes of {W.nbytes + V.nbytes}')
  # Column blocks of 128 floats (512-byte runs) are read with their rows:
  # each array once, however many of its devices need part of it.
  before = msgpack_slices.bytes_read()
  out = checkpoints_multiprocess.restore_checkpoint(d, target(P(None, 'data')))
  read = msgpack_slices.bytes_read() - before
  for name, full in (('w', W), ('v', V)):
    exact(out[name], full, name)
  check(read == W.nbytes + V.nbytes, f'columns: read {read} bytes')
  log('a 1-process checkpoint: each process read only its slices')


def failed_part_fails_everywhere(root, mesh):
  w = jax.make_array_from_callback(W.shape, NamedSharding(mesh, P('data')),
                                   lambda i: W[i])
  tmp, ckpt = os.path.join(root, '.tmp_5'), os.path.join(root, 'checkpoint_5')
  if PID == 0:
    mpa.prepare_array_dir(tmp, ckpt, ['params/w'], 'packed')
  sync('prepared 5')
  if PID == 1:  # process 1's data file cannot be created (EEXIST)
    os.mkdir(os.path.join(mpa.array_dir(tmp), 'packed', 'process_1.bin'))
  sync('blocked 5')
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=BARRIER_S)
  start = time.monotonic()
  mpa.save_multiprocess_arrays(
      mgr, [('params/w', w)], tmp, ckpt,
      on_commit=lambda: mpa.commit_array_dir(tmp, ckpt),
      array_format='packed')
  try:
    mgr.wait_until_finished()
  except checkpoint_io.CheckpointWriteError as e:
    error = e
  else:
    raise AssertionError('the failed save did not raise here')
  took = time.monotonic() - start
  check(took < 30, f'raised after {took:.1f} s (barrier: {BARRIER_S} s)')
  text = str(error)
  check(text.startswith(f'Cannot write checkpoint "{ckpt}": File exists'),
        text)
  check(error.errno == 17, text)
  check(('on process 1' in text) == (PID == 0), text)
  sync('failed 5')
  check(not os.path.exists(ckpt + '_gda'), 'committed')
  log(f'a failed part raised on this process after {took:.2f} s: {text}')

  # The manager does not wait for the failed save's commit any more, and
  # the processes still agree: the next save commits and restores.
  start = time.monotonic()
  mgr.wait_until_finished()
  check(time.monotonic() - start < 10, 'waited for the failed commit')
  tmp, ckpt = os.path.join(root, '.tmp_6'), os.path.join(root, 'checkpoint_6')
  if PID == 0:
    mpa.prepare_array_dir(tmp, ckpt, ['params/w'], 'packed')
  sync('prepared 6')
  mpa.save_multiprocess_arrays(
      mgr, [('params/w', w)], tmp, ckpt,
      on_commit=lambda: mpa.commit_array_dir(tmp, ckpt),
      array_format='packed')
  mgr.wait_until_finished()
  out = mpa.read_arrays({'params': {'w': mpa.MP_ARRAY_PH + 'params/w'}},
                        ckpt, {'params': {'w': NamedSharding(mesh, P())}})
  exact(out['params']['w'], W, 'w after')
  log('the next save commits')


def failed_main_file_fails_everywhere(root):
  """A checkpoint with no split arrays is process 0's file alone: its
  background write failing (a directory in its place) fails the save on
  process 1 too."""
  d = os.path.join(root, 'plain')
  if PID == 0:
    os.makedirs(os.path.join(d, 'checkpoint_9', 'in_the_way'))
  sync('in the way')
  am = checkpoints.AsyncManager()
  checkpoints_multiprocess.save_checkpoint_multiprocess(
      d, {'a': np.arange(3.0)}, 9, overwrite=True, async_manager=am)
  try:
    am.wait_previous_save()
  except checkpoint_io.CheckpointWriteError as e:
    error = e
  else:
    raise AssertionError('the failed save did not raise here')
  text = str(error)
  check(text.startswith(f'Cannot write checkpoint "{d}/checkpoint_9"'), text)
  check(('on process 0' in text) == (PID == 1), text)
  log(f'a failed main file raised here too: {text}')


def main():
  global PID
  PID, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(f'127.0.0.1:{port}', 2, PID)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  one_process_checkpoint_read_by_two(root, mesh)
  failed_part_fails_everywhere(root, mesh)
  failed_main_file_fails_everywhere(root)
  sync('done')
  log(f'WORKER OK {PID}')


if __name__ == '__main__':
  main()
