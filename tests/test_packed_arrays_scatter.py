"""Packed restores of slices needed only in part (``lib.packed_arrays``).

A device whose box cuts through stored slices (another mesh, column slices
of row-split arrays) gets its part row piece by row piece: each hash block
of a stored slice is one task that reads the rows starting in it into a
per-thread buffer, hashes exactly the block's bytes and copies the rows'
overlaps into every destination. These tests shrink the hash block, the
read piece and the widest scattered row so that rows cross block
boundaries, pieces hold several rows, and wide rows take the whole-slice
path, on one process with 8 CPU devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import errors
from gintrain.lib import multiprocess_arrays as mpa
from gintrain.lib import packed_arrays
from test_sharded_format import _save  # pylint: disable=g-bad-import-order

PH = mpa.MP_ARRAY_PH


def _named(spec, shape=(4, 2)):
  return NamedSharding(
      Mesh(np.array(jax.devices()).reshape(shape), ('data', 'model')), spec)


def _restore(ckpt, state, specs):
  out = mpa.read_arrays(state, ckpt, {'params': {
      k: _named(s) for k, s in specs.items()}})
  return {k: np.asarray(v) for k, v in out['params'].items()}


# 3-D float32 with 48-byte rows (two a piece, rows crossing the 64-byte
# hash blocks), 1-D bfloat16 (2-byte rows), 2-D int32 rows of 112 bytes
# (wider than the 100-byte read piece).
A3 = np.arange(8 * 2 * 6, dtype=np.float32).reshape(8, 2, 6) * 0.5 - 7
V = (np.arange(24, dtype=np.float32) / 3).astype(jnp.bfloat16)
M = np.arange(8 * 28, dtype=np.int32).reshape(8, 28) * 3 - 100
ARRAYS = {'a3': (A3, P('data')), 'v': (V, P('data')),
          'm': (M, P('data', 'model'))}
# Shardings whose boxes cut through the stored slices in several ways.
OTHER = [{'a3': P(None, 'model'), 'v': P(('data', 'model')),
          'm': P(None, 'data')},
         {'a3': P(('data', 'model')), 'v': P('model'), 'm': P('model')},
         {'a3': P(None, None, 'model'), 'v': P(), 'm': P(('data', 'model'))}]


@pytest.fixture
def small(monkeypatch):
  """Tiny hash blocks and read pieces, set before saving."""
  monkeypatch.setattr(packed_arrays, 'HASH_BLOCK', 64)
  monkeypatch.setattr(packed_arrays, '_READ_PIECE', 100)


@pytest.fixture
def saved(tmp_path, small):  # pylint: disable=unused-argument
  return _save(tmp_path, {f'params/{k}': jax.device_put(x, _named(s))
                          for k, (x, s) in ARRAYS.items()})


def _counting(monkeypatch):
  """Counts the stored slices read by scattered pieces and whole."""
  seen = {'scatter': 0, 'whole': 0}
  scatter, whole = packed_arrays._scatter_tasks, packed_arrays._read_and_check

  def count_scatter(*args, **kwargs):
    seen['scatter'] += 1
    return scatter(*args, **kwargs)

  def count_whole(*args, **kwargs):
    seen['whole'] += 1
    return whole(*args, **kwargs)
  monkeypatch.setattr(packed_arrays, '_scatter_tasks', count_scatter)
  monkeypatch.setattr(packed_arrays, '_read_and_check', count_whole)
  return seen


def test_parts_of_slices_restore_exactly_piece_by_piece(saved, monkeypatch):
  ckpt, state = saved
  seen = _counting(monkeypatch)
  for specs in OTHER:
    got = _restore(ckpt, state, specs)
    for k, (x, _) in ARRAYS.items():
      assert got[k].dtype == x.dtype
      np.testing.assert_array_equal(got[k], x)
  assert seen['scatter'] > 0 and seen['whole'] > 0  # whole: same slices


def test_rows_wider_than_the_limit_are_read_whole(saved, monkeypatch):
  ckpt, state = saved
  monkeypatch.setattr(packed_arrays, '_SCATTER_ROW_MAX', 8)
  seen = _counting(monkeypatch)
  got = _restore(ckpt, state, OTHER[0])
  for k, (x, _) in ARRAYS.items():
    np.testing.assert_array_equal(got[k], x)
  # v's 2-byte rows still scatter; a3's and m's are read whole.
  assert seen['scatter'] == 4 and seen['whole'] >= 8


def _flip(ckpt, subpath, chunk, at):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  folder = os.path.join(mpa.array_dir(ckpt), 'packed')
  with open(os.path.join(folder, 'process_0.json')) as f:
    c = json.load(f)['arrays'][subpath]['chunks'][chunk]
  with open(os.path.join(folder, 'process_0.bin'), 'r+b') as f:
    f.seek(c['offset'] + at)
    old = f.read(1)
    f.seek(c['offset'] + at)
    f.write(bytes([old[0] ^ 0x10]))
  return c


@pytest.mark.parametrize('at', [0, 47, 48, 63, 64, 95])
def test_a_flipped_byte_anywhere_is_caught(tmp_path, small, at):  # pylint: disable=unused-argument
  # a3's slice of rows 2:4 has 96 bytes: blocks 0-63 and 64-95; byte 47 is
  # the end of row 0, 48 the start of row 1 (which crosses into block 1).
  ckpt, state = _save(tmp_path, {'params/a3': jax.device_put(
      A3, _named(P('data')))})
  c = _flip(ckpt, 'params/a3', 1, at)
  assert c['box'] == [[2, 4], [0, 2], [0, 6]]
  block = '0-64' if at < 64 else '64-96'
  checks = [functools.partial(_restore, ckpt, state, {'a3': spec})
            for spec in (P(None, 'model'), P(('data', 'model')),
                         P(None, None, 'model'))]
  for check in checks + [functools.partial(mpa.verify_arrays, ckpt, state)]:
    with pytest.raises(errors.CheckpointReadError,
                       match=rf'params/a3.*slice \[2:4, 0:2, 0:6\].*bytes'
                       rf' {block} of 96'):
      check()


def test_verify_reads_pieces_and_wide_rows_whole(saved, monkeypatch):
  ckpt, state = saved
  seen = _counting(monkeypatch)
  mpa.verify_arrays(ckpt, state)  # 16 stored slices
  assert seen == {'scatter': 16, 'whole': 0}
  monkeypatch.setattr(packed_arrays, '_SCATTER_ROW_MAX', 8)
  mpa.verify_arrays(ckpt, state)
  assert seen == {'scatter': 20, 'whole': 12}  # v's 4 slices scatter
  _flip(ckpt, 'params/m', 3, 111)
  with pytest.raises(errors.CheckpointReadError, match=r'params/m.*slice'):
    mpa.verify_arrays(ckpt, state)


def test_large_buffers_start_at_a_huge_page():
  big = packed_arrays.empty_aligned([3 << 19], np.float32)  # 6 MiB
  small = packed_arrays.empty_aligned([5, 7], np.float32)
  assert big.ctypes.data % (2 << 20) == 0 and big.shape == (3 << 19,)
  assert small.ctypes.data % 4096 == 0 and small.shape == (5, 7)
  big[:] = 1  # writable, its own memory
  assert big.flags.c_contiguous and big.flags.writeable
