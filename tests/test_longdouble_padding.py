"""Long doubles are written with defined bytes, so saves are deterministic.

x86's long double keeps 10 bytes of x87 extended precision in a 16-byte slot;
numpy leaves the other 6 bytes uninitialised whenever it converts a value (a
numpy scalar to an array, a byte swap). Before the fix, two saves of one
``np.clongdouble`` scalar could differ in those bytes (tests/test_checkpoint_io's
``[shape0-clongdouble]`` failed about 1 run in 11) and carried heap contents.
"""

import numpy as np
import pytest

from gintrain.lib import checkpoint_io
from gintrain.lib import serialization

PADDED = np.finfo(np.longdouble).nmant == 63 and np.dtype(
    np.longdouble).itemsize > 10
needs_padding = pytest.mark.skipif(
    not PADDED, reason='long double has no padding bytes on this platform')


def _dirty_heap(nbytes: int):
  """Frees buffers full of 0xAB of ``nbytes``; numpy reuses such buffers for
  its next small allocations of that size."""
  junk = [np.full(nbytes, 0xAB, np.uint8) for _ in range(16)]
  del junk


def _padding(data: bytes, value_bytes: bytes) -> bytes:
  """The padding bytes of the long doubles stored as ``value_bytes``' slots
  (found by their 10 value bytes) in the file ``data``."""
  slot = np.dtype(np.longdouble).itemsize
  out = b''
  for i in range(0, len(value_bytes), slot):
    at = data.index(value_bytes[i:i + 10])
    out += data[at + 10:at + slot]
  return out


@needs_padding
@pytest.mark.parametrize('dtype', [np.longdouble, np.clongdouble])
def test_scalar_padding_is_zero_whatever_the_heap_held(dtype):
  value = dtype(1.25) if dtype is np.longdouble else dtype(1.25 - 3.5j)
  for _ in range(20):
    _dirty_heap(np.dtype(dtype).itemsize)
    data = serialization.to_bytes({'s': value})
    assert _padding(data, value.tobytes()) == bytes(len(_padding(
        data, value.tobytes())))
    assert serialization.msgpack_restore(data)['s'] == value


@needs_padding
def test_big_endian_long_doubles_are_swapped_with_zero_padding(tmp_path):
  arr = np.array([1.5, -2.25, 3.0], dtype=np.dtype(np.longdouble).newbyteorder(
      '>'))
  outs = set()
  for i in range(10):
    _dirty_heap(arr.nbytes)
    path = str(tmp_path / f'ck_{i}')
    checkpoint_io.write_checkpoint_file({'a': arr}, path,
                                        str(tmp_path / 'tmp'), overwrite=True)
    with open(path, 'rb') as f:
      data = f.read()
    outs.add(data)
    assert data == serialization.to_bytes({'a': arr})
  assert len(outs) == 1
  restored = serialization.msgpack_restore(outs.pop())['a']
  np.testing.assert_array_equal(restored, arr.astype(np.longdouble))


@pytest.mark.parametrize('rep', range(200))
def test_random_bytes_clongdouble_scalar_same_bytes_twice(tmp_path, rep):
  """The flaky case of test_checkpoint_io, 200 times: a 0-d array of random
  bytes and its scalar, written by the streaming writer and by to_bytes."""
  raw = np.random.default_rng(rep).integers(0, 256, 32, dtype=np.uint8)
  arr = raw.view(np.clongdouble).reshape(())
  tree = {'a': arr, 's': arr[()]}
  _dirty_heap(32)
  path = str(tmp_path / 'ck_1')
  checkpoint_io.write_checkpoint_file(tree, path, str(tmp_path / 'tmp'),
                                      overwrite=True)
  _dirty_heap(32)
  with open(path, 'rb') as f:
    assert f.read() == serialization.to_bytes(tree)
