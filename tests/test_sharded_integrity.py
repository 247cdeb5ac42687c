"""Integrity of sharded checkpoint arrays (``<checkpoint>_gda``).

One process with 8 CPU devices writes sharded arrays the way every process
of a multi-process save does (``lib.multiprocess_arrays``), then each kind
of damage (a chunk file deleted, truncated, swapped with another valid one,
overwritten with garbage; the array metadata or an integrity manifest
missing) must raise ``CheckpointReadError`` naming the array, from
``verify_arrays`` and from a restore, never return a fill value. The runner
test that damages a real 2-process FSDP checkpoint and resumes is in
tests/test_sharding.py (test_runner_falls_back_past_a_swapped_chunk_on_two_
processes), on that module's uninterrupted run.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import errors
from gintrain.lib import multiprocess_arrays as mpa

PH = mpa.MP_ARRAY_PH
W = np.arange(8 * 8, dtype=np.float32).reshape(8, 8) + 1
B = (np.arange(4, dtype=np.float32) - 10).astype(jnp.bfloat16)


def _mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))


def _sharded(value, spec):
  return jax.device_put(value, NamedSharding(_mesh(), spec))


def _save(root, arrays, manifests=True):
  """Writes ``{subpath: array}`` as the arrays of ``<root>/checkpoint_1``
  (prepare, every shard, commit), as save_checkpoint_multiprocess does."""
  ckpt, tmp = str(root / 'checkpoint_1'), str(root / '.checkpoint_1.tmp')
  mpa.prepare_array_dir(tmp, ckpt, list(arrays))
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=30)
  if manifests:
    mpa.save_multiprocess_arrays(
        mgr, list(arrays.items()), tmp, ckpt,
        on_commit=lambda: mpa.commit_array_dir(tmp, ckpt))
  else:  # the layout flax writes: no integrity data
    mgr.serialize(list(arrays.values()),
                  [mpa._array_spec(os.path.join(mpa.array_dir(tmp), k))  # pylint: disable=protected-access
                   for k in arrays],
                  on_commit_callback=lambda: os.rename(
                      mpa.array_dir(tmp), mpa.array_dir(ckpt)))
  mgr.wait_until_finished()
  state = {'params': {k.split('/')[1]: PH + k for k in arrays}, 'n': 3}
  return ckpt, state


def _shardings(spec_w=P('data', 'model'), spec_b=P('data')):
  return {'params': {'w': NamedSharding(_mesh(), spec_w),
                     'b': NamedSharding(_mesh(), spec_b)}, 'n': None}


@pytest.fixture
def saved(tmp_path):
  arrays = {'params/w': _sharded(W, P('data', 'model')),
            'params/b': _sharded(B, P())}
  return _save(tmp_path, arrays)


def _restore(ckpt, state, **kw):
  out = mpa.read_arrays(state, ckpt, _shardings(**kw))
  return {k: np.asarray(v) for k, v in out['params'].items()}


def test_manifests_are_written_before_the_commit_and_restore_exactly(saved):
  ckpt, state = saved
  directory = mpa.array_dir(ckpt)
  assert os.listdir(os.path.join(directory, mpa.INTEGRITY_DIR)) == [
      'process_0.json']
  merged, _ = mpa.load_manifests(directory)
  assert len(merged['params/w']['chunks']) == 8  # one per 2x4 shard
  assert len(merged['params/b']['chunks']) == 1  # replicated: written once
  mpa.verify_arrays(ckpt, state)
  for kw in ({}, {'spec_w': P(None, 'data'), 'spec_b': P()},
             {'spec_w': P(('data', 'model'))}):  # elastic: other slices
    got = _restore(ckpt, state, **kw)
    np.testing.assert_array_equal(got['w'], W)
    assert got['b'].dtype == B.dtype
    np.testing.assert_array_equal(got['b'], B)


def _chunk_files(ckpt, name='w'):
  folder = os.path.join(mpa.array_dir(ckpt), 'params', name)
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if not f.startswith('.'))


def _delete(ckpt):
  os.remove(_chunk_files(ckpt)[0])


def _truncate(ckpt):
  path = _chunk_files(ckpt)[0]
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _swap(ckpt):
  a, b = _chunk_files(ckpt)[:2]
  os.rename(a, a + '.x')
  os.rename(b, a)
  os.rename(a + '.x', b)


def _garbage(ckpt):
  path = _chunk_files(ckpt)[0]
  size = os.path.getsize(path)
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(size))


def _missing_metadata(ckpt):
  folder = os.path.join(mpa.array_dir(ckpt), 'params', 'w')
  meta = [f for f in os.listdir(folder) if f in ('.zarray', 'zarr.json')]
  assert meta, os.listdir(folder)
  os.remove(os.path.join(folder, meta[0]))


def _missing_manifest(ckpt):
  os.remove(os.path.join(mpa.array_dir(ckpt), mpa.INTEGRITY_DIR,
                         'process_0.json'))


def _damaged_manifest(ckpt):
  path = os.path.join(mpa.array_dir(ckpt), mpa.INTEGRITY_DIR,
                      'process_0.json')
  with open(path, 'r+b') as f:
    f.truncate(10)


DAMAGE = {'delete': _delete, 'truncate': _truncate, 'swap': _swap,
          'garbage': _garbage, 'missing_metadata': _missing_metadata}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_each_damage_raises_naming_the_array(saved, kind):
  ckpt, state = saved
  DAMAGE[kind](ckpt)
  name = os.path.join(mpa.array_dir(ckpt), 'params', 'w')
  for check in (lambda: mpa.verify_arrays(ckpt, state),
                lambda: _restore(ckpt, state),
                lambda: _restore(ckpt, state, spec_w=P(('data', 'model')))):
    with pytest.raises(errors.CheckpointReadError) as info:
      check()
    message = str(info.value)
    assert f'"{name}"' in message, message
    assert '\n' not in message, message
    assert isinstance(info.value, ValueError)  # what the runner falls back on


@pytest.mark.parametrize('damage', [_missing_manifest, _damaged_manifest])
def test_a_missing_or_damaged_manifest_is_corrupt(saved, damage):
  ckpt, state = saved
  damage(ckpt)
  with pytest.raises(errors.CheckpointReadError, match='process_0.json'):
    mpa.verify_arrays(ckpt, state)
  with pytest.raises(errors.CheckpointReadError, match='process_0.json'):
    _restore(ckpt, state)


def test_a_fill_value_is_never_returned_for_a_written_chunk(tmp_path):
  # Every chunk file of w deleted: the store would return zeros.
  ckpt, state = _save(tmp_path, {'params/w': _sharded(W, P('data')),
                                 'params/b': _sharded(B, P())})
  for path in _chunk_files(ckpt):
    os.remove(path)
  with pytest.raises(errors.CheckpointReadError, match='does not match'):
    _restore(ckpt, state)


def test_a_checkpoint_read_by_more_devices_checks_the_whole_chunks(tmp_path):
  # Written as one slice, read as 8: each read covers part of the chunk,
  # which is then read whole and checked.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt, state = _save(tmp_path, {'params/w': jax.device_put(W, one),
                                 'params/b': jax.device_put(B, one)})
  got = _restore(ckpt, state, spec_w=P('data', 'model'))
  np.testing.assert_array_equal(got['w'], W)
  _garbage(ckpt)
  with pytest.raises(errors.CheckpointReadError, match='params/w'):
    _restore(ckpt, state, spec_w=P('data', 'model'))


def test_arrays_without_integrity_data_still_restore(tmp_path):
  # flax's layout (no manifests) restores unchecked; its metadata is checked.
  ckpt, state = _save(tmp_path, {'params/w': _sharded(W, P('data', 'model')),
                                 'params/b': _sharded(B, P())},
                      manifests=False)
  assert not os.path.exists(os.path.join(mpa.array_dir(ckpt),
                                         mpa.INTEGRITY_DIR))
  mpa.verify_arrays(ckpt, state)
  np.testing.assert_array_equal(_restore(ckpt, state)['w'], W)
  _missing_metadata(ckpt)
  with pytest.raises(errors.CheckpointReadError, match='params/w'):
    mpa.verify_arrays(ckpt, state)


def test_a_missing_array_directory_is_corrupt(saved):
  ckpt, state = saved
  shutil.rmtree(os.path.join(mpa.array_dir(ckpt), 'params', 'b'))
  with pytest.raises(errors.CheckpointReadError, match='missing'):
    mpa.verify_arrays(ckpt, state)
