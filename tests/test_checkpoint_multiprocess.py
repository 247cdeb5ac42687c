"""save_checkpoint_multiprocess and lib.multiprocess_arrays.

The 2-process test starts two real JAX processes (tests/mp_checkpoint_worker.py)
on 127.0.0.1 with a coordinator port from 24100-24149, 2 CPU devices each.
The single-process tests compare the written bytes with flax (test-only
oracle).
"""

import collections
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import multiprocess_arrays
from gintrain.lib import serialization
from gintrain.lib.checkpoints_multiprocess import save_checkpoint_multiprocess
from jax.experimental.array_serialization import serialization as jax_ser

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

flax_checkpoints = pytest.importorskip('flax.training.checkpoints')
flax_serialization = pytest.importorskip('flax.serialization')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'mp_checkpoint_worker.py')
PORTS = range(24100, 24150)
CHILD_TIMEOUT_S = 120

Point = collections.namedtuple('Point', ['x', 'y'])


@pytest.fixture(autouse=True)
def _legacy_flax_and_quiet():
  from flax import config as flax_config  # pylint: disable=g-import-not-at-top
  old = flax_config.flax_use_orbax_checkpointing
  flax_config.update('flax_use_orbax_checkpointing', False)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    yield
  flax_config.update('flax_use_orbax_checkpointing', old)


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


# --------------------------------------------------------------------------
# One process: the file is flax's, byte for byte.

TREES = {
    'unsorted_nested': {'z': {'b': np.arange(3.0), 'a': jnp.ones((2, 2))},
                        'a': np.int32(4), 'm': {'y': 1, 'x': 2.5}},
    'containers': {'list': [1, (2, 3)], 'nt': Point(np.float32(1), 'u'),
                   'none': None, 'empty': {}, 'c': 1j, 'b': b'\x00\xff'},
    'dtypes': {'bf16': jnp.arange(4, dtype=jnp.bfloat16),
               'bool': np.array([True, False]), 'u8': np.arange(3, dtype='u1'),
               'scalar': np.float64(2.5), 'int': 7},
    'bare_array': np.arange(6.0).reshape(2, 3),
    'sharded_locally': jax.device_put(
        jnp.arange(16.0).reshape(8, 2),
        jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.array(jax.devices()), ('d',)),
            jax.sharding.PartitionSpec('d'))),
}


@pytest.mark.parametrize('name', sorted(TREES))
def test_single_process_bytes_equal_flax(tmp_path, name):
  tree = TREES[name]
  ours = save_checkpoint_multiprocess(tmp_path / 'ours', tree, 3)
  theirs = flax_checkpoints.save_checkpoint_multiprocess(
      tmp_path / 'flax', tree, 3)
  assert os.path.basename(ours) == os.path.basename(theirs) == 'checkpoint_3'
  assert _read(ours) == _read(theirs)
  assert sorted(os.listdir(tmp_path / 'ours')) == ['checkpoint_3']


def test_keys_are_sorted_unlike_save_checkpoint(tmp_path):
  tree = {'b': 1, 'a': 2}
  multi = save_checkpoint_multiprocess(tmp_path / 'm', tree, 1)
  single = checkpoints.save_checkpoint(tmp_path / 's', tree, 1)
  assert _read(multi) == serialization.msgpack_serialize(tree)  # sorted
  assert _read(single) == serialization.to_bytes(tree)  # insertion order
  assert _read(multi) != _read(single)
  assert checkpoints.restore_checkpoint(multi, None) == {'a': 2, 'b': 1}


def test_chunked_arrays_bytes_equal_flax(tmp_path, monkeypatch):
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 91 * 8)
  monkeypatch.setattr(flax_serialization, 'MAX_CHUNK_SIZE', 91 * 8)
  tree = {'w': np.arange(21 * 37, dtype=np.float64).reshape(21, 37), 'n': 1}
  ours = save_checkpoint_multiprocess(tmp_path / 'ours', tree, 0)
  theirs = flax_checkpoints.save_checkpoint_multiprocess(
      tmp_path / 'flax', tree, 0)
  assert _read(ours) == _read(theirs)
  back = checkpoints.restore_checkpoint(ours, None)
  np.testing.assert_array_equal(back['w'], tree['w'])


def test_async_save_and_retention_like_flax(tmp_path):
  am = checkpoints.AsyncManager()
  for step in range(5):
    tree = {'w': np.full(4, step), 'step': step}
    save_checkpoint_multiprocess(tmp_path / 'ours', tree, step, keep=2,
                                 async_manager=am)
    tree['w'][:] = -1  # the snapshot was taken before returning
    flax_checkpoints.save_checkpoint_multiprocess(tmp_path / 'flax',
                                                  {'w': np.full(4, step),
                                                   'step': step}, step,
                                                  keep=2)
  am.wait_previous_save()
  assert sorted(os.listdir(tmp_path / 'ours')) == sorted(
      os.listdir(tmp_path / 'flax')) == ['checkpoint_3', 'checkpoint_4']
  for name in ('checkpoint_3', 'checkpoint_4'):
    assert _read(tmp_path / 'ours' / name) == _read(tmp_path / 'flax' / name)


def test_outdated_step_raises_and_writes_nothing(tmp_path):
  save_checkpoint_multiprocess(tmp_path, {'a': 1}, 5)
  with pytest.raises(errors.InvalidCheckpointError, match='checkpoint_4'):
    save_checkpoint_multiprocess(tmp_path, {'a': 2}, 4)
  assert os.listdir(tmp_path) == ['checkpoint_5']
  save_checkpoint_multiprocess(tmp_path, {'a': 3}, 4, overwrite=True)
  assert os.listdir(tmp_path) == ['checkpoint_4']  # newer one removed


def test_unserializable_leaf_names_its_path(tmp_path):
  with pytest.raises(TypeError, match='/a/s'):
    save_checkpoint_multiprocess(tmp_path, {'a': {'s': {1, 2}}}, 1)
  assert not os.path.exists(tmp_path / 'checkpoint_1')


def test_reexported_by_lib_checkpoints():
  assert (checkpoints.save_checkpoint_multiprocess is
          save_checkpoint_multiprocess)


# --------------------------------------------------------------------------
# One process: the split and the restore-side checks.


def test_split_keeps_structure_without_multiprocess_arrays():
  local = jnp.ones(3)
  state = {'a': {'b': local, 'e': {}}, 'n': np.zeros(2), 's': 'text'}
  out, arrays = multiprocess_arrays.split_multiprocess_arrays(state)
  assert arrays == [] and out == state and out is not state
  assert out['a']['b'] is local
  assert multiprocess_arrays.split_multiprocess_arrays(local) == (local, [])


def test_restore_without_placeholders_is_identity():
  state = {'a': np.ones(2), 'b': {'c': 'plain string'}}
  assert multiprocess_arrays.restore_multiprocess_arrays(
      state, None, '/x/checkpoint_1', None, None) is state


def test_restore_placeholder_errors():
  ph = multiprocess_arrays.MP_ARRAY_PH
  state = {'p': {'w': ph + 'p/w'}, 'n': np.ones(2)}
  with pytest.raises(errors.MPACheckpointingRequiredError,
                     match='/x/checkpoint_1'):
    multiprocess_arrays.restore_multiprocess_arrays(
        state, {'p': {'w': jnp.ones(2)}, 'n': 0}, '/x/checkpoint_1', 1, None)
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=10)
  # A fully addressable array gives no cross-process sharding to restore to.
  for target in (None, {'p': {'w': jnp.ones(2)}, 'n': 0}, {'n': 0}):
    with pytest.raises(errors.MPARestoreTargetRequiredError, match='p/w'):
      multiprocess_arrays.restore_multiprocess_arrays(
          state, target, '/x/checkpoint_1', 1, mgr)
    out = multiprocess_arrays.restore_multiprocess_arrays(
        state, target, '/x/checkpoint_1', 1, mgr, allow_partial=True)
    assert out['p']['w'] == ph + 'p/w'


def test_restore_checkpoint_file_with_placeholders(tmp_path):
  # A file as process 0 writes it; no gda_manager -> the MPA error.
  ph = multiprocess_arrays.MP_ARRAY_PH
  path = str(tmp_path / 'checkpoint_7')
  checkpoint_io.write_checkpoint_file(
      {'p': {'w': ph + 'p/w'}, 'n': np.arange(2)}, path, path + '.tmp', False)
  with pytest.raises(errors.MPACheckpointingRequiredError):
    checkpoints.restore_checkpoint(tmp_path, None)
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=10)
  out = checkpoints.restore_checkpoint(tmp_path, None, gda_manager=mgr,
                                       allow_partial_mpa_restoration=True)
  assert out['p']['w'] == ph + 'p/w'
  np.testing.assert_array_equal(out['n'], np.arange(2))


def test_remote_paths_are_recognised():
  assert multiprocess_arrays.is_remote_path('gs://bucket/ckpts/checkpoint_1')
  assert multiprocess_arrays.is_remote_path('S3://bucket/c')
  assert not multiprocess_arrays.is_remote_path('/gs://x')
  assert not multiprocess_arrays.is_remote_path('ckpts/checkpoint_1')


# --------------------------------------------------------------------------
# Two real processes.


def _free_port() -> int:
  return harness.free_port((PORTS.start, PORTS.stop))


def test_two_processes_save_restore_retention_and_errors(tmp_path):
  codes, outputs = harness.run_workers(
      WORKER, tmp_path, timeout=CHILD_TIMEOUT_S, port=_free_port())
  report = '\n'.join(f'----- worker {i} (exit {c}) -----\n{out[-6000:]}'
                     for i, (c, out) in enumerate(zip(codes, outputs)))
  assert codes == [0, 0], report
  for i, out in enumerate(outputs):
    assert f'WORKER OK {i}' in out, report
  # Final layout: one file per step plus its array directory, no leftovers.
  assert sorted(os.listdir(tmp_path / 'ckpts')) == [
      'checkpoint_2', 'checkpoint_2_gda']
  assert sorted(os.listdir(tmp_path / 'flax')) == [
      'checkpoint_4', 'checkpoint_4_gda']
  state = checkpoint_io.read_checkpoint_file(
      str(tmp_path / 'ckpts' / 'checkpoint_2'))
  assert state['params'] == {
      'b': multiprocess_arrays.MP_ARRAY_PH + 'params/b',
      'w': multiprocess_arrays.MP_ARRAY_PH + 'params/w'}
