"""Each process reads only its slices of a single-file msgpack checkpoint.

A checkpoint written by one process (``save_checkpoint``, flax's msgpack
layout) holds every array whole. When N processes restore it into sharded
arrays, each needs only the slices its devices hold. :func:`read_lazily`
parses the file's framing (``lib.msgpack_stream``: maps, keys, scalars and
small arrays are read) and leaves every array of at least ``min_bytes``
unread, as a :class:`StoredArray` (where its bytes lie; a chunked array,
over ``MAX_CHUNK_SIZE``, as several segments). :func:`place` then reads,
for every ``(StoredArray, sharding)`` at once, the boxes this process's
devices hold straight into their host buffers: a box's rows are
contiguous runs of the file, each read with ``os.preadv``, by a thread
pool; replicas of one box on several devices are read once. Runs under
``_MIN_RUN_BYTES`` (a box cutting the last axis finely) are read with
their surrounding rows and the box copied out.

Integrity: a checkpoint whose integrity sidecar hashes each 8 MiB block
(version 2, ``lib.checkpoint_sidecar``) is read in whole blocks, each
checked against its hash before any of its bytes is used: the framing and
small arrays through a few cached blocks, each slice's blocks straight into
its buffer (the blocks at its edges, shared with the neighbours' slices,
through the cache). A block that does not match raises
``CheckpointReadError`` naming the file and the byte range; no unchecked
byte is returned. A version-1 sidecar (the hash of the whole file) can only
be vouched for by reading the file whole: :func:`read_lazily` returns None
for it, as for files on object stores and files it cannot parse, and the
caller reads the file whole as before (its errors then name the fault).
Without a sidecar a slice read is checked as much as a whole read is: the
whole framing is parsed, every array's size must fit the file, and a file
that ends early raises.

  >>> import os, tempfile
  >>> from gintrain.lib import checkpoint_io
  >>> d = tempfile.mkdtemp()
  >>> checkpoint_io.write_checkpoint_file(
  ...     {'w': np.arange(12.0).reshape(4, 3), 'n': 7}, d + '/ck_1',
  ...     d + '/tmp', overwrite=False)
  >>> tree = read_lazily(d + '/ck_1', min_bytes=1)
  >>> tree['n'], tree['w']
  (7, StoredArray(float64, (4, 3)))
  >>> tree['w'].read_box(((1, 3), (0, 3)))
  array([[3., 4., 5.],
         [6., 7., 8.]])
"""

import bisect
import collections
import dataclasses
import os
import threading
from typing import Any

import jax
import numpy as np

from gintrain.lib import checkpoint_sidecar
from gintrain.lib import errors
from gintrain.lib import msgpack_stream
from gintrain.lib import packed_arrays
from gintrain.lib import save_status
from gintrain.lib import serialization
from gintrain.lib import storage

__all__ = ['StoredArray', 'read_lazily', 'place', 'materialize',
           'bytes_read']

# Arrays of at least this many bytes are left unread by read_lazily.
MIN_BYTES = 1 << 20
# A thread's share of the reads: runs are grouped (or split) to this size.
_TASK_BYTES = 8 << 20
# Runs shorter than this are read with their surrounding rows.
_MIN_RUN_BYTES = 64 << 10

# Checked blocks kept for the framing and the edges of slices: this many
# bytes of them (at least 4 blocks).
_CACHE_BYTES = 32 << 20

_READ = {'bytes': 0}
_READ_LOCK = threading.Lock()


def bytes_read() -> int:
  """Bytes of array data this module has read in this process (a counter
  for tests and benchmarks: a process that restores its slices reads
  about its share); with a block-hashed sidecar, every block read (the
  framing's too)."""
  return _READ['bytes']


def _count(nbytes: int) -> None:
  with _READ_LOCK:
    _READ['bytes'] += nbytes


@dataclasses.dataclass(eq=False)
class StoredArray:
  """An array of a checkpoint file, not read yet.

  Attributes:
    path: the checkpoint file.
    dtype, shape: the array's.
    segments: ``(flat byte start, file offset, bytes)`` in order: one for a
      plain array, one per chunk of a chunked one.
    blocks: the file's checked reads (a block-hashed sidecar), or None.
  """
  path: str
  dtype: np.dtype
  shape: tuple
  segments: list
  blocks: '_Blocks | None' = None

  __hash__ = None  # not a valid map key (as an array is not)

  def __repr__(self):
    return f'StoredArray({self.dtype}, {self.shape})'

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize

  def read(self) -> np.ndarray:
    """The whole array (read-only, as ``read_checkpoint_file`` gives it)."""
    out = self.read_box(tuple((0, n) for n in self.shape))
    out.flags.writeable = False
    return out

  def read_box(self, box) -> np.ndarray:
    """The slice ``box`` (``((start, stop), ...)`` per axis), read now."""
    plan = _Plan()
    try:
      dest = plan.add(self, tuple(tuple(b) for b in box))
    except BaseException:
      plan.close()
      raise
    plan.run(parallel=False)
    return dest


class _Blocks:
  """Checked reads of a file whose sidecar hashes each block: only whole
  blocks are read, and each is checked before its bytes are used."""

  def __init__(self, path: str, sidecar: checkpoint_sidecar.Sidecar):
    self.path, self.sidecar = path, sidecar
    self.block_bytes = sidecar.block_bytes
    self._keep = max(4, _CACHE_BYTES // self.block_bytes)
    self._cache = collections.OrderedDict()  # index -> checked bytes
    self._loading = {}  # index -> the lock of the thread reading it
    self._lock = threading.Lock()

  def clear(self) -> None:
    """Drops the cached blocks."""
    with self._lock:
      self._cache.clear()

  def _cached(self, index: int) -> memoryview | None:
    with self._lock:
      if index in self._cache:
        self._cache.move_to_end(index)
        return self._cache[index]
    return None

  def block(self, fd: int, index: int) -> memoryview:
    """Block ``index``, checked (a few are kept; two threads that want
    the same block read it once)."""
    data = self._cached(index)
    if data is not None:
      return data
    with self._lock:
      loading = self._loading.setdefault(index, threading.Lock())
    with loading:
      data = self._cached(index)
      if data is not None:
        return data
      start, n = self.sidecar.block_span(index)
      data = memoryview(bytearray(n))
      _pread_all(fd, data, start, self.path)
      self.sidecar.check_block(index, data, self.path)
      data = data.toreadonly()
      with self._lock:
        self._cache[index] = data
        while len(self._cache) > self._keep:
          self._cache.popitem(last=False)
        self._loading.pop(index, None)
    return data

  def read_into(self, fd: int, view: memoryview, offset: int) -> None:
    """Fills ``view`` with the file's bytes from ``offset``: the blocks it
    covers whole are read straight into it, then checked; the blocks at its
    edges through :meth:`block`.

    Raises:
      gintrain.lib.errors.CheckpointReadError: a block does not match its
        hash, or the file ended early.
    """
    size, block = self.sidecar.size, self.block_bytes
    end = offset + len(view)
    if end > size:
      raise errors.CheckpointReadError(
          self.path, f'bytes {offset}-{end} are past its end ({size})')
    pos = offset
    while pos < end:
      index = pos // block
      start, n = self.sidecar.block_span(index)
      if pos == start and end >= start + n:  # whole blocks: straight in
        last = index
        while (last + 1) * block < size and end >= min((last + 2) * block,
                                                       size):
          last += 1
        stop = min((last + 1) * block, size)
        part = view[pos - offset:stop - offset]
        _pread_all(fd, part, pos, self.path)
        for i in range(index, last + 1):
          self.sidecar.check_block(
              i, part[i * block - pos:min((i + 1) * block, size) - pos],
              self.path)
        pos = stop
      else:
        data = self.block(fd, index)
        stop = min(end, start + n)
        view[pos - offset:stop - offset] = data[pos - start:stop - start]
        pos = stop


class _CheckedSource:
  """The file object the framing parser reads (``seek`` and ``read``):
  checked bytes, from :class:`_Blocks`."""

  def __init__(self, blocks: _Blocks, fd: int):
    self.blocks, self.fd, self.pos = blocks, fd, 0

  def seek(self, offset: int) -> None:
    self.pos = offset

  def read(self, n: int) -> bytes:
    """Up to ``n`` bytes (to the end of a block); b'' at the end."""
    if n <= 0 or self.pos >= self.blocks.sidecar.size:
      return b''
    index = self.pos // self.blocks.block_bytes
    start, _ = self.blocks.sidecar.block_span(index)
    data = self.blocks.block(self.fd, index)
    out = bytes(data[self.pos - start:self.pos - start + n])
    self.pos += len(out)
    return out


class _LazyParser(msgpack_stream.Parser):
  """The framing parser; large arrays (and every chunk) stay unread."""

  def __init__(self, fd, size, path, min_bytes, blocks=None):
    super().__init__(fd if blocks is None else _CheckedSource(blocks, fd),
                     size, slack=4)
    self.path, self.min_bytes, self.blocks = path, min_bytes, blocks
    self.raw_fd = fd

  def array(self, dtype, shape, offset, nbytes, defer):
    if nbytes and (defer or nbytes >= self.min_bytes):
      return StoredArray(self.path, dtype, tuple(shape), [(0, offset, nbytes)],
                         self.blocks)
    if self.blocks is None or not nbytes:
      return super().array(dtype, shape, offset, nbytes, defer)
    arr = np.empty(shape, dtype)
    self.blocks.read_into(self.raw_fd,
                          memoryview(arr.reshape(-1).view(np.uint8)), offset)
    arr.flags.writeable = False
    return arr


class _NotPlain(Exception):
  """A chunked array laid out otherwise than ``serialization.chunk``'s."""


def _unchunk(node):
  """Chunked-array dicts (of StoredArray chunks) -> one StoredArray."""
  if isinstance(node, dict):
    if serialization.CHUNKED_KEY in node:
      return _join_chunks(node)
    for k, v in node.items():
      if isinstance(v, (dict, list)):
        node[k] = _unchunk(v)
  elif isinstance(node, list):
    for i, v in enumerate(node):
      if isinstance(v, (dict, list)):
        node[i] = _unchunk(v)
  return node


def _join_chunks(node) -> StoredArray:
  try:
    shape = tuple(node['shape'][str(i)] for i in range(len(node['shape'])))
    chunks = [node['chunks'][str(i)] for i in range(len(node['chunks']))]
  except (KeyError, TypeError) as e:
    raise _NotPlain() from e
  if not chunks or not all(isinstance(c, StoredArray) and len(c.shape) == 1
                           and c.dtype == chunks[0].dtype for c in chunks):
    raise _NotPlain()
  if not all(type(d) is int and d >= 0 for d in shape):  # pylint: disable=unidiomatic-typecheck
    raise _NotPlain()
  segments, flat = [], 0
  for c in chunks:
    (_, offset, nbytes), = c.segments
    segments.append((flat, offset, nbytes))
    flat += nbytes
  out = StoredArray(chunks[0].path, chunks[0].dtype, shape, segments,
                    chunks[0].blocks)
  if out.nbytes != flat:
    raise _NotPlain()
  return out


def read_lazily(path: str, min_bytes: int = MIN_BYTES):
  """The tree of the local checkpoint file ``path`` with its arrays of at
  least ``min_bytes`` left unread (:class:`StoredArray`); None if it must
  be read whole (a version-1 integrity sidecar, an object store, a file
  this parser cannot take): then read it with
  ``checkpoint_io.read_checkpoint_file``.

  With a block-hashed sidecar every byte parsed is checked first, and the
  arrays read later are checked block by block.

  Raises:
    gintrain.lib.errors.CheckpointReadError: a block it read does not match
      its sidecar (naming the file and the byte range).
  """
  from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoint_naming  # pylint: disable=g-import-not-at-top
  if storage.local_file(path) is None:
    return None
  sidecar = None
  if os.path.lexists(checkpoint_naming.sidecar_path(path)):
    try:
      sidecar = checkpoint_io.read_sidecar(path)
    except errors.CheckpointReadError:
      return None  # malformed: the whole read says so
    if sidecar is None or not sidecar.has_blocks:
      return None  # its hash covers the whole file
  try:
    fd = msgpack_stream.open_regular(path)
  except OSError:
    return None
  try:
    size = os.fstat(fd).st_size
    blocks = None
    if sidecar is not None:
      if sidecar.size != size:
        return None  # the whole read names the size it expected
      blocks = _Blocks(path, sidecar)
    tree = _LazyParser(fd, size, path, min_bytes, blocks).parse_all()
    return _unchunk(tree)
  except errors.CheckpointReadError:
    raise  # a block does not match its hash
  except (msgpack_stream.StreamError, _NotPlain, ValueError, TypeError,
          OverflowError, MemoryError, RecursionError, OSError):
    return None  # the whole read raises the error naming the fault
  finally:
    os.close(fd)


def materialize(tree: Any) -> Any:
  """``tree`` with every :class:`StoredArray` read whole."""
  if isinstance(tree, StoredArray):
    return tree.read()
  if isinstance(tree, dict):
    return {k: materialize(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [materialize(v) for v in tree]
  return tree


def _box(index, shape) -> tuple:
  return tuple(tuple(sl.indices(n)[:2]) for sl, n in zip(index, shape))


def _runs(shape, box, itemsize):
  """``(flat byte starts, run bytes)`` of the contiguous runs that make up
  ``box`` of a C-order array of ``shape``, in the box's C order."""
  nd = len(shape)
  if nd == 0:
    return np.zeros(1, np.int64), itemsize
  k = nd - 1
  while k > 0 and tuple(box[k]) == (0, shape[k]):
    k -= 1
  strides = [itemsize] * nd
  for j in range(nd - 2, -1, -1):
    strides[j] = strides[j + 1] * shape[j + 1]
  run = (box[k][1] - box[k][0]) * strides[k]
  starts = np.array([box[k][0] * strides[k]], np.int64)
  for j in range(k - 1, -1, -1):
    steps = np.arange(box[j][0], box[j][1], dtype=np.int64) * strides[j]
    starts = np.add.outer(steps, starts).reshape(-1)
  return starts, run


def _widened(shape, box, itemsize):
  """``box`` with its last partial axes made whole until a run is at least
  ``_MIN_RUN_BYTES`` (or the box is whole rows)."""
  wide = list(box)
  _, run = _runs(shape, wide, itemsize)
  k = len(shape) - 1
  while run < _MIN_RUN_BYTES and k > 0:
    if tuple(wide[k]) != (0, shape[k]):
      wide[k] = (0, shape[k])
      _, run = _runs(shape, wide, itemsize)
    k -= 1
  return tuple(wide)


def _file_pieces(arr: StoredArray, flat: int, nbytes: int):
  """``(file offset, bytes)`` of the flat byte range ``[flat, flat +
  nbytes)`` of ``arr`` (split where its chunks end)."""
  starts = [s for s, _, _ in arr.segments]
  while nbytes > 0:
    i = bisect.bisect_right(starts, flat) - 1
    seg_flat, offset, seg_bytes = arr.segments[i]
    n = min(nbytes, seg_flat + seg_bytes - flat)
    yield offset + flat - seg_flat, n
    flat, nbytes = flat + n, nbytes - n


def _pread_all(fd: int, view, offset: int, path: str) -> None:
  try:
    msgpack_stream.pread_into(fd, view, offset)
  except msgpack_stream.StreamError as e:
    raise errors.CheckpointReadError(path, str(e)) from None
  _count(len(view))


def _tasks(arr: StoredArray, box, dest: np.ndarray, fd: int) -> list:
  """Callables that fill ``dest`` (C-contiguous, ``box``'s shape) from the
  file, one run after another, each callable about ``_TASK_BYTES``."""
  if dest.size == 0:
    return []
  starts, run = _runs(arr.shape, box, arr.dtype.itemsize)
  view = memoryview(dest.reshape(-1).view(np.uint8))
  blocks = arr.blocks
  reads, pos = [], 0  # (dest byte start, file offset, bytes), merged
  for start in starts.tolist():
    for offset, n in _file_pieces(arr, start, run):
      if reads and reads[-1][1] + reads[-1][2] == offset:
        reads[-1] = (reads[-1][0], reads[-1][1], reads[-1][2] + n)
      else:
        reads.append((pos, offset, n))
      pos += n

  def read_group(items):
    def run_reads():
      for at, offset, n in items:
        if blocks is None:
          _pread_all(fd, view[at:at + n], offset, arr.path)
        else:
          blocks.read_into(fd, view[at:at + n], offset)
    return run_reads
  tasks, group, size = [], [], 0
  for at, offset, n in reads:
    while n > _TASK_BYTES:  # one long run: several tasks
      take = _TASK_BYTES
      if blocks is not None:  # split where blocks end: each read once
        take = ((offset + take) // blocks.block_bytes * blocks.block_bytes
                - offset) or take
      tasks.append(read_group([(at, offset, take)]))
      at, offset, n = at + take, offset + take, n - take
    group.append((at, offset, n))
    size += n
    if size >= _TASK_BYTES:
      tasks.append(read_group(group))
      group, size = [], 0
  if group:
    tasks.append(read_group(group))
  return tasks


class _Plan:
  """The reads of some boxes of some arrays: each box read straight into
  its buffer, or (short runs) its widened box read once into a temporary
  and the box copied out."""

  def __init__(self):
    self.fds = {}
    self.tasks = []  # callables, independent of each other
    self.copies = []  # (dest, temp, local slices), after the tasks
    self.temps = {}  # (id(arr), wide box) -> temporary

  def fd(self, path):
    if path not in self.fds:
      self.fds[path] = msgpack_stream.open_regular(path)
    return self.fds[path]

  def add(self, arr: StoredArray, box) -> np.ndarray:
    """The host buffer ``box`` of ``arr`` will be read into."""
    dest = packed_arrays.empty_aligned([b - a for a, b in box], arr.dtype)
    wide = _widened(arr.shape, box, arr.dtype.itemsize)
    if wide == tuple(box):
      self.tasks += _tasks(arr, box, dest, self.fd(arr.path))
      return dest
    key = (id(arr), wide)
    if key not in self.temps:
      self.temps[key] = np.empty([b - a for a, b in wide], arr.dtype)
      self.tasks += _tasks(arr, wide, self.temps[key], self.fd(arr.path))
    self.copies.append((dest, self.temps[key], tuple(
        slice(a - c, b - c) for (a, b), (c, _) in zip(box, wide))))
    return dest

  def run(self, parallel: bool = True) -> None:
    """Runs the reads (on the read pool, or here), then the copies;
    closes the files."""
    try:
      if parallel:
        packed_arrays.run_tasks(self.tasks)
      else:
        for task in self.tasks:
          task()
      for dest, temp, local in self.copies:
        dest[...] = temp[local]
    finally:
      self.close()

  def close(self) -> None:
    for fd in self.fds.values():
      os.close(fd)
    self.fds, self.temps, self.tasks = {}, {}, []


def place(pairs: list) -> list:
  """``jax.Array``s of ``pairs`` (``(StoredArray, sharding)``), each with its
  sharding; this process reads only the boxes its devices hold (replicas
  once), all in parallel, straight into their host buffers. Every process
  calls it with the same arrays (in several processes): all raise, or none.

  Raises:
    gintrain.lib.errors.CheckpointReadError: the file ended early (changed
      since it was parsed), or a block read does not match its hash (here
      or, naming the processes, on another process).
  """
  plan = _Plan()
  placed = []
  error = None
  try:
    for arr, sharding in pairs:
      boxes = {}  # box -> host buffer: replicas are read once
      devices = []
      for device, index in sharding.addressable_devices_indices_map(
          arr.shape).items():
        box = _box(index, arr.shape)
        if box not in boxes:
          boxes[box] = plan.add(arr, box)
        devices.append((device, boxes[box]))
      placed.append(devices)
    plan.run()
  except Exception as e:  # pylint: disable=broad-except
    plan.close()
    error = e
  for arr, _ in pairs:
    if arr.blocks is not None:
      arr.blocks.clear()  # the cached blocks are no longer needed
  _agree(pairs, error)
  return [jax.make_array_from_single_device_arrays(
      arr.shape, sharding, [jax.device_put(host, device)
                            for device, host in devices])
          for (arr, sharding), devices in zip(pairs, placed)]


def _agree(pairs: list, error: Exception | None) -> None:
  """Every process raises if any process's reads failed."""
  path = pairs[0][0].path if pairs else ''
  if jax.process_count() > 1:
    everyone = save_status.allgather([error is not None])  # no compile
    failed = np.flatnonzero(everyone[:, 0]).tolist()
    if error is None and failed:
      raise errors.CheckpointReadError(
          path, f'its slices failed to read on process(es) {failed} (their'
          ' log names the bytes)')
  if error is not None:
    raise error
