"""One msgpack reader over a checkpoint file, for restores and for tools.

A msgpack checkpoint (flax's layout, ``lib.serialization``) is a tree of
maps, lists and scalars whose arrays are ext-1 values ``[shape, dtype,
bin]``. :class:`Parser` walks that framing through a small read-ahead
window over a file descriptor and hands every array *header* (dtype, shape,
where its data lies) to :meth:`Parser.array`, without reading the data:
``lib.checkpoint_io`` reads the data straight into place (in parallel, for
big files), ``runner.cli.ckpt_structure`` only records where it lies.

Bounds, for any file however crafted:

* Nothing is executed and no object dtype is created; nesting is limited to
  msgpack's 1024 levels and arrays to 64 dimensions.
* Memory: the dicts, lists and arrays built are charged about as
  ``lib.serialization.msgpack_restore`` charges them (their size without
  the data; equal empty arrays are one shared object, charged nothing;
  lists and maps before their items are read), and the parse stops with
  :class:`StreamError` past ``max(DECODE_OVERHEAD_MIN, slack *
  DECODE_OVERHEAD_FACTOR * file size)`` (``slack``: 4 for restores, whose
  real checkpoints of many tiny arrays measure under 10x their file size;
  1 for the CLI's structure reader).
* Time: each byte of framing is looked at once; small ext payloads (e.g. a
  million empty arrays) are decoded once per distinct payload.
* A FIFO, socket, device or directory is refused before it is opened
  for reading (:func:`open_regular` opens with ``O_NONBLOCK``), so nothing
  blocks.

    >>> import os, tempfile, msgpack
    >>> path = os.path.join(tempfile.mkdtemp(), 'ck')
    >>> with open(path, 'wb') as f:
    ...   _ = f.write(msgpack.packb({'a': [1, 'x'], 'b': None}))
    >>> fd = open_regular(path)
    >>> Parser(fd, os.fstat(fd).st_size).parse_all()
    {'a': [1, 'x'], 'b': None}
    >>> os.close(fd)
"""

import errno
import os
import stat
import struct
import sys

import numpy as np

from gintrain.lib import errors
from gintrain.lib import serialization

__all__ = ['StreamError', 'NotARegularFileError', 'Parser', 'open_regular',
           'pread_bytes', 'pread_into', 'file_kind', 'MAX_DEPTH', 'MAX_NDIM']

# msgpack's own nesting limit.
MAX_DEPTH = 1024
# numpy's dimension limit.
MAX_NDIM = 64
# Framing is read in windows of this many bytes.
WINDOW_BYTES = 1 << 16
# Ext payloads up to this size are decoded once per distinct payload.
_MAX_SHARED_PAYLOAD = 256
_MAX_SHARED = 4096
# Memory charged per object (what sys.getsizeof says, about).
_ARRAY_COST = sys.getsizeof(np.empty(0)) + 16
_LIST_COST = sys.getsizeof([])
_DICT_COST = sys.getsizeof({})
_DICT_ENTRY_COST = 40

_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ('>B', '>H', '>I', '>Q'))
_I8, _I16, _I32, _I64 = (struct.Struct(f) for f in ('>b', '>h', '>i', '>q'))
_F32, _F64 = struct.Struct('>f'), struct.Struct('>d')
_SIMPLE = {0xc0: None, 0xc2: False, 0xc3: True}
_EXT_NDARRAY = 1


class StreamError(Exception):
  """The file does not hold a valid msgpack checkpoint (message: why)."""


class NotARegularFileError(errors.GintrainError, OSError):
  """Something other than a regular file where a checkpoint was expected."""

  def __init__(self, path: str, what: str):
    self.what = what
    OSError.__init__(self, errno.EINVAL, f'{what}, not a regular file',
                     path)
    errors.GintrainError.__init__(
        self, f'{path} is {what}, not a regular file (not a checkpoint)')

  def __str__(self):
    return errors.GintrainError.__str__(self)


def file_kind(mode: int) -> str | None:
  """What a non-regular file is, in words (None for a regular file)."""
  if stat.S_ISREG(mode):
    return None
  for test, what in ((stat.S_ISDIR, 'a directory'),
                     (stat.S_ISLNK, 'a symbolic link'),
                     (stat.S_ISFIFO, 'a FIFO'),
                     (stat.S_ISSOCK, 'a socket'),
                     (stat.S_ISCHR, 'a character device'),
                     (stat.S_ISBLK, 'a block device')):
    if test(mode):
      return what
  return 'not a regular file'


def open_regular(path: str, flags: int = os.O_RDONLY, follow: bool = True,
                 refuse=None) -> int:
  """Opens ``path`` only if it is a regular file; never blocks on a FIFO.

  The file is checked with ``stat``/``lstat`` before and ``fstat`` after
  opening it with ``O_NONBLOCK`` (and ``O_NOFOLLOW`` unless ``follow``), so
  a file swapped in between is caught too.

  Args:
    path: the file.
    flags: ``os.open`` flags.
    follow: follow a symbolic link.
    refuse: ``(path, mode) -> exception`` raised for a non-regular file
      (default :class:`NotARegularFileError`).

  Raises:
    NotARegularFileError: (or ``refuse``'s) a directory, FIFO, socket,
      device or (unless ``follow``) a symbolic link.
    OSError: it cannot be opened (e.g. ``FileNotFoundError``).
  """
  refuse = refuse or (lambda p, mode: NotARegularFileError(p, file_kind(mode)))
  st = os.stat(path) if follow else os.lstat(path)
  if not stat.S_ISREG(st.st_mode):
    raise refuse(path, st.st_mode)
  extra = os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0)
  if not follow:
    extra |= os.O_NOFOLLOW
  try:
    fd = os.open(path, flags | extra)
  except OSError as e:
    if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
      raise refuse(path, os.lstat(path).st_mode) from e
    raise
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise refuse(path, st.st_mode)
    os.set_blocking(fd, True)
  except BaseException:
    os.close(fd)
    raise
  return fd


def pread_bytes(fd, n: int, offset: int) -> bytes:
  """``n`` bytes at ``offset`` of ``fd`` (a file descriptor, or a binary
  file object, e.g. an object store's); StreamError if the file ends
  first."""
  parts = []
  while n > 0:
    if isinstance(fd, int):
      part = os.pread(fd, n, offset)
    else:
      fd.seek(offset)
      part = fd.read(n)
    if not part:
      raise StreamError(f'file ended early at offset {offset}')
    parts.append(part)
    n -= len(part)
    offset += len(part)
  return parts[0] if len(parts) == 1 else b''.join(parts)


def pread_into(fd: int, view: memoryview, offset: int) -> None:
  """Fills ``view`` from ``offset`` (StreamError if the file ends first)."""
  while view.nbytes:
    n = os.preadv(fd, [view], offset)
    if n == 0:
      raise StreamError(f'file ended early at offset {offset}')
    view = view[n:]
    offset += n


def _limit(size: int, slack: float) -> int | None:
  factor = serialization.DECODE_OVERHEAD_FACTOR
  return (None if factor is None else
          max(serialization.DECODE_OVERHEAD_MIN, int(slack * factor * size)))


class Parser:
  """A msgpack decoder (``raw=False, strict_map_key=False``) over a file.

  ``fd`` is a file descriptor or a binary file object with ``seek`` and
  ``read`` (only the framing is read through it). ``slack`` multiplies the
  memory bound (a restore, whose objects are measured, may use more than
  the tools that keep a record per leaf). Subclasses decide what
  an array becomes (:meth:`array`) and may decode
  other ext types differently (:meth:`ext`). ``strict_utf8=False`` decodes
  strings with replacement characters instead of failing.

  Attributes:
    pos: the offset parsed so far.
    used: the memory charged so far (see the module doc).
  """

  def __init__(self, fd, size: int, strict_utf8: bool = True,
               slack: float = 1.0):
    self.fd, self.size = fd, size
    self.strict_utf8 = strict_utf8
    self.pos = 0
    self.window = b''
    self.window_len = 0
    self.window_start = 0
    self.limit = _limit(size, slack)
    self.used = 0
    self.counts = {'arrays': 0, 'dicts': 0, 'lists': 0, 'leaves': 0}
    self.shared = {}  # small ext payload -> its value (empty arrays)

  # -- bounds ---------------------------------------------------------------

  def charge(self, kind: str, nbytes: int) -> None:
    """Counts ``nbytes`` of memory for one ``kind`` object; StreamError
    past the limit."""
    self.counts[kind] = self.counts.get(kind, 0) + 1
    self.used += nbytes
    if self.limit is not None and self.used > self.limit:
      counts = ', '.join(f'{n} {k}' for k, n in self.counts.items() if n)
      raise StreamError(
          f'{self.size} bytes of file would take more than {self.limit}'
          f' bytes of memory ({counts} so far): a crafted or corrupt file'
          ' (raise lib.serialization.DECODE_OVERHEAD_FACTOR to load it'
          ' anyway)')

  # -- bytes ----------------------------------------------------------------

  def read(self, n: int) -> bytes:
    """The next ``n`` bytes."""
    off = self.pos - self.window_start
    end = off + n
    if off >= 0 and end <= self.window_len:  # the hot path
      self.pos += n
      return self.window[off:end]
    if n > self.size - self.pos:
      raise StreamError(f'truncated: needs {n} more bytes at offset'
                        f' {self.pos} of {self.size}')
    want = min(max(n, WINDOW_BYTES), self.size - self.pos)
    self.window = pread_bytes(self.fd, want, self.pos)
    self.window_len, self.window_start = len(self.window), self.pos
    self.pos += n
    return self.window[:n]

  def skip(self, n: int) -> None:
    """Moves past ``n`` bytes (array data) without reading them."""
    if n > self.size - self.pos:
      raise StreamError(f'truncated: needs {n} more bytes at offset'
                        f' {self.pos} of {self.size}')
    self.pos += n

  def _byte(self) -> int:
    off = self.pos - self.window_start
    if 0 <= off < self.window_len:
      self.pos += 1
      return self.window[off]
    return self.read(1)[0]

  def _unpack(self, st: struct.Struct):
    return st.unpack(self.read(st.size))[0]

  # -- the tree -------------------------------------------------------------

  def parse_all(self):
    """The whole file's tree; StreamError if bytes are left after it."""
    if self.size == 0:
      raise StreamError('the file is empty')
    tree = self.parse()
    if self.pos != self.size:
      raise StreamError(f'{self.size - self.pos} extra bytes after the'
                        f' checkpoint at offset {self.pos}')
    return tree

  def parse(self, depth: int = 0, raw: bool = False, defer: bool = False,
            chunks: bool = False):
    """Decodes one object.

    Args:
      depth: nesting depth (limited to :data:`MAX_DEPTH`).
      raw: decode str as bytes (inside array payloads).
      defer: an array here is a chunk of a chunked array.
      chunks: a map here holds chunks (its array values are deferred).
    """
    if depth > MAX_DEPTH:
      raise StreamError('nesting too deep')
    b = self._byte()
    if b <= 0x7f:
      return b
    if b >= 0xe0:
      return b - 0x100
    if b <= 0x8f:
      return self._map(b & 0x0f, depth + 1, chunks)
    if b <= 0x9f:
      return self._list(b & 0x0f, depth + 1, raw)
    if b <= 0xbf:
      return self._str(b & 0x1f, raw)
    if b in _SIMPLE:
      return _SIMPLE[b]
    if b == 0xc7:  # ext 8: every small array
      length, code = self.read(2)
      return self._ext(code - 256 if code > 127 else code, length, defer)
    return self._parse_typed(b, depth, raw, defer, chunks)

  def _parse_typed(self, b, depth, raw, defer, chunks):
    if 0xc4 <= b <= 0xc6:
      return bytes(self.read(self._unpack((_U8, _U16, _U32)[b - 0xc4])))
    if 0xc7 <= b <= 0xc9:
      length = self._unpack((_U8, _U16, _U32)[b - 0xc7])
      return self._ext(self._unpack(_I8), length, defer)
    if b == 0xca:
      return self._unpack(_F32)
    if b == 0xcb:
      return self._unpack(_F64)
    if 0xcc <= b <= 0xcf:
      return self._unpack((_U8, _U16, _U32, _U64)[b - 0xcc])
    if 0xd0 <= b <= 0xd3:
      return self._unpack((_I8, _I16, _I32, _I64)[b - 0xd0])
    if 0xd4 <= b <= 0xd8:
      return self._ext(self._unpack(_I8), 1 << (b - 0xd4), defer)
    if 0xd9 <= b <= 0xdb:
      return self._str(self._unpack((_U8, _U16, _U32)[b - 0xd9]), raw)
    if b in (0xdc, 0xdd):
      return self._list(self._unpack(_U16 if b == 0xdc else _U32), depth + 1,
                        raw)
    if b in (0xde, 0xdf):
      n = self._unpack(_U16 if b == 0xde else _U32)
      return self._map(n, depth + 1, chunks)
    raise StreamError(f'invalid msgpack byte 0x{b:02x} at offset'
                      f' {self.pos - 1}')

  def _str(self, n: int, raw: bool):
    data = self.read(n)  # bytes
    if raw:
      return data
    try:
      return data.decode('utf-8')
    except UnicodeDecodeError as e:
      if not self.strict_utf8:
        return data.decode('utf-8', errors='replace')
      raise StreamError(f'invalid UTF-8 string at offset {self.pos - n}'
                        ) from e

  def _list(self, n: int, depth: int, raw: bool = False) -> list:
    if n > self.size - self.pos:  # each item takes a byte at least
      raise StreamError(f'truncated: a list of {n} items at offset'
                        f' {self.pos} of {self.size}')
    if not raw:  # (an array's shape, inside its payload, is not kept)
      self.charge('lists', _LIST_COST + 8 * n)  # before the work
    return [self.parse(depth, raw) for _ in range(n)]

  def _map(self, n: int, depth: int, chunks: bool) -> dict:
    if 2 * n > self.size - self.pos:  # each entry takes two bytes at least
      raise StreamError(f'truncated: a map of {n} entries at offset'
                        f' {self.pos} of {self.size}')
    self.charge('dicts', _DICT_COST + _DICT_ENTRY_COST * n)  # before the work
    out = {}
    chunked = False  # this map is a chunked array: defer its chunks
    for _ in range(n):
      key = self.parse(depth)
      chunked = chunked or (type(key) is str and  # pylint: disable=unidiomatic-typecheck
                            key == serialization.CHUNKED_KEY)
      value = self.parse(depth, defer=chunks,
                         chunks=chunked and key == 'chunks')
      try:
        out[key] = value
      except TypeError as e:
        raise StreamError(f'unhashable map key at offset {self.pos}') from e
    return out

  # -- ext values -----------------------------------------------------------

  def _ext(self, code: int, length: int, defer: bool):
    start = self.pos
    if length <= _MAX_SHARED_PAYLOAD and start + length <= self.size:
      key = (code, self.read(length))
      if key in self.shared:
        return self.shared[key]
      self.pos = start
    else:
      key = None
    value = None
    if code == _EXT_NDARRAY:
      value = self._array(length, defer)
    if value is None:
      self.pos = start
      value = self.ext(code, self.read(length), start)
    elif (key is not None and self.is_shareable(value) and
          len(self.shared) < _MAX_SHARED):
      self.shared[key] = value
    return value

  def _array(self, length: int, defer: bool):
    """Parses ``[shape, dtype, bin]`` and calls :meth:`array`; None if the
    payload is laid out differently (then decoded like flax does)."""
    end = self.pos + length
    if length < 1 or self._byte() != 0x93:
      return None
    shape = self.parse(raw=True)
    name = self.parse(raw=True)
    tag = self._byte() if self.pos < end else None
    if tag not in (0xc4, 0xc5, 0xc6):
      return None
    nbytes = self._unpack((_U8, _U16, _U32)[tag - 0xc4])
    offset = self.pos
    if offset + nbytes != end:
      raise StreamError(f'array payload at offset {offset} has a bad length')
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and
            all(type(d) is int and 0 <= d < 2**63 for d in shape)):  # pylint: disable=unidiomatic-typecheck
      raise StreamError(f'bad array shape {shape!r} at offset {offset}')
    shape = tuple(shape)
    try:
      dtype = serialization.dtype_from_name(name)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
      raise StreamError(f'bad array dtype at offset {offset}: {e}') from e
    if dtype.hasobject or dtype.itemsize == 0 or dtype.subdtype is not None:
      raise StreamError(f'unsupported dtype {dtype} at offset {offset}')
    if int(np.prod(shape, dtype=object)) * dtype.itemsize != nbytes:
      raise StreamError(
          f'array of shape {shape} and dtype {dtype} does not fit its'
          f' {nbytes} bytes at offset {offset}')
    self.skip(nbytes)
    value = self.array(dtype, shape, offset, nbytes, defer)
    if nbytes:
      self.charge('arrays', _ARRAY_COST + 16 * len(shape))
    return value

  def array(self, dtype: np.dtype, shape: tuple, offset: int, nbytes: int,
            defer: bool):
    """What an array becomes; its data is ``nbytes`` at ``offset`` (not
    read yet). ``defer``: it is a chunk of a chunked array. Default: a
    read-only numpy array read now."""
    del defer
    arr = np.empty(shape, dtype)
    if nbytes:
      pread_into(self.fd, memoryview(arr.reshape(-1).view(np.uint8)), offset)
    arr.flags.writeable = False
    return arr

  def is_shareable(self, value) -> bool:
    """Whether ``value`` (from a small ext payload) may stand for every
    equal payload: empty read-only arrays by default."""
    return isinstance(value, np.ndarray) and value.size == 0

  def ext(self, code: int, data: bytes, offset: int):
    """An ext value other than an array (``lib.serialization``'s)."""
    try:
      return serialization._msgpack_ext_unpack(code, bytes(data))  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      raise StreamError(f'bad ext type {code} at offset {offset}: {e}') from e
