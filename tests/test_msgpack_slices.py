"""Slice reads of single-file msgpack checkpoints (``lib.msgpack_slices``):
a checkpoint written by one process, restored into sharded targets, reads
only the boxes the devices hold, exactly, whatever the sharding, chunking
or dtype; files it cannot vouch for that way are read whole. (Two real
processes each reading half: tests/test_sharded_two_process.py.)"""

import doctest
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xxhash
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import msgpack_slices as ms
from gintrain.lib import packed_arrays
from gintrain.lib import serialization
from gintrain.lib.checkpoints_multiprocess import restore_checkpoint

# 1 MiB and more: left unread until placed.
BIG = np.arange(512 * 640, dtype=np.float32).reshape(512, 640)
WIDE = (np.arange(64 * 8 * 1024) % 251).astype(jnp.bfloat16).reshape(
    64, 8, 1024)
SMALL = np.arange(6.0, dtype=np.float32)

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def _mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))


def _named(spec):
  return NamedSharding(_mesh(), spec)


def _target(big=P('data'), wide=P(None, 'data', 'model'), small=P()):
  return {'big': jax.ShapeDtypeStruct(BIG.shape, BIG.dtype,
                                      sharding=_named(big)),
          'wide': jax.ShapeDtypeStruct(WIDE.shape, WIDE.dtype,
                                       sharding=_named(wide)),
          'small': jax.ShapeDtypeStruct(SMALL.shape, SMALL.dtype,
                                        sharding=_named(small)),
          'step': 0, 'other': np.zeros(2)}


@pytest.fixture
def saved(tmp_path):
  checkpoints.save_checkpoint(str(tmp_path), {
      'big': BIG, 'wide': WIDE, 'small': SMALL, 'step': 7,
      'other': np.arange(2.0) + BIG.nbytes}, 1)
  return str(tmp_path / 'checkpoint_1')


def test_doctests():
  for module in (ms, packed_arrays):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0, module


def _check(out, target):
  for name, full in (('big', BIG), ('wide', WIDE), ('small', SMALL)):
    arr = out[name]
    assert isinstance(arr, jax.Array), name
    assert arr.sharding == target[name].sharding, name
    assert arr.dtype == full.dtype, name
    np.testing.assert_array_equal(np.asarray(arr), full)
  assert out['step'] == 7
  np.testing.assert_array_equal(out['other'], np.arange(2.0) + BIG.nbytes)


@pytest.mark.parametrize('specs', [
    {},  # rows; wide: 1 KiB runs (split last axis): read with their rows
    {'big': P(None, 'data')},  # 640-byte runs: read with their rows
    {'big': P('data', 'model'), 'wide': P('model')},
    {'big': P(), 'wide': P()},  # replicated: one read per box
])
def test_restores_exact_into_any_sharding_reading_each_box_once(
    saved, specs):
  target = _target(**specs)
  before = ms.bytes_read()
  out = restore_checkpoint(saved, target)
  read = ms.bytes_read() - before
  _check(out, target)
  # One process holds every device: each stored byte is read exactly once
  # (replicas share one read, a widened box is read once for all boxes).
  assert read == BIG.nbytes + WIDE.nbytes, read


def test_only_the_boxes_of_the_devices_are_read(saved):
  tree = ms.read_lazily(saved)
  big = tree['big']
  assert isinstance(big, ms.StoredArray) and big.shape == BIG.shape
  assert isinstance(tree['small'], np.ndarray)  # small: read while parsing
  # A sharding over 2 of the 8 devices: only their rows are read.
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  before = ms.bytes_read()
  arr, = ms.place([(big, NamedSharding(mesh, P('data')))])
  assert ms.bytes_read() - before == BIG.nbytes
  np.testing.assert_array_equal(np.asarray(arr), BIG)
  before = ms.bytes_read()
  part = big.read_box(((100, 200), (0, 640)))
  assert ms.bytes_read() - before == 100 * 640 * 4
  np.testing.assert_array_equal(part, BIG[100:200])
  whole = big.read()
  assert not whole.flags.writeable
  np.testing.assert_array_equal(whole, BIG)


def test_chunked_arrays_are_read_across_their_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 100_000)
  path = checkpoints.save_checkpoint(str(tmp_path), {'big': BIG}, 1)
  tree = ms.read_lazily(path)
  assert len(tree['big'].segments) == -(-BIG.nbytes // 100_000)
  for spec in (P('data'), P(None, 'data'), P(('data', 'model'))):
    out = restore_checkpoint(path, {'big': jax.ShapeDtypeStruct(
        BIG.shape, BIG.dtype, sharding=_named(spec))})
    np.testing.assert_array_equal(np.asarray(out['big']), BIG)
  np.testing.assert_array_equal(tree['big'].read_box(((3, 301), (7, 9))),
                                BIG[3:301, 7:9])


def test_files_it_cannot_vouch_for_are_read_whole(saved, tmp_path):
  # A version-1 integrity sidecar hashes the whole file: read whole, and
  # checked. (Block-hashed sidecars: tests/test_sidecar_slices.py.)
  path = checkpoints.save_checkpoint(str(tmp_path / 'side'), {'big': BIG}, 1)
  with open(path, 'rb') as f:
    digest = xxhash.xxh3_64_hexdigest(f.read())
  with open(checkpoint_naming.sidecar_path(path), 'w', encoding='ascii') as f:
    f.write(f'xxh3_64 {digest} {os.path.getsize(path)}\n')
  assert ms.read_lazily(path) is None
  target = {'big': _target()['big']}
  before = ms.bytes_read()
  out = restore_checkpoint(path, target)
  assert ms.bytes_read() == before
  np.testing.assert_array_equal(np.asarray(out['big']), BIG)
  with open(path, 'r+b') as f:  # a flipped byte: the sidecar catches it
    f.seek(os.path.getsize(path) // 2)
    f.write(b'\x01')
  with pytest.raises(errors.CheckpointReadError, match='integrity sidecar'):
    restore_checkpoint(path, target)
  # Truncated: the whole read's error names the file.
  with open(saved, 'r+b') as f:
    f.truncate(os.path.getsize(saved) - 1000)
  assert ms.read_lazily(saved) is None
  with pytest.raises(errors.CheckpointReadError, match='checkpoint_1'):
    restore_checkpoint(saved, _target())
  assert ms.read_lazily('s3://bucket/checkpoint_1') is None


def test_a_file_changed_after_parsing_raises_naming_it(saved):
  tree = ms.read_lazily(saved)
  with open(saved, 'r+b') as f:
    f.truncate(1000)
  with pytest.raises(errors.CheckpointReadError, match='checkpoint_1'):
    ms.place([(tree['big'], _named(P('data')))])


def test_without_shardings_nothing_is_left_unread(saved):
  out = restore_checkpoint(saved, None)
  assert isinstance(out['big'], np.ndarray)
  out = restore_checkpoint(saved, {'big': np.zeros(1), 'wide': 0,
                                   'small': 0, 'step': 0, 'other': 0})
  assert isinstance(out['big'], np.ndarray) and isinstance(
      out['wide'], np.ndarray)
  np.testing.assert_array_equal(out['big'], BIG)
  assert ms.materialize({'a': [ms.read_lazily(saved)['big']]})['a'][
      0].shape == BIG.shape
