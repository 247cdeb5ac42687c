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
import struct
from typing import Any

import numpy as np

from gintrain.lib import serialization
from gintrain.runner.errors import RunnerError

__all__ = ['Leaf', 'Structure', 'read_structure', 'read_leaf', 'iter_leaf']

_WINDOW = 1 << 16
_MAX_DEPTH = 1024
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ('>B', '>H', '>I', '>Q'))
_I8, _I16, _I32, _I64 = (struct.Struct(f) for f in ('>b', '>h', '>i', '>q'))
_F32, _F64 = struct.Struct('>f'), struct.Struct('>d')


@dataclasses.dataclass
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


class _Bad(Exception):
  """Not a valid checkpoint file (message: why)."""


class _Array:
  """An ext-1 array found while parsing (turned into a Leaf later)."""
  __slots__ = ('dtype', 'shape', 'offset', 'nbytes')

  def __init__(self, dtype, shape, offset, nbytes):
    self.dtype, self.shape, self.offset, self.nbytes = (dtype, shape, offset,
                                                        nbytes)


class _Parser:
  """msgpack over a file descriptor; array payloads are skipped."""

  def __init__(self, fd: int, size: int):
    self.fd, self.size = fd, size
    self.pos, self.window, self.start = 0, b'', 0

  def read(self, n: int) -> bytes:
    if n > self.size - self.pos:
      raise _Bad(f'truncated: {n} bytes needed at offset {self.pos} of'
                 f' {self.size}')
    off = self.pos - self.start
    if not 0 <= off <= len(self.window) - n:
      want = min(max(n, _WINDOW), self.size - self.pos)
      parts, got = [], 0
      while got < want:
        part = os.pread(self.fd, want - got, self.pos + got)
        if not part:
          raise _Bad(f'file ended early at offset {self.pos + got}')
        parts.append(part)
        got += len(part)
      self.window, self.start, off = b''.join(parts), self.pos, 0
    self.pos += n
    return self.window[off:off + n]

  def skip(self, n: int) -> None:
    if n > self.size - self.pos:
      raise _Bad(f'truncated: the data of {n} bytes at offset {self.pos}'
                 f' runs past the end of the file ({self.size} bytes)')
    self.pos += n

  def unpack(self, st: struct.Struct):
    return st.unpack(self.read(st.size))[0]

  def str_(self, n, raw):
    data = bytes(self.read(n))
    return data if raw else data.decode('utf-8', errors='replace')

  def parse(self, depth: int = 0, raw: bool = False):
    if depth > _MAX_DEPTH:
      raise _Bad('nesting too deep')
    b = self.read(1)[0]
    if b <= 0x7f:
      return b
    if b >= 0xe0:
      return b - 0x100
    if b <= 0x8f:
      return self.map_(b & 0x0f, depth)
    if b <= 0x9f:
      return [self.parse(depth + 1) for _ in range(b & 0x0f)]
    if b <= 0xbf:
      return self.str_(b & 0x1f, raw)
    simple = {0xc0: None, 0xc2: False, 0xc3: True}
    if b in simple:
      return simple[b]
    if 0xc4 <= b <= 0xc6:
      return bytes(self.read(self.unpack((_U8, _U16, _U32)[b - 0xc4])))
    if 0xc7 <= b <= 0xc9:
      length = self.unpack((_U8, _U16, _U32)[b - 0xc7])
      return self.ext(self.unpack(_I8), length)
    if b == 0xca:
      return self.unpack(_F32)
    if b == 0xcb:
      return self.unpack(_F64)
    if 0xcc <= b <= 0xcf:
      return self.unpack((_U8, _U16, _U32, _U64)[b - 0xcc])
    if 0xd0 <= b <= 0xd3:
      return self.unpack((_I8, _I16, _I32, _I64)[b - 0xd0])
    if 0xd4 <= b <= 0xd8:
      return self.ext(self.unpack(_I8), 1 << (b - 0xd4))
    if 0xd9 <= b <= 0xdb:
      return self.str_(self.unpack((_U8, _U16, _U32)[b - 0xd9]), raw)
    if b in (0xdc, 0xdd):
      n = self.unpack(_U16 if b == 0xdc else _U32)
      return [self.parse(depth + 1) for _ in range(n)]
    if b in (0xde, 0xdf):
      return self.map_(self.unpack(_U16 if b == 0xde else _U32), depth)
    raise _Bad(f'invalid msgpack byte 0x{b:02x} at offset {self.pos - 1}')

  def map_(self, n: int, depth: int) -> dict:
    out = {}
    for _ in range(n):
      key = self.parse(depth + 1)
      if isinstance(key, (list, dict, _Array)):
        raise _Bad(f'unhashable map key at offset {self.pos}')
      out[key] = self.parse(depth + 1)
    return out

  def ext(self, code: int, length: int):
    end = self.pos + length
    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
      if length < 1 or self.read(1)[0] != 0x93:
        raise _Bad(f'bad array payload at offset {self.pos - 1}')
      shape = self.parse(raw=True)
      name = self.parse(raw=True)
      tag = self.read(1)[0]
      if tag not in (0xc4, 0xc5, 0xc6):
        raise _Bad(f'bad array payload at offset {self.pos - 1}')
      nbytes = self.unpack((_U8, _U16, _U32)[tag - 0xc4])
      offset = self.pos
      if offset + nbytes != end:
        raise _Bad(f'array payload at offset {offset} has a bad length')
      if not (isinstance(shape, list) and
              all(type(d) is int and d >= 0 for d in shape)):  # pylint: disable=unidiomatic-typecheck
        raise _Bad(f'bad array shape {shape!r} at offset {offset}')
      try:
        dtype = serialization.dtype_from_name(name)
      except (ValueError, TypeError) as e:
        raise _Bad(f'bad array dtype at offset {offset}: {e}') from e
      if int(np.prod(shape, dtype=object)) * dtype.itemsize != nbytes:
        raise _Bad(f'array of shape {tuple(shape)} and dtype {dtype} does'
                   f' not fit its {nbytes} bytes at offset {offset}')
      self.skip(nbytes)
      arr = _Array(dtype, tuple(shape), offset, nbytes)
      if code == _EXT_NPSCALAR:
        return ('npscalar', arr)
      return arr
    data = bytes(self.read(length))
    if code == _EXT_COMPLEX:
      try:
        return serialization._msgpack_ext_unpack(code, data)  # pylint: disable=protected-access
      except ValueError as e:
        raise _Bad(f'bad complex value at offset {end - length}') from e
    return ('ext', code, length)


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


def _leaves(node, path: str, out: list, fd: int) -> None:
  if isinstance(node, dict):
    if node.get(serialization.CHUNKED_KEY) is True:
      leaf = _chunked_leaf(path, node)
      if leaf is not None:
        out.append(leaf)
        return
    for key, value in node.items():
      _leaves(value, f'{path}/{key}' if path else str(key), out, fd)
  elif isinstance(node, list):
    for i, value in enumerate(node):
      _leaves(value, f'{path}/{i}' if path else str(i), out, fd)
  elif isinstance(node, _Array):
    value = None
    if node.shape == () and node.nbytes <= 16:  # e.g. a step counter
      value = np.frombuffer(os.pread(fd, node.nbytes, node.offset),
                            node.dtype)[0]
    out.append(Leaf(path, 'array', node.dtype, node.shape, node.nbytes,
                    [(node.offset, node.nbytes)] if node.nbytes else [],
                    value))
  elif isinstance(node, tuple) and node[0] == 'npscalar':
    arr = node[1]
    value = None
    if arr.nbytes <= 64:
      value = np.frombuffer(os.pread(fd, arr.nbytes, arr.offset),
                            arr.dtype).reshape(arr.shape)[()]
    out.append(Leaf(path, 'scalar', arr.dtype, arr.shape, arr.nbytes,
                    [(arr.offset, arr.nbytes)], value))
  elif isinstance(node, tuple) and node[0] == 'ext':
    out.append(Leaf(path, f'ext{node[1]}', nbytes=node[2]))
  else:
    nbytes = len(node) if isinstance(node, (str, bytes)) else 0
    out.append(Leaf(path, type(node).__name__, nbytes=nbytes, value=node))


def read_structure(path: str) -> Structure:
  """The leaves of the msgpack checkpoint file ``path`` (no array data).

  Raises:
    RunnerError: not a regular file, unreadable, truncated or not msgpack
      (naming ``path`` and the offset).
  """
  if os.path.isdir(path):
    raise RunnerError(f'{path} is a directory, not a checkpoint file (an'
                      ' Orbax checkpoint, or use `gintrain ckpt ls`).')
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError as e:
    raise RunnerError(f'{path}: {e.strerror or e}.') from e
  try:
    size = os.fstat(fd).st_size
    parser = _Parser(fd, size)
    try:
      if size == 0:
        raise _Bad('the file is empty')
      tree = parser.parse()
      if parser.pos != size:
        raise _Bad(f'{size - parser.pos} extra bytes after the tree at'
                   f' offset {parser.pos}')
      leaves = []
      _leaves(tree, '', leaves, fd)
    except _Bad as e:
      raise RunnerError(f'{path}: not a complete msgpack checkpoint: {e}.'
                        ) from None
    except RecursionError:
      raise RunnerError(f'{path}: not a msgpack checkpoint: nesting too'
                        ' deep.') from None
    except OSError as e:
      raise RunnerError(f'{path}: read failed: {e}.') from e
  finally:
    os.close(fd)
  return Structure(path, size, leaves)


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
  with open(path, 'rb', buffering=0) as f:
    for start in range(0, leaf.size, block_elements):
      yield _read_range(f, path, leaf, start,
                        min(block_elements, leaf.size - start))


def read_leaf(path: str, leaf: Leaf) -> np.ndarray:
  """``leaf``'s whole array (or numpy scalar as a 0-d array)."""
  blocks = list(iter_leaf(path, leaf, max(leaf.size, 1)))
  out = blocks[0] if blocks else np.empty(0, leaf.dtype)
  return out.reshape(leaf.shape)
