"""The structure of a msgpack checkpoint file, without reading array data.

:func:`read_structure` walks the msgpack framing of a checkpoint file (the
flax / ``lib.serialization`` layout) through a small read-ahead window and
*skips* every array's data bytes: only map keys, array headers (shape and
dtype) and scalars are read. A 2.5 GiB file of a few arrays is read in a
few small reads, whatever its size; memory is a :class:`Leaf` per leaf.
Chunked arrays (``__msgpack_chunked_array__`` maps, written for arrays over
``lib.serialization.MAX_CHUNK_SIZE``) come back as one leaf whose data lies
in several segments of the file.

:func:`read_leaf` and :func:`iter_leaf` then read one leaf's data (all of
it, or in blocks), so two checkpoints can be compared one array at a time.

Nothing is executed and no object dtype is created.
"""

import dataclasses
import os
from typing import Any

import numpy as np

from gintrain.lib import msgpack_stream
from gintrain.lib import storage
from gintrain.lib import serialization
from gintrain.runner.errors import RunnerError

__all__ = ['Leaf', 'Structure', 'read_structure', 'read_leaf', 'iter_leaf']

_EXT_NPSCALAR = 3
# Memory charged per leaf (a Leaf, its path and segments), against the
# reader's bound (lib.msgpack_stream).
_LEAF_COST = 400


@dataclasses.dataclass(slots=True)
class Leaf:
  """One leaf of the checkpoint tree.

  Attributes:
    path: the ``'/'``-joined keys.
    kind: ``'array'``, ``'scalar'`` (a numpy scalar), or the Python type
      name of a plain value (``'int'``, ``'float'``, ``'str'``, ...).
    dtype: the array's or numpy scalar's dtype (None for plain values).
    shape: the array's shape (``()`` for scalars).
    nbytes: the bytes of data.
    segments: ``[(offset, nbytes)]`` where the data lies in the file, in
      C order (several for a chunked array).
    value: a plain value or a numpy scalar's value, else None.
  """
  path: str
  kind: str
  dtype: np.dtype | None = None
  shape: tuple = ()
  nbytes: int = 0
  segments: list = dataclasses.field(default_factory=list)
  value: Any = None

  @property
  def size(self) -> int:
    """Elements (1 for a scalar)."""
    return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclasses.dataclass
class Structure:
  """A checkpoint file's tree: its leaves in file order and its size."""
  path: str
  file_size: int
  leaves: list


class _Array:
  """An ext-1 array found while parsing (turned into a Leaf later)."""
  __slots__ = ('dtype', 'shape', 'offset', 'nbytes')

  def __init__(self, dtype, shape, offset, nbytes):
    self.dtype, self.shape, self.offset, self.nbytes = (dtype, shape, offset,
                                                        nbytes)


class _StructureParser(msgpack_stream.Parser):
  """The shared reader with array data skipped (never read)."""

  def __init__(self, source, size: int):
    super().__init__(source, size, strict_utf8=False)

  def array(self, dtype, shape, offset, nbytes, defer):
    return _Array(dtype, shape, offset, nbytes)

  def is_shareable(self, value):
    return isinstance(value, _Array) and value.nbytes == 0

  def ext(self, code, data, offset):
    if code == _EXT_NPSCALAR:
      try:
        value = serialization._msgpack_ext_unpack(code, bytes(data))  # pylint: disable=protected-access
      except Exception as e:  # pylint: disable=broad-except
        raise msgpack_stream.StreamError(
            f'bad array payload at offset {offset}: {e}') from e
      value = np.asarray(value)
      start = offset + len(data) - value.nbytes  # its data: the last bytes
      return ('npscalar', _Array(value.dtype, value.shape, start,
                                 value.nbytes))
    try:
      return super().ext(code, data, offset)
    except msgpack_stream.StreamError:
      return ('ext', code, len(data))


def _chunked_leaf(path: str, node: dict) -> Leaf | None:
  try:
    shape = tuple(node['shape'][str(i)] for i in range(len(node['shape'])))
    chunks = [node['chunks'][str(i)] for i in range(len(node['chunks']))]
  except (KeyError, TypeError):
    return None
  if not chunks or not all(isinstance(c, _Array) and
                           c.dtype == chunks[0].dtype for c in chunks):
    return None
  segments = [(c.offset, c.nbytes) for c in chunks]
  nbytes = sum(c.nbytes for c in chunks)
  if int(np.prod(shape, dtype=object)) * chunks[0].dtype.itemsize != nbytes:
    return None
  return Leaf(path, 'array', chunks[0].dtype, shape, nbytes, segments)


def _leaves(node, path: str, out: list, parser: _StructureParser) -> None:
  """Appends the leaves of ``node`` to ``out`` (charged to ``parser``)."""
  if isinstance(node, dict):
    if node.get(serialization.CHUNKED_KEY) is True:
      leaf = _chunked_leaf(path, node)
      if leaf is not None:
        parser.charge('leaves', _LEAF_COST)
        out.append(leaf)
        return
    for key, value in node.items():
      _leaves(value, f'{path}/{key}' if path else str(key), out, parser)
  elif isinstance(node, list):
    for i, value in enumerate(node):
      _leaves(value, f'{path}/{i}' if path else str(i), out, parser)
  else:
    parser.charge('leaves', _LEAF_COST + len(path))
    out.append(_leaf(node, path, parser.fd))


def _leaf(node, path: str, fd: int) -> Leaf:
  """The Leaf of one parsed value."""
  if isinstance(node, _Array):
    value = None
    if node.shape == () and node.nbytes <= 16:  # e.g. a step counter
      value = np.frombuffer(msgpack_stream.pread_bytes(
          fd, node.nbytes, node.offset), node.dtype)[0]
    return Leaf(path, 'array', node.dtype, node.shape, node.nbytes,
                [(node.offset, node.nbytes)] if node.nbytes else [], value)
  if isinstance(node, tuple) and node[0] == 'npscalar':
    arr = node[1]
    value = None
    if arr.nbytes <= 64:
      value = np.frombuffer(msgpack_stream.pread_bytes(
          fd, arr.nbytes, arr.offset), arr.dtype).reshape(arr.shape)[()]
    return Leaf(path, 'scalar', arr.dtype, arr.shape, arr.nbytes,
                [(arr.offset, arr.nbytes)], value)
  if isinstance(node, tuple) and node[0] == 'ext':
    return Leaf(path, f'ext{node[1]}', nbytes=node[2])
  nbytes = len(node) if isinstance(node, (str, bytes)) else 0
  return Leaf(path, type(node).__name__, nbytes=nbytes, value=node)


def read_structure(path: str) -> Structure:
  """The leaves of the msgpack checkpoint file ``path`` (no array data; a
  local path or a URL, whose framing is read in ranges).

  A FIFO, socket or device is refused without blocking; memory is bounded
  by ``lib.msgpack_stream``'s limit (a crafted file of millions of leaves
  fails with one line).

  Raises:
    RunnerError: not a regular file, unreadable, truncated or not msgpack
      (naming ``path`` and the offset).
  """
  if storage.isdir(path):
    raise RunnerError(f'{path} is a directory, not a checkpoint file (an'
                      ' Orbax checkpoint, or use `gintrain ckpt ls`).')
  try:
    local = storage.local_file(path)
    if local is not None:
      source = msgpack_stream.open_regular(local)
      size = os.fstat(source).st_size
    else:
      source, size = storage.open_read(path), storage.size(path)
  except msgpack_stream.NotARegularFileError as e:
    raise RunnerError(f'{path}: {e.what}, not a checkpoint file.') from None
  except OSError as e:
    raise RunnerError(f'{path}: {e.strerror or e}.') from e
  try:
    return Structure(path, size, _parse_leaves(path, source, size))
  finally:
    if isinstance(source, int):
      os.close(source)
    else:
      source.close()


def _parse_leaves(path: str, source, size: int) -> list:
  parser = _StructureParser(source, size)
  try:
    leaves = []
    _leaves(parser.parse_all(), '', leaves, parser)
    return leaves
  except msgpack_stream.StreamError as e:
    raise RunnerError(f'{path}: not a complete msgpack checkpoint: {e}.'
                      ) from None
  except RecursionError:
    raise RunnerError(f'{path}: not a msgpack checkpoint: nesting too'
                      ' deep.') from None
  except OSError as e:
    raise RunnerError(f'{path}: read failed: {e}.') from e


def _read_range(f, path: str, leaf: Leaf, start: int, n: int) -> np.ndarray:
  """Elements ``[start, start + n)`` of ``leaf`` (flat, C order)."""
  itemsize = leaf.dtype.itemsize
  out = np.empty(n, leaf.dtype)
  view = memoryview(out.view(np.uint8))
  pos, first = 0, 0  # bytes filled; the first element of the segment
  for offset, nbytes in leaf.segments:
    count = nbytes // itemsize
    lo, hi = max(start, first), min(start + n, first + count)
    if lo < hi:
      f.seek(offset + (lo - first) * itemsize)
      want = (hi - lo) * itemsize
      got = 0
      while got < want:
        k = f.readinto(view[pos + got:pos + want])
        if not k:
          raise RunnerError(f'{path}: file ended early.')
        got += k
      pos += want
    first += count
  return out


def iter_leaf(path: str, leaf: Leaf, block_elements: int = 1 << 22):
  """Yields ``leaf``'s data from ``path`` as flat blocks of
  ``block_elements`` elements (the last one shorter), in C order."""
  if leaf.kind not in ('array', 'scalar'):
    raise ValueError(f'{leaf.path} is not an array')
  with storage.open_read(path) as f:
    for start in range(0, leaf.size, block_elements):
      yield _read_range(f, path, leaf, start,
                        min(block_elements, leaf.size - start))


def read_leaf(path: str, leaf: Leaf) -> np.ndarray:
  """``leaf``'s whole array (or numpy scalar as a 0-d array)."""
  blocks = list(iter_leaf(path, leaf, max(leaf.size, 1)))
  out = blocks[0] if blocks else np.empty(0, leaf.dtype)
  return out.reshape(leaf.shape)
