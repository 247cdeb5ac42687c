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
4. The runner's resume of a checkpoint written by one process with a
   block-hashed integrity sidecar (``Checkpointer.latest_step``, ``read``,
   ``restore_state`` with the FSDP partitioner): values exact, and each
   process reads (``msgpack_slices.bytes_read`` and the kernel's ``rchar``)
   well under the file; a flipped byte in a block only process 1 reads
   fails the restore on both processes (process 1 naming the bytes,
   process 0 naming process 1), through the runner and through
   ``checkpoints_multiprocess.restore_checkpoint``.
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
from gintrain.lib import checkpoint_sidecar
from gintrain.lib import checkpoints
from gintrain.lib import checkpoints_multiprocess
from gintrain.lib import msgpack_slices
from gintrain.lib import multiprocess_arrays as mpa
from gintrain.lib import errors
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints as runner_checkpoints
from gintrain.runner.parallel import partitioners

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


def rchar():
  """Bytes this process has read through read/pread syscalls so far."""
  with open('/proc/self/io', encoding='ascii') as f:
    return int(f.readline().split()[1])


def runner_resume_of_a_one_process_checkpoint(root):
  start = time.monotonic()
  workdir = os.path.join(root, 'runner')
  ckpt_dir = os.path.join(workdir, runner_checkpoints.CHECKPOINT_DIR)
  state = {'step': np.int32(3), 'params': {'w': W, 'v': V, 'b': SMALL}}
  if PID == 0:  # what a 1-process run writes, with a sidecar of 64 KiB blocks
    checkpoint_sidecar.BLOCK_BYTES = 64 << 10
    checkpoint_io.set_integrity_sidecar(True)
    for step in (2, 3):  # 2: what a corrupt 3 falls back to (at the end)
      checkpoints.save_checkpoint(
          ckpt_dir, {'state': state | {'step': np.int32(step)},
                     'data': {'step': step}}, step, keep=2)
  sync('runner checkpoint written')
  path = os.path.join(ckpt_dir, 'checkpoint_3')
  size = os.path.getsize(path)
  shapes = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  part = partitioners.Sharded(rules='fsdp')
  part.shardings(shapes)  # the mesh is made before the reads are counted
  ckpt = runner_checkpoints.Checkpointer(
      workdir, runner_checkpoints.CheckpointPolicy(async_save=False))
  before, io_before = msgpack_slices.bytes_read(), rchar()
  step = ckpt.latest_step()
  out, raw = runner_checkpoints.restore_state(
      ckpt.path(step), shapes, part, ckpt.read(step), step)
  read, io = msgpack_slices.bytes_read() - before, rchar() - io_before
  check(step == 3 and raw['data'] == {'step': 3}, f'{step} {raw["data"]}')
  check(int(out['step']) == 3, 'step')
  exact(out['params']['w'], W, 'w')
  exact(out['params']['v'], V, 'v')
  exact(out['params']['b'], SMALL, 'b')
  check(out['params']['w'].sharding.spec == P('data'),
        str(out['params']['w'].sharding))
  # Its half of the rows, the blocks at their edges and the framing's (4
  # blocks of 64 KiB), nothing else: the resume's check reads no array.
  check(read <= size // 2 + 4 * (64 << 10) and io <= read + (64 << 10),
        f'read {read} bytes ({io} through the kernel) of {size}')
  log(f'runner resume: read {read} bytes ({io} through the kernel) of'
      f' {size}')

  # A flipped byte in row 900 of w: in a block only process 1 reads.
  if PID == 0:
    tree = msgpack_slices.read_lazily(path)
    (_, offset, _), = tree['state']['params']['w'].segments
    with open(path, 'r+b') as f:
      f.seek(offset + W[:900].nbytes)
      byte = f.read(1)
      f.seek(offset + W[:900].nbytes)
      f.write(bytes([byte[0] ^ 0x20]))
  sync('flipped')
  try:
    runner_checkpoints.restore_state(path, shapes, part, step=3)
  except RunnerError as e:
    text = str(e)
  else:
    raise AssertionError('the flipped byte was not caught')
  check(text.startswith(f'cannot read checkpoint {path}:'), text)
  if PID == 1:
    check('do not match its integrity sidecar' in text, text)
  else:
    check('on process(es) [1]' in text, text)
  target = {'state': shapes | {'params': {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for (k, v), s in
      zip(shapes['params'].items(), [NamedSharding(part.mesh, P('data'))] * 2
          + [NamedSharding(part.mesh, P())])}}, 'data': {'step': 0}}
  try:
    checkpoints_multiprocess.restore_checkpoint(path, target)
  except errors.CheckpointReadError as e:
    check(path in str(e), str(e))
  else:
    raise AssertionError('the lib restore did not catch the flipped byte')
  log(f'a flipped byte in process 1\'s slice: {text}')

  # The resume falls back (runner.training.start.resume_or_start): the
  # failure, agreed, rejects checkpoint 3; process 0 moves it aside and
  # both resume from checkpoint 2.
  ckpt = runner_checkpoints.Checkpointer(  # as a relaunch makes it
      workdir, runner_checkpoints.CheckpointPolicy(async_save=False))
  step = ckpt.latest_step()
  check(step == 3, f'{step}')  # its framing reads back
  try:
    runner_checkpoints.restore_state(ckpt.path(3), shapes, part,
                                     ckpt.read(3), 3)
  except runner_checkpoints.CorruptCheckpointError as e:
    step = ckpt.reject(3, str(e))
  else:
    raise AssertionError('the flipped byte was not caught on resume')
  check(step == 2, f'{step}')
  out, raw = runner_checkpoints.restore_state(
      ckpt.path(2), shapes, part, ckpt.read(2), 2)
  check(int(out['step']) == 2 and raw['data'] == {'step': 2}, 'step 2')
  exact(out['params']['w'], W, 'w after the fall back')
  sync('fell back')
  moved = os.path.join(workdir, runner_checkpoints.CORRUPT_DIR, 'checkpoint_3')
  check(not os.path.exists(path) and os.path.exists(moved),
        f'{os.listdir(ckpt_dir)}')
  log(f'runner resume checks took {time.monotonic() - start:.2f} s')


def main():
  global PID
  PID, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(f'127.0.0.1:{port}', 2, PID)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  one_process_checkpoint_read_by_two(root, mesh)
  failed_part_fails_everywhere(root, mesh)
  failed_main_file_fails_everywhere(root)
  runner_resume_of_a_one_process_checkpoint(root)
  sync('done')
  log(f'WORKER OK {PID}')


if __name__ == '__main__':
  main()
