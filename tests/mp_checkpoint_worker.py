"""One of the 2 processes of tests/test_checkpoint_multiprocess.py.

Usage: python mp_checkpoint_worker.py PROCESS_ID PORT ROOT_DIR

Needs JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=2
(2 processes x 2 CPU devices = a 2x2 global mesh). Every check runs on both
processes; the first failure exits non-zero. Prints 'WORKER OK <id>' at the
end.
"""

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import serialization
from gintrain.lib.multiprocess_arrays import MP_ARRAY_PH

PID = None  # this process's id, set by main()
MESH = None  # the 2x2 global mesh, set by main()
W = np.arange(48, dtype=np.float32).reshape(8, 6)
B = np.array([1., -2., 3., -4.], np.float32)


def log(msg):
  print(f'[{PID}] {msg}', flush=True)


def check(cond, msg):
  if not cond:
    raise AssertionError(msg)


def raises(exc, fn, *args, **kwargs):
  try:
    fn(*args, **kwargs)
  except exc as e:
    return e
  raise AssertionError(f'{fn.__name__} did not raise {exc.__name__}')


def global_array(value, spec):
  sharding = NamedSharding(MESH, spec)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda idx: value[idx])


def gather(arr):
  return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


def make_tree(scale):
  return {
      'params': {
          'w': global_array(W * scale, P('data', 'model')),  # split across
          'b': global_array(B * scale, P()),  # replicated over all processes
      },
      'opt': {'count': np.int32(scale), 'empty': {}},
      'numpy': np.arange(5.0) * scale,
      'local': jax.device_put(jnp.full((3,), scale, jnp.float32),
                              jax.local_devices()[0]),
  }


def make_target(w_spec=P('model', 'data'), b_spec=P('data')):
  # Other shardings than the saved ones: the restore must take these.
  return {
      'params': {
          'w': global_array(np.zeros_like(W), w_spec),
          'b': global_array(np.zeros_like(B), b_spec),
      },
      'opt': {'count': np.int32(0), 'empty': {}},
      'numpy': np.zeros(5),
      'local': np.zeros(3, np.float32),
  }


def check_restored(restored, target, scale):
  for name, full in (('w', W), ('b', B)):
    got, want = restored['params'][name], target['params'][name]
    check(isinstance(got, jax.Array) and not got.is_fully_addressable,
          f'{name} is not a global jax.Array: {type(got)}')
    check(got.sharding == want.sharding,
          f'{name} sharding {got.sharding} != target {want.sharding}')
    check(np.array_equal(gather(got), full * scale), f'{name} values differ')
  check(restored['opt']['count'] == scale, 'count differs')
  check(restored['opt']['empty'] == {}, 'empty dict lost')
  check(np.array_equal(restored['numpy'], np.arange(5.0) * scale), 'numpy')
  check(np.array_equal(restored['local'], np.full(3, scale)), 'local array')


def sync(name):
  multihost_utils.sync_global_devices(name)


def main(root):
  d = os.path.join(root, 'ckpts')
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=60)
  save = checkpoints.save_checkpoint_multiprocess
  restore = checkpoints.restore_checkpoint

  # Multi-process arrays without a gda_manager: raises everywhere, no files.
  raises(errors.MPACheckpointingRequiredError, save, d, make_tree(1), 1)
  sync('after no-manager save')
  check(not os.path.exists(d), f'{d} was created')
  log('missing gda_manager raises, nothing written')

  # Three saves with keep=2; the last one with an AsyncManager as well.
  for step in (1, 2, 3):
    am = checkpoints.AsyncManager() if step == 3 else None
    path = save(d, make_tree(step), step, keep=2, gda_manager=mgr,
                async_manager=am)
    check(path == os.path.join(d, f'checkpoint_{step}'), path)
    mgr.wait_until_finished()
    if am:
      am.wait_previous_save()
    sync(f'saved {step}')
  names = sorted(os.listdir(d))
  check(names == ['checkpoint_2', 'checkpoint_2_gda', 'checkpoint_3',
                  'checkpoint_3_gda'], f'after keep=2: {names}')
  check(sorted(os.listdir(os.path.join(d, 'checkpoint_3_gda'))) == [
      '.gintrain_integrity', 'params'], 'array dir layout')
  check(sorted(os.listdir(os.path.join(d, 'checkpoint_3_gda',
                                       '.gintrain_integrity'))) == [
      'process_0.json', 'process_1.json'], 'one manifest per process')
  log(f'saved 3 steps, keep=2 left {names}')

  # The file holds placeholders and everything else, keys sorted.
  state = checkpoint_io.read_checkpoint_file(os.path.join(d, 'checkpoint_3'))
  want = {'local': np.full(3, 3, np.float32), 'numpy': np.arange(5.0) * 3,
          'opt': {'count': np.int32(3), 'empty': {}},
          'params': {'b': MP_ARRAY_PH + 'params/b',
                     'w': MP_ARRAY_PH + 'params/w'}}
  with open(os.path.join(d, 'checkpoint_3'), 'rb') as f:
    check(f.read() == serialization.msgpack_serialize(want),
          f'main file bytes differ: {state}')
  log('main file = placeholders + plain leaves, sorted keys')

  # Restore latest and an explicit step into targets with other shardings.
  target = make_target()
  check_restored(restore(d, target, gda_manager=mgr), target, 3)
  target2 = make_target(P(('data', 'model'), None), P())
  check_restored(restore(d, target2, step=2, gda_manager=mgr), target2, 2)
  log('restored steps 3 and 2 with the target shardings')

  # Restore errors.
  e = raises(errors.MPACheckpointingRequiredError, restore, d, target)
  check('checkpoint_3' in str(e), str(e))
  raises(errors.MPARestoreTargetRequiredError, restore, d, None,
         gda_manager=mgr)
  bad_target = make_target()
  bad_target['params']['w'] = np.zeros_like(W)
  e = raises(errors.MPARestoreTargetRequiredError, restore, d, bad_target,
             gda_manager=mgr)
  check('params/w' in str(e), str(e))
  partial = restore(d, None, gda_manager=mgr,
                    allow_partial_mpa_restoration=True)
  check(partial['params']['w'] == MP_ARRAY_PH + 'params/w', 'w placeholder')
  check(np.array_equal(partial['numpy'], np.arange(5.0) * 3), 'numpy')
  partial = restore(d, bad_target, gda_manager=mgr,
                    allow_partial_mpa_restoration=True)
  check(partial['params']['w'] == MP_ARRAY_PH + 'params/w', 'w kept')
  check(np.array_equal(gather(partial['params']['b']), B * 3), 'b restored')
  log('restore errors and allow_partial_mpa_restoration ok')

  # overwrite=False with an older step: every process raises, nothing changes.
  raises(errors.InvalidCheckpointError, save, d, make_tree(9), 2,
         gda_manager=mgr)
  sync('after outdated save')
  check(sorted(os.listdir(d)) == names, f'changed: {os.listdir(d)}')
  log('outdated save raises on every process')

  # A failure on process 0 only (it alone serializes the tree): every
  # process raises, nothing is written, and the processes stay in step.
  bad = dict(make_tree(1), unserializable={1, 2})
  raises(TypeError if PID == 0 else errors.GintrainError, save, d, bad, 10,
         gda_manager=mgr)
  sync('after failed save')
  check(sorted(os.listdir(d)) == names, f'changed: {os.listdir(d)}')
  log('a failure on process 0 raises on every process')

  # overwrite=True at step 2: checkpoint 3 and its arrays go away.
  save(d, make_tree(5), 2, keep=2, overwrite=True, gda_manager=mgr)
  mgr.wait_until_finished()
  sync('after overwrite')
  names = sorted(os.listdir(d))
  check(names == ['checkpoint_2', 'checkpoint_2_gda'], f'overwrite: {names}')
  check_restored(restore(d, make_target(), gda_manager=mgr), make_target(), 5)
  log('overwrite=True replaced step 2 and removed step 3 with its arrays')

  # Interoperability with flax (test-only oracle) in both directions.
  from flax import config as flax_config
  from flax.training import checkpoints as flax_checkpoints
  flax_config.update('flax_use_orbax_checkpointing', False)
  flax_target = make_target()
  check_restored(flax_checkpoints.restore_checkpoint(
      d, flax_target, gda_manager=mgr), flax_target, 5)
  fd = os.path.join(root, 'flax')
  flax_checkpoints.save_checkpoint_multiprocess(fd, make_tree(4), 4,
                                                gda_manager=mgr)
  mgr.wait_until_finished()
  sync('flax saved')
  check_restored(restore(fd, make_target(), gda_manager=mgr), make_target(), 4)
  log('flax restores ours and we restore flax\'s')

  # A chunk only process 1 writes and reads, overwritten: both processes
  # raise naming the array (the check is agreed), in a full check and in a
  # restore.
  from gintrain.lib import multiprocess_arrays as mpa
  wdir = os.path.join(d, 'checkpoint_2_gda', 'params', 'w')
  if PID == 0:
    with open(os.path.join(wdir, '1.1'), 'r+b') as f:  # rows 4:8, cols 3:6
      size = len(f.read())
      f.seek(0)
      f.write(b'\x00' * size)
  sync('chunk damaged')
  state = checkpoint_io.read_checkpoint_file(os.path.join(d, 'checkpoint_2'))
  e = raises(errors.CheckpointReadError, mpa.verify_arrays,
             os.path.join(d, 'checkpoint_2'), state)
  check(f'"{wdir}"' in str(e), str(e))
  e = raises(errors.CheckpointReadError, restore, d,
             make_target(P('data', 'model'), P()), gda_manager=mgr)
  check(f'"{wdir}"' in str(e), str(e))
  log('a damaged chunk raises on every process, naming the array')

  # Arrays lost after the commit: a clear error, not a tensorstore one.
  if PID == 0:
    import shutil
    shutil.rmtree(os.path.join(d, 'checkpoint_2_gda', 'params', 'w'))
  sync('arrays removed')
  raises(errors.MPARestoreDataCorruptedError, restore, d, make_target(),
         gda_manager=mgr)
  log('missing array data raises MPARestoreDataCorruptedError')

  # The packed layout: two files per process, restored into other
  # shardings; a damaged slice that only process 1 wrote raises everywhere.
  pd = os.path.join(root, 'packed')
  if PID == 0:  # arrays of a save that crashed before its main file
    os.makedirs(os.path.join(pd, 'checkpoint_3_gda', 'packed'))
  sync('orphan made')
  save(pd, make_tree(7), 7, gda_manager=mgr, array_format='packed')
  mgr.wait_until_finished()
  sync('packed saved')
  check(sorted(os.listdir(pd)) == ['checkpoint_7', 'checkpoint_7_gda'],
        f'orphan arrays not swept: {os.listdir(pd)}')
  folder = os.path.join(pd, 'checkpoint_7_gda', 'packed')
  check(sorted(os.listdir(os.path.join(pd, 'checkpoint_7_gda'))) == [
      'packed'], 'packed layout')
  check(sorted(os.listdir(folder)) == [
      'process_0.bin', 'process_0.json', 'process_1.bin', 'process_1.json'],
        f'packed files: {os.listdir(folder)}')
  for target in (make_target(), make_target(P(('data', 'model'), None), P()),
                 make_target(P('data', 'model'), P())):
    check_restored(restore(pd, target, gda_manager=mgr), target, 7)
  log('packed: 4 files, restored into 3 shardings')
  sync('packed restored')
  if PID == 0:
    import json
    with open(os.path.join(folder, 'process_1.json')) as f:
      chunk = json.load(f)['arrays']['params/w']['chunks'][0]
    with open(os.path.join(folder, 'process_1.bin'), 'r+b') as f:
      f.seek(chunk['offset'])
      f.write(b'\xff' * chunk['nbytes'])
  sync('packed damaged')
  e = raises(errors.CheckpointReadError, restore, pd, make_target(),
             gda_manager=mgr)
  check('params/w' in str(e), str(e))
  state = checkpoint_io.read_checkpoint_file(os.path.join(pd, 'checkpoint_7'))
  e = raises(errors.CheckpointReadError, mpa.verify_arrays,
             os.path.join(pd, 'checkpoint_7'), state)
  check('params/w' in str(e), str(e))
  log('packed: a damaged slice raises on every process')

  sync('done')
  log(f'WORKER OK {PID}')


if __name__ == '__main__':
  PID, port = int(sys.argv[1]), int(sys.argv[2])
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                             process_id=PID, initialization_timeout=60)
  MESH = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'model'))
  warnings.simplefilter('ignore', DeprecationWarning)
  main(sys.argv[3])
  jax.distributed.shutdown()
