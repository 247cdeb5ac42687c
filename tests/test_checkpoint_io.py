"""lib.checkpoint_io: streamed files equal to_bytes, reads equal msgpack_restore.

Covers dtypes, layouts (non-contiguous, Fortran, big-endian, empty), chunking,
sort_keys, the parallel reader, durability (fsync order), bad files (every
truncation, random bytes, bit flips: each either decodes exactly like
``msgpack_restore`` or raises ``CheckpointReadError`` naming the file) and
the extra memory of saving and restoring a large tree.
"""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest

from gintrain.lib import checkpoint_io
from gintrain.lib import msgpack_stream
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import serialization

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def chunk_size():
  old = serialization.MAX_CHUNK_SIZE

  def set_size(n):
    serialization.MAX_CHUNK_SIZE = n

  yield set_size
  serialization.MAX_CHUNK_SIZE = old


@pytest.fixture
def small_read_pieces(monkeypatch):
  """Makes the reader use its parallel path on small files."""
  monkeypatch.setattr(checkpoint_io, '_READ_PIECE_BYTES', 4096)
  monkeypatch.setattr(checkpoint_io, '_INLINE_READ_BYTES', 64)
  monkeypatch.setattr(msgpack_stream, 'WINDOW_BYTES', 16)  # the shared reader


def same(a, b) -> bool:
  """Exact equality: types, dtypes, shapes, bytes; NaN equals NaN."""
  if type(a) is not type(b):
    return False
  if isinstance(a, dict):
    return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
  if isinstance(a, list):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
  if isinstance(a, (np.ndarray, np.generic)):
    return (a.dtype == b.dtype and a.shape == b.shape and
            a.tobytes() == b.tobytes())
  if isinstance(a, float):
    return a == b or (a != a and b != b)
  if isinstance(a, complex):
    return same(a.real, b.real) and same(a.imag, b.imag)
  return a == b


def copy_containers(tree):
  if isinstance(tree, dict):
    return {k: copy_containers(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [copy_containers(v) for v in tree]
  return tree


def reference_bytes(tree) -> bytes:
  """``to_bytes`` of a raw state dict (lists kept as msgpack arrays)."""
  return serialization.msgpack_serialize(copy_containers(tree), in_place=True)


def write(tmp_path, tree, name='ck_1', **kw):
  path = str(tmp_path / name)
  checkpoint_io.write_checkpoint_file(tree, path, str(tmp_path / 'ck_tmp'),
                                      overwrite=True, **kw)
  return path


DTYPES = ['bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
          'uint32', 'uint64', 'float16', 'float32', 'float64', 'longdouble',
          'complex64', 'complex128', 'clongdouble', 'datetime64[s]',
          'timedelta64[ms]', 'S3', 'U2', 'V4', ml_dtypes.bfloat16,
          ml_dtypes.float8_e4m3fn, ml_dtypes.int4]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('shape', [(), (5,), (0, 3), (3, 1, 4)])
def test_dtypes_and_shapes(tmp_path, dtype, shape):
  dtype = np.dtype(dtype)
  raw = np.random.default_rng(0).integers(0, 256, size=int(
      np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
  arr = raw.view(dtype).reshape(shape) if raw.size else np.zeros(shape, dtype)
  tree = {'a': arr, 's': arr[()] if arr.ndim == 0 else arr[:1]}
  path = write(tmp_path, tree)
  with open(path, 'rb') as f:
    data = f.read()
  assert data == serialization.to_bytes(tree)
  assert same(checkpoint_io.read_checkpoint_file(path),
              serialization.msgpack_restore(data))


@pytest.mark.parametrize('make', [
    lambda: np.arange(200_000.0).reshape(400, 500).T,  # non-contiguous
    lambda: np.asfortranarray(np.arange(120_000).reshape(300, 400)),
    lambda: np.arange(100_000.0)[::3],  # strided 1-d
    lambda: np.arange(100_000, dtype='>i4'),  # big-endian, stored LE
    lambda: np.arange(100_000, dtype='>f8').reshape(100, 1000)[:, ::2],
    lambda: jnp.arange(70_000, dtype=jnp.bfloat16),
], ids=['transposed', 'fortran', 'strided', 'big_endian', 'be_strided', 'jax'])
@pytest.mark.parametrize('max_chunk', [2**30, 40_000])
def test_layouts(tmp_path, chunk_size, make, max_chunk):
  chunk_size(max_chunk)
  arr = make()
  tree = {'x': arr, 'l': [arr], 'n': {'y': arr}}
  path = write(tmp_path, tree)
  with open(path, 'rb') as f:
    data = f.read()
  assert data == reference_bytes(tree)
  got = checkpoint_io.read_checkpoint_file(path)
  assert same(got, serialization.msgpack_restore(data))
  np.testing.assert_array_equal(got['x'], np.asarray(arr))
  assert got['x'].dtype.byteorder in '=|'


def test_chunking_and_read_only_flags_match_msgpack_restore(tmp_path,
                                                             chunk_size):
  chunk_size(728)
  tree = {'w': np.arange(21 * 37, dtype=np.float64).reshape(21, 37),
          'small': np.ones(3), 'in_list': [np.arange(200.0)],
          'top': {'deeper': {'v': np.arange(100, dtype=np.int8)}}}
  path = write(tmp_path, tree)
  with open(path, 'rb') as f:
    data = f.read()
  assert data == reference_bytes(tree)
  ours = checkpoint_io.read_checkpoint_file(path)
  theirs = serialization.msgpack_restore(data)
  assert same(ours, theirs)
  for key in ('w', 'small'):
    assert ours[key].flags.writeable == theirs[key].flags.writeable
  assert ours['w'].flags.writeable and not ours['small'].flags.writeable
  # Arrays below a list are neither chunked nor unchunked (flax's walk).
  assert ours['in_list'][0].shape == (200,)
  # A chunked bare array at the top level.
  path = write(tmp_path, np.arange(500.0), name='ck_2')
  np.testing.assert_array_equal(checkpoint_io.read_checkpoint_file(path),
                                np.arange(500.0))


def test_unusual_chunk_layouts_decode_like_msgpack_restore(tmp_path):
  chunked = serialization.CHUNKED_KEY
  trees = [
      # chunks in a non-standard order of keys, 2-d chunks, mixed dtypes
      {'a': {'chunks': {'0': np.arange(3.0), '1': np.arange(2.0)},
             'shape': {'0': 5}, chunked: True}},
      {'a': {chunked: True, 'shape': {'0': 2, '1': 3},
             'chunks': {'0': np.ones((1, 3)), '1': np.zeros((1, 3))}}},
      {'a': {chunked: 1, 'shape': {'0': 4},
             'chunks': {'0': np.ones(2, np.int32), '1': np.ones(2)}}},
      [{chunked: True, 'shape': {'0': 1}, 'chunks': {'0': np.ones(1)}}],
  ]
  for i, tree in enumerate(trees):
    data = msgpack.packb(tree, default=serialization._msgpack_ext_pack)
    path = tmp_path / f'odd_{i}'
    path.write_bytes(data)
    assert same(checkpoint_io.read_checkpoint_file(str(path)),
                serialization.msgpack_restore(data)), i


def test_deeply_nested_tree(tmp_path):
  tree = {'leaf': np.ones(2)}
  for i in range(300):
    tree = {f'k{i}': tree, 'x': [i]}
  path = write(tmp_path, tree)
  with open(path, 'rb') as f:
    data = f.read()
  assert data == reference_bytes(tree)
  assert same(checkpoint_io.read_checkpoint_file(path),
              serialization.msgpack_restore(data))


def test_sort_keys_matches_msgpack_serialize(tmp_path):
  tree = {'b': {'z': 1, 'a': [{'y': 2, 'x': np.ones(2)}]}, 'a': np.zeros(3)}
  path = write(tmp_path, tree, sort_keys=True)
  with open(path, 'rb') as f:
    assert f.read() == serialization.msgpack_serialize(tree)
  path = write(tmp_path, tree, name='ck_2')
  with open(path, 'rb') as f:
    assert f.read() == serialization.msgpack_serialize(tree, in_place=True)


def test_parallel_and_sequential_reads_agree(tmp_path, small_read_pieces,
                                             chunk_size):
  chunk_size(5000)
  rng = np.random.default_rng(1)
  tree = {f'k{i}': rng.normal(size=int(n)).astype(np.float32)
          for i, n in enumerate(rng.integers(0, 20_000, size=40))}
  tree['scalar'] = np.float32(3)
  path = write(tmp_path, tree)
  with open(path, 'rb') as f:
    expected = serialization.msgpack_restore(f.read())
  assert same(checkpoint_io.read_checkpoint_file(path, parallel=True),
              expected)
  assert same(checkpoint_io.read_checkpoint_file(path, parallel=False),
              expected)


def test_encode_errors_name_the_leaf(tmp_path):
  with pytest.raises(TypeError, match='/a/1'):
    checkpoint_io.encode({'a': [1, (2, 3)]})
  with pytest.raises(ValueError, match='object'):
    checkpoint_io.encode({'o': np.array([None])})
  with pytest.raises(OverflowError):
    checkpoint_io.encode({'i': 2**64})
  with pytest.raises(TypeError):
    checkpoint_io.write_file({'x': {1, 2}}, str(tmp_path / 'f'))
  assert not os.path.exists(tmp_path / 'f')


def test_commit_protocol_and_fsync_order(tmp_path, monkeypatch):
  calls = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    calls.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
    return real_fsync(fd)

  def replace(src, dst):
    calls.append(('rename', src, dst))
    return real_replace(src, dst)

  monkeypatch.setattr(os, 'fsync', fsync)
  monkeypatch.setattr(os, 'replace', replace)
  final, tmp = str(tmp_path / 'new' / 'ck_1'), str(tmp_path / 'new' / 'ck_tmp')
  checkpoint_io.write_checkpoint_file({'a': 1}, final, tmp, overwrite=False)
  assert calls == [
      ('fsync', str(tmp_path)),  # the new directory's entry
      ('fsync', tmp),
      ('rename', tmp, final),
      ('fsync', str(tmp_path / 'new')),
  ]
  assert os.listdir(tmp_path / 'new') == ['ck_1']
  with pytest.raises(errors.AlreadyExistsError, match='ck_1'):
    checkpoint_io.write_checkpoint_file({'a': 2}, final, tmp, overwrite=False)
  assert checkpoint_io.read_checkpoint_file(final) == {'a': 1}
  checkpoint_io.write_checkpoint_file({'a': 3}, final, tmp, overwrite=True)
  assert checkpoint_io.read_checkpoint_file(final) == {'a': 3}


# ---------------------------------------------------------------------------
# Bad files.


def check_bad_file(path, data):
  """Ours decodes exactly like msgpack_restore, or raises naming the file."""
  with open(path, 'wb') as f:
    f.write(data)
  try:
    expected = serialization.msgpack_restore(data)
  except Exception:  # pylint: disable=broad-except
    expected = None
  try:
    got = checkpoint_io.read_checkpoint_file(path)
  except errors.CheckpointReadError as e:
    assert path in str(e) and e.path == path
    assert expected is None, (data, expected)
    return False
  assert same(got, expected), (data, got, expected)
  return True


def sample_file(chunk_size):
  chunk_size(100)
  return serialization.to_bytes({
      'params': {'w': np.arange(30, dtype=np.float32).reshape(5, 6),
                 'b': np.ones(2, np.float16)},
      'step': np.int32(4), 'lr': 0.5, 'name': 'x', 'l': [1, None, 2j]})


def test_every_truncation_raises(tmp_path, chunk_size):
  data = sample_file(chunk_size)
  path = str(tmp_path / 'checkpoint_1')
  for n in range(len(data)):
    with open(path, 'wb') as f:
      f.write(data[:n])
    with pytest.raises(errors.CheckpointReadError, match='checkpoint_1'):
      checkpoint_io.read_checkpoint_file(path)
  with open(path, 'wb') as f:
    f.write(data + b'\x00')
  with pytest.raises(errors.CheckpointReadError, match='extra bytes'):
    checkpoint_io.read_checkpoint_file(path)


def test_bit_flips_and_random_bytes(tmp_path, chunk_size):
  data = sample_file(chunk_size)
  path = str(tmp_path / 'checkpoint_2')
  rng = np.random.default_rng(0)
  decoded = 0
  for i in range(len(data)):
    for bit in (0, 3, 7):
      mutated = bytearray(data)
      mutated[i] ^= 1 << bit
      decoded += check_bad_file(path, bytes(mutated))
  assert decoded > 0  # flips inside array data still decode
  for n in list(range(1, 40)) + [100, 1000, 10_000]:
    for _ in range(20 if n < 100 else 5):
      check_bad_file(path, rng.integers(0, 256, n, dtype=np.uint8).tobytes())


@pytest.mark.parametrize('data,reason', [
    (b'', 'empty'),
    (b'\xc1', 'invalid msgpack byte'),
    (b'\xdd\xff\xff\xff\xff', 'truncated'),
    (b'\xc6\xff\xff\xff\xff', 'truncated'),
    (b'\x91' * 10_000, 'nesting too deep'),
    (b'\x81\x91\x01\x02', 'unhashable'),
    (b'\xa2\xff\xfe', 'UTF-8'),
])
def test_specific_bad_files(tmp_path, data, reason):
  path = str(tmp_path / 'checkpoint_3')
  with open(path, 'wb') as f:
    f.write(data)
  with pytest.raises(errors.CheckpointReadError, match=reason) as e:
    checkpoint_io.read_checkpoint_file(path)
  assert path in str(e.value)


def ext_array(shape, dtype_name: bytes, payload: bytes) -> bytes:
  inner = msgpack.packb([shape, dtype_name, payload], use_bin_type=True)
  return msgpack.packb(msgpack.ExtType(1, inner))


@pytest.mark.parametrize('data,reason', [
    (ext_array([1], b'object', b'\x00' * 8), 'object dtype'),
    (ext_array([1], b'V8,O', b'\x00' * 16), 'object dtype'),
    (ext_array([2], b'float32', b'\x00' * 4), 'does not fit'),
    (ext_array([-1], b'float32', b'\x00' * 4), 'bad array shape'),
    (ext_array([10**12], b'uint8', b'\x00' * 4), 'does not fit'),
    (ext_array([1], b'no_such_dtype', b'\x00'), 'bad array dtype'),
    (ext_array([1], b'(1000,)f4', b'\x00' * 4000), 'unsupported dtype'),
])
def test_malicious_arrays_are_refused(tmp_path, data, reason):
  path = str(tmp_path / 'checkpoint_4')
  with open(path, 'wb') as f:
    f.write(data)
  with pytest.raises(errors.CheckpointReadError, match=reason):
    checkpoint_io.read_checkpoint_file(path)


def test_restore_checkpoint_reports_corrupt_file(tmp_path):
  path = checkpoints.save_checkpoint(tmp_path, {'w': np.ones(100)}, 1)
  with open(path, 'r+b') as f:
    f.truncate(500)
  with pytest.raises(errors.CheckpointReadError, match='checkpoint_1'):
    checkpoints.restore_checkpoint(tmp_path, None)
  (tmp_path / 'sub').mkdir()
  with pytest.raises(IsADirectoryError):
    checkpoint_io.read_checkpoint_file(str(tmp_path / 'sub'))


# ---------------------------------------------------------------------------
# Memory.

_MEMORY_SCRIPT = textwrap.dedent('''
    import os, resource, sys
    import numpy as np
    from gintrain.lib import checkpoint_io, serialization
    serialization.MAX_CHUNK_SIZE = 2**24  # the 64 MiB leaf is chunked
    def peak():
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    path, mode = sys.argv[1], sys.argv[2]
    if mode == 'save':
      tree = {'big': np.ones(2**24, np.float32),
              'layers': {str(i): np.full(2**20, i, np.float32)
                         for i in range(64)}}
      size = 2**26 + 64 * 2**22
      before = peak()
      checkpoint_io.write_checkpoint_file(tree, path, path + '.tmp', True)
    else:
      size = os.path.getsize(path)
      before = peak()
      tree = checkpoint_io.read_checkpoint_file(path)
      assert tree['layers']['63'][0] == 63 and tree['big'].sum() == 2**24
    print((peak() - before) / size)
''')


def test_extra_memory_of_save_and_restore(tmp_path):
  path = str(tmp_path / 'ck_1')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  ratios = {}
  for mode in ('save', 'restore'):
    out = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, path, mode],
                         env=env, capture_output=True, text=True, check=True)
    ratios[mode] = float(out.stdout.split()[-1])
  # A save needs no copy of the tree; a restore only the restored arrays.
  assert ratios['save'] < 0.05, ratios
  assert ratios['restore'] < 1.05, ratios
