"""Block-hashed integrity sidecars (``lib.checkpoint_sidecar``, issue 21).

* The sidecar holds one xxh3-64 hash per block, the same for any split of
  the writes; a whole read checks every block (a flipped byte anywhere is
  caught); version-1 sidecars (one hash of the whole file) still verify
  (tests/test_msgpack_slices.py, tests/test_object_store_sidecar.py).
* Slices of a checkpoint with such a sidecar are read in checked whole
  blocks (``lib.msgpack_slices``): a slice reads its blocks only (well
  under the file), exact; a flipped byte in a block read raises
  ``CheckpointReadError`` naming the file and the byte range, while a slice
  elsewhere still reads; a flipped byte in the framing raises on parsing.

Two real processes: tests/test_sharded_two_process.py.
"""

import doctest
import os

import jax
import numpy as np
import pytest
import xxhash
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoint_sidecar
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import msgpack_slices as ms
from gintrain.lib.checkpoints_multiprocess import restore_checkpoint

BLOCK = 64 << 10
# 2 MiB: 32 blocks of 64 KiB.
BIG = np.arange(1024 * 512, dtype=np.float32).reshape(1024, 512)
SMALL = np.arange(10.0)

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def test_doctests():
  result = doctest.testmod(checkpoint_sidecar)
  assert result.failed == 0 and result.attempted > 0


@pytest.fixture
def saved(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint_sidecar, 'BLOCK_BYTES', BLOCK)
  checkpoint_io.set_integrity_sidecar(True)
  try:
    path = checkpoints.save_checkpoint(
        str(tmp_path), {'big': BIG, 'small': SMALL, 'n': 3}, 1)
  finally:
    checkpoint_io.set_integrity_sidecar('auto')
  return path


def _sidecar(path):
  with open(checkpoint_naming.sidecar_path(path), 'rb') as f:
    return f.read()


def _flip(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 1]))


def test_block_hashes_do_not_depend_on_how_the_writes_split(saved):
  with open(saved, 'rb') as f:
    data = f.read()
  side = checkpoint_sidecar.parse(saved, _sidecar(saved))
  assert side.has_blocks and side.size == len(data)
  assert side.block_bytes == BLOCK and len(side.blocks) == -(-len(data) //
                                                              BLOCK)
  assert side.blocks[3] == xxhash.xxh3_64_intdigest(
      data[3 * BLOCK:4 * BLOCK])
  for cuts in ([1, 2, 70000, 65536 * 3], [BLOCK, 2 * BLOCK], [5, 200000]):
    hasher = checkpoint_sidecar.Hasher(BLOCK)
    for a, b in zip([0] + cuts, cuts + [len(data)]):
      hasher.update(data[a:b])
    assert hasher.text(len(data)) == _sidecar(saved)
  # The main file is flax's bytes: the same with no sidecar.
  plain = checkpoints.save_checkpoint(os.path.dirname(saved) + '/plain',
                                      {'big': BIG, 'small': SMALL, 'n': 3}, 1)
  with open(plain, 'rb') as f:
    assert f.read() == data


def test_a_damaged_sidecar_is_malformed(saved):
  text = _sidecar(saved)
  lines = text.split(b'\n')
  lines[2] = b'%016x' % (int(lines[2], 16) ^ 1)  # the root no longer fits
  for bad in (b'\n'.join(lines), text[:-1], text.replace(b'65536', b'1024'),
              text + b'0123456789abcdef\n'):
    with pytest.raises(errors.CheckpointReadError, match='malformed'):
      checkpoint_sidecar.parse(saved, bad)


def test_a_whole_read_checks_every_block(saved):
  assert checkpoint_io.verify_sidecar(saved)
  _flip(saved, os.path.getsize(saved) - 100)
  with pytest.raises(errors.CheckpointReadError,
                     match='do not match its integrity sidecar'):
    checkpoint_io.read_checkpoint_file(saved)
  with pytest.raises(errors.CheckpointReadError, match='checkpoint_1'):
    checkpoint_io.verify_sidecar(saved)


def test_a_slice_reads_its_blocks_only_and_checked(saved):
  tree = ms.read_lazily(saved)
  assert tree['n'] == 3 and isinstance(tree['big'], ms.StoredArray)
  np.testing.assert_array_equal(tree['small'], SMALL)
  before = ms.bytes_read()
  box = tree['big'].read_box(((256, 512), (0, 512)))  # 512 KiB of rows
  read = ms.bytes_read() - before
  np.testing.assert_array_equal(box, BIG[256:512])
  # Its 8 blocks and at most the two at its edges.
  assert BIG.nbytes // 4 <= read <= BIG.nbytes // 4 + 2 * BLOCK, read
  # Into sharded arrays: exact.
  mesh = Mesh(np.array(jax.devices()), ('data',))
  target = {'big': jax.ShapeDtypeStruct(BIG.shape, BIG.dtype,
                                        sharding=NamedSharding(mesh, P('data'))),
            'small': SMALL, 'n': 0}
  out = restore_checkpoint(saved, target)
  np.testing.assert_array_equal(np.asarray(out['big']), BIG)
  assert out['n'] == 3


def test_a_flipped_byte_in_a_block_read_raises(saved):
  tree = ms.read_lazily(saved)
  (_, offset, _), = tree['big'].segments
  _flip(saved, offset + BIG[:700].nbytes + 5)  # in row 700
  with pytest.raises(errors.CheckpointReadError) as e:
    tree['big'].read_box(((512, 1024), (0, 512)))
  assert saved in str(e.value) and 'block' in str(e.value)
  with pytest.raises(errors.CheckpointReadError, match='integrity sidecar'):
    tree['big'].read_box(((690, 710), (3, 9)))  # a short run: its edge block
  np.testing.assert_array_equal(  # rows in other blocks still read
      tree['big'].read_box(((0, 256), (0, 512))), BIG[:256])
  mesh = Mesh(np.array(jax.devices()), ('data',))
  with pytest.raises(errors.CheckpointReadError, match='checkpoint_1'):
    restore_checkpoint(saved, {'big': jax.ShapeDtypeStruct(
        BIG.shape, BIG.dtype, sharding=NamedSharding(mesh, P('data')))})


def test_a_flipped_byte_in_the_framing_raises_on_parsing(saved):
  size = os.path.getsize(saved)
  _flip(saved, size - 20)  # 'small' and 'n' come after 'big'
  with pytest.raises(errors.CheckpointReadError, match='integrity sidecar'):
    ms.read_lazily(saved)


def test_a_truncated_file_is_read_whole_and_named(saved):
  with open(saved, 'r+b') as f:
    f.truncate(os.path.getsize(saved) - 1)
  assert ms.read_lazily(saved) is None
  with pytest.raises(errors.CheckpointReadError, match='truncated'):
    checkpoint_io.read_checkpoint_file(saved)


def test_chunked_arrays_are_checked_across_their_chunks(tmp_path,
                                                         monkeypatch):
  from gintrain.lib import serialization  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 100_000)
  monkeypatch.setattr(checkpoint_sidecar, 'BLOCK_BYTES', BLOCK)
  checkpoint_io.set_integrity_sidecar(True)
  try:
    path = checkpoints.save_checkpoint(str(tmp_path), {'big': BIG}, 1)
  finally:
    checkpoint_io.set_integrity_sidecar('auto')
  tree = ms.read_lazily(path)
  assert tree['big'].blocks is not None and len(tree['big'].segments) > 1
  np.testing.assert_array_equal(tree['big'].read_box(((3, 901), (7, 300))),
                                BIG[3:901, 7:300])
  _flip(path, tree['big'].segments[5][1] + 10)
  with pytest.raises(errors.CheckpointReadError, match='integrity sidecar'):
    ms.read_lazily(path)['big'].read()
