"""The ``packed`` layout of a checkpoint's sharded arrays: two files a process.

``lib.multiprocess_arrays`` stores the arrays that span processes in
``<checkpoint>_gda``. In this layout every process writes one data file and
one index into ``<checkpoint>_gda/packed/``::

  process_<i>.bin    the raw bytes (C order) of every slice process i wrote,
                     each slice at a 4 KiB-aligned offset, fsynced once
  process_<i>.json   for each array: shape, dtype and, per slice written,
                     its box, offset, size and the xxh3-64 hash of each
                     8 MiB block of it (``HASH_BLOCK``; version 1 indexes,
                     one hash per slice, still read)

A checkpoint has ``2 x processes`` array files whatever the number of arrays
and devices (flax's per-array zarr layout has about ``arrays x (1 +
devices)``). Each slice of an array is written once, by the process holding
its replica 0 (replicated arrays: by one process only). The index is written
after the data and is the integrity record: a restore reads each slice it
needs with ``os.preadv`` straight into the buffer handed to the device (one
copy from the page cache, no decoding), every hash block a task of the
thread pool that hashes each 1 MiB piece right after reading it (while it
is in the CPU's cache), so the check costs no second pass over memory and
a slice is vouched for as it lands; a slice stored with other bounds than
the one wanted (another mesh or process count) is read in pieces of whole
rows into a small per-thread buffer, each piece hashed and its overlaps
copied while in cache (rows over 4 MiB, or on an object store: read whole
into a temporary, checked, then copied). Destination buffers of 2 MiB or
more start at a huge-page boundary. Devices holding the same box
(replicas) share one read. On an object store
(``s3://``, ``gs://``, through ``lib.storage``) the two files are two
objects (multipart uploads that appear whole or not at all) and reads are
ranged GETs. The commit (a directory rename locally, a commit marker
written last on stores) is ``lib.multiprocess_arrays``'s.

  >>> _aligned(1), _aligned(4096), _aligned(4097)
  (4096, 4096, 8192)
"""

import concurrent.futures
import functools
import json
import os
import threading
from typing import Any

import jax
import numpy as np

from gintrain.lib import errors

__all__ = ['PACKED_DIR', 'snapshot', 'snapshot_bytes', 'write_process_files', 'is_packed',
           'load_index', 'read_arrays', 'check_slices', 'describe',
           'run_tasks', 'empty_aligned']

PACKED_DIR = 'packed'
# 2: a hash per block of HASH_BLOCK bytes of each slice (1: one per slice,
# still read).
VERSION = 2
HASH_BLOCK = 8 << 20
_ALIGN = 4096
# Buffers of at least this size start at a multiple of it (huge pages).
_HUGE_PAGE = 2 << 20
# Reads of one slice are split into pieces of this size across threads.
_PIECE_BYTES = 32 << 20
_THREADS = min(16, 4 * (os.cpu_count() or 1))


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
  """Threads for reads and hashes, started once (starting them per restore
  cost ~10 ms each on a loaded machine)."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(
          _THREADS, thread_name_prefix='gintrain-packed-read')
    return _POOL


def empty_aligned(shape, dtype) -> np.ndarray:
  """``np.empty(shape, dtype)`` starting at a 4 KiB boundary: jax's CPU
  client takes such a buffer as the device array without copying it
  (numpy's own allocations are only 16-byte aligned, and were copied
  again by ``device_put``).

  A buffer of 2 MiB or more starts at a 2 MiB boundary, so that all of it
  can be backed by huge pages (numpy asks for them on large allocations):
  a restore's reads then fault in a page per 2 MiB instead of one per
  4 KiB, measured 3-4x less kernel time for the same bytes (a 4 KiB
  boundary left about a tenth of a restore's buffers in small pages)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  align = _HUGE_PAGE if nbytes >= _HUGE_PAGE else _ALIGN
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _aligned(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


def _bytes_view(data: np.ndarray) -> np.ndarray:
  """A flat uint8 view of a C-contiguous array (any dtype, bfloat16 too)."""
  return data.reshape(-1).view(np.uint8)


# Hashes go through the data in pieces of this size: xxhash holds the GIL
# while it hashes, so the training loop waits at most one piece.
_HASH_PIECE = 1 << 20


def _digest(view) -> str:
  """xxh3-64 of a flat byte view (the same as one ``xxh3_64_hexdigest``)."""
  import xxhash  # pylint: disable=g-import-not-at-top
  if len(view) <= _HASH_PIECE:
    return xxhash.xxh3_64_hexdigest(view)
  state = xxhash.xxh3_64()
  for lo in range(0, len(view), _HASH_PIECE):
    state.update(view[lo:lo + _HASH_PIECE])
  return state.hexdigest()


def _block_digests(view) -> list:
  """The xxh3-64 of each ``HASH_BLOCK`` bytes of a flat byte view (one
  for an empty view): a restore checks each block as it lands, in
  parallel."""
  return [_digest(view[lo:lo + HASH_BLOCK])
          for lo in range(0, max(len(view), 1), HASH_BLOCK)]


def _box(index, shape) -> tuple:
  return tuple(tuple(sl.indices(n)[:2]) for sl, n in zip(index, shape))


def _box_str(box) -> str:
  return '[' + ', '.join(f'{a}:{b}' for a, b in box) + ']'


def _dtype(name: str) -> np.dtype:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return np.dtype(jnp.dtype(name))


def _corrupt(path: str, reason: str) -> errors.CheckpointReadError:
  return errors.CheckpointReadError(path, ' '.join(str(reason).split())[:400])


def snapshot(arrays: list, copy: bool) -> list:
  """``[(subpath, shape, dtype, [(box, host array)])]``: the slices of
  ``arrays`` (``(subpath, jax.Array)`` pairs) this process writes (replica
  0 of each), on the host. ``copy``: own copies (the device buffers may be
  donated or deleted before a background write reads them)."""
  out = []
  if copy:  # every device-to-host copy in flight at once
    for _, arr in arrays:
      for shard in arr.addressable_shards:
        if shard.replica_id == 0 and hasattr(shard.data, 'copy_to_host_async'):
          shard.data.copy_to_host_async()
  for subpath, arr in arrays:
    slices = []
    for shard in arr.addressable_shards:
      if shard.replica_id != 0:
        continue
      # Without a copy the device array is kept and brought to the host
      # one slice at a time by the writer (host memory: one slice).
      data = np.array(shard.data, order='C', copy=True) if copy else (
          shard.data)
      slices.append((_box(shard.index, arr.shape), data))
    out.append((subpath, tuple(arr.shape), str(arr.dtype), slices))
  return out


def _write_all(fd: int, view) -> None:
  view = memoryview(view)
  while view:
    view = view[os.write(fd, view):]


def snapshot_bytes(arrays: list) -> int:
  """Bytes of the slices of ``arrays`` this process writes."""
  return sum(shard.data.nbytes for _, arr in arrays
             for shard in arr.addressable_shards if shard.replica_id == 0)


def _host(data) -> np.ndarray:
  """A slice's values on the host, C-contiguous (a device-to-host copy for
  a device array; on CPU devices numpy's view of the buffer)."""
  return np.ascontiguousarray(data)


class _FileSink:
  """A local data file, created exclusively, written at offsets."""

  def __init__(self, path: str):
    self.path, self.pos = path, 0
    self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

  def write_at(self, start: int, view) -> None:
    if start != self.pos:
      os.lseek(self.fd, start, os.SEEK_SET)
    _write_all(self.fd, view)
    self.pos = start + len(view)

  def commit(self) -> None:
    try:
      os.fsync(self.fd)
    finally:
      os.close(self.fd)
      self.fd = None

  def abort(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
    try:
      os.unlink(self.path)
    except OSError:
      pass


class _StoreSink:
  """An object on a store (``lib.storage.Upload``), written in order (the
  alignment gaps as zeros); it appears only when committed."""

  def __init__(self, url: str):
    from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
    self.upload, self.pos = storage.Upload(url), 0

  def write_at(self, start: int, view) -> None:
    if start > self.pos:
      self.upload.write(bytes(start - self.pos))
    self.upload.write(view)
    self.pos = start + len(view)

  def commit(self) -> None:
    self.upload.commit()

  def abort(self) -> None:
    self.upload.abort()


def _is_url(path: str) -> bool:
  from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
  return storage.local_file(path) is None


def write_process_files(directory: str, snap: list, process: int,
                        process_count: int) -> int:
  """Writes this process's data file and index into
  ``<directory>/packed/`` (data first, each fsynced; on an object store,
  two objects, the index uploaded after the data). Returns the bytes
  written.

  One pass over the slices: each is brought to the host (device arrays of
  ``snapshot(copy=False)`` one at a time, the next one's copy started while
  this one is written), written at its aligned offset, and hashed in
  another thread while it is written; at most two slices are on the host
  at once. On a failure the partial files are removed and the ``OSError``
  raised.
  """
  folder = os.path.join(directory, PACKED_DIR)
  remote = _is_url(folder)
  if not remote:
    os.makedirs(folder, exist_ok=True)
  data_path = os.path.join(folder, f'process_{process}.bin')
  index_path = os.path.join(folder, f'process_{process}.json')
  index = {'version': VERSION, 'process': process,
           'process_count': process_count, 'hash_block': HASH_BLOCK,
           'arrays': {}}
  flat = [data for _, _, _, slices in snap for _, data in slices]
  pool = _pool()
  digests = [None] * len(flat)
  offsets = []
  offset = 0
  sink = (_StoreSink if remote else _FileSink)(data_path)
  try:
    previous = None
    for n, data in enumerate(flat):
      if n + 1 < len(flat) and hasattr(flat[n + 1], 'copy_to_host_async'):
        flat[n + 1].copy_to_host_async()
      view = _bytes_view(_host(data))
      future = pool.submit(_block_digests, view)
      start = _aligned(offset)
      sink.write_at(start, view)
      offsets.append((start, int(view.size)))
      offset = start + view.size
      del view
      if previous is not None:
        digests[n - 1] = previous.result()
      previous = future
    if previous is not None:
      digests[-1] = previous.result()
    sink.commit()
  except BaseException:
    sink.abort()
    raise
  n = 0
  for subpath, shape, dtype, slices in snap:
    chunks = []
    for box, _ in slices:
      start, nbytes = offsets[n]
      chunks.append({'box': [list(b) for b in box], 'offset': start,
                     'nbytes': nbytes, 'xxh3': digests[n]})
      n += 1
    index['arrays'][subpath] = {'shape': list(shape), 'dtype': dtype,
                                'chunks': chunks}
  blob = json.dumps(index, sort_keys=True).encode()
  sink = (_StoreSink if remote else _FileSink)(index_path)
  try:
    sink.write_at(0, blob)
    sink.commit()
  except BaseException:
    sink.abort()
    if not remote:  # the data file goes too: a save without its index
      try:
        os.unlink(data_path)
      except OSError:
        pass
    raise
  return offset


def is_packed(directory: str) -> bool:
  """Whether the array directory ``directory`` has the packed layout."""
  if _is_url(directory):
    from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
    return storage.isdir(os.path.join(directory, PACKED_DIR))
  return os.path.isdir(os.path.join(directory, PACKED_DIR))


def load_index(directory: str) -> tuple[dict, int]:
  """``(merged index, checksum)`` of a packed array directory.

  The merged index maps each array subpath to ``{'shape', 'dtype',
  'chunks': [(box, (hash block bytes, xxh3 hex digests))], 'where': {box:
  (process, offset, nbytes)}}`` (block 0: one digest of the whole slice,
  a version 1 index).

  Raises:
    gintrain.lib.errors.CheckpointReadError: an index is missing, damaged,
      or disagrees with another, or a data file is shorter than its index.
  """
  import zlib  # pylint: disable=g-import-not-at-top
  folder = os.path.join(directory, PACKED_DIR)
  merged, crc, count, process = {}, 0, None, 0
  while count is None or process < count:
    path = os.path.join(folder, f'process_{process}.json')
    try:
      blob = _read_small(path)
    except FileNotFoundError:
      raise _corrupt(path, 'the index of process'
                     f' {process}{f" of {count}" if count else ""} is'
                     ' missing') from None
    crc = zlib.crc32(blob, crc)
    try:
      index = json.loads(blob)
      if index['version'] not in (1, VERSION) or index['process'] != process:
        raise ValueError('wrong version or process number')
      block = int(index['hash_block']) if index['version'] > 1 else 0
      if block < 0 or (index['version'] > 1 and not block):
        raise ValueError(f'hash block {block}')
      if count is None:
        count = int(index['process_count'])
        if count < 1:
          raise ValueError(f'process count {count}')
      elif index['process_count'] != count:
        raise ValueError('the process count differs from process 0\'s')
      end = 0
      for subpath, info in index['arrays'].items():
        entry = merged.setdefault(subpath, {
            'shape': tuple(int(n) for n in info['shape']),
            'dtype': str(info['dtype']), 'chunks': [], 'where': {}})
        if (entry['shape'] != tuple(info['shape']) or
            entry['dtype'] != info['dtype']):
          raise ValueError(f'array "{subpath}" has another shape or dtype'
                           ' than in another process\'s index')
        itemsize = _dtype(entry['dtype']).itemsize
        for c in info['chunks']:
          box = tuple(tuple(int(x) for x in b) for b in c['box'])
          nbytes, offset = int(c['nbytes']), int(c['offset'])
          if (len(box) != len(entry['shape']) or nbytes != itemsize * int(
              np.prod([b - a for a, b in box])) or offset < 0):
            raise ValueError(f'slice {_box_str(box)} of "{subpath}" has a'
                             ' bad size or offset')
          entry['chunks'].append((box, _parse_digest(c['xxh3'], block,
                                                    nbytes)))
          entry['where'][box] = (process, offset, nbytes)
          end = max(end, offset + nbytes)
    except (ValueError, KeyError, TypeError) as e:
      raise _corrupt(path, f'bad packed index ({e})') from None
    data_path = os.path.join(folder, f'process_{process}.bin')
    try:
      size = _size(data_path)
    except OSError:
      size = -1
    if size < end:
      bad = [s for s, e in merged.items()
             if any(p == process and o + n > size
                    for p, o, n in e['where'].values())]
      name = os.path.join(directory, bad[0]) if bad else data_path
      held = ', '.join(sorted(bad)[:8]) + (', ...' if len(bad) > 8 else '')
      raise _corrupt(name, f'its data file {data_path} (arrays {held}) is'
                     f' {"missing" if size < 0 else f"{size} bytes"}, the'
                     f' index says at least {end}')
    process += 1
  return merged, crc


def _read_small(path: str) -> bytes:
  """An index file's bytes (at most 64 MiB), local or on a store."""
  if _is_url(path):
    from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
    return storage.read_bytes(path, limit=64 << 20)
  with open(path, 'rb') as f:
    return f.read(64 << 20)


def _size(path: str) -> int:
  if _is_url(path):
    from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
    return storage.size(path)
  return os.path.getsize(path)


class _Files:
  """Data files of one restore: local ones opened once (closed at the
  end); on a store, ranged GETs of the objects."""

  def __init__(self, folder):
    self.folder = folder
    self.fds = {}
    self.lock = threading.Lock()
    self.fs = None
    if _is_url(folder):
      from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
      self.fs, self.fs_folder = storage.filesystem(folder)

  def fd(self, process):
    """``read(view, offset, path)`` of the data file of ``process``."""
    name = f'process_{process}.bin'
    if self.fs is not None:
      return functools.partial(_get_into, self.fs,
                               f'{self.fs_folder.rstrip("/")}/{name}')
    with self.lock:
      if process not in self.fds:
        self.fds[process] = os.open(os.path.join(self.folder, name),
                                    os.O_RDONLY)
      return functools.partial(_pread_into, self.fds[process])

  def close(self):
    for fd in self.fds.values():
      os.close(fd)


def _pread_into(fd: int, view: np.ndarray, offset: int, path: str) -> None:
  mv = memoryview(view)
  while mv:
    n = os.preadv(fd, [mv], offset)
    if n <= 0:
      raise _corrupt(path, f'its data file ended early at offset {offset}')
    mv, offset = mv[n:], offset + n


def _get_into(fs, fs_path: str, view: np.ndarray, offset: int,
              path: str) -> None:
  """One ranged GET of an object into ``view`` (a copy from the response)."""
  data = fs.cat_file(fs_path, start=offset, end=offset + len(view))
  if len(data) != len(view):
    raise _corrupt(path, f'its data object ended early at offset {offset}')
  view[:] = np.frombuffer(data, np.uint8)


# A restore reads each hash block in pieces of this size (local files),
# hashing each piece while it is in the CPU's cache.
_READ_PIECE = 1 << 20


def _parse_digest(value, block: int, nbytes: int) -> tuple:
  """An index's hash entry as ``(block bytes, hex digests)``: version 1,
  one digest of the whole slice (block 0); version 2, one per ``block``
  bytes."""
  if not block:
    if not isinstance(value, str):
      raise ValueError('a version 1 hash is one string')
    return 0, (value,)
  want = max(1, -(-nbytes // block))
  if not (isinstance(value, list) and len(value) == want and
          all(isinstance(v, str) for v in value)):
    raise ValueError(f'a slice of {nbytes} bytes needs {want} block hashes')
  return block, tuple(value)


def _read_and_check(read, view, offset, digest, path, box, piece) -> list:
  """Tasks that read the stored slice at file ``offset`` into ``view`` (a
  flat byte view of its size) and check it against ``digest``: one task
  per hash block, each hashing its pieces as they land."""
  block, hexes = digest
  size = len(view)
  block = block or max(size, 1)

  def task(k):
    import xxhash  # pylint: disable=g-import-not-at-top
    lo, hi = k * block, min(size, (k + 1) * block)
    state = xxhash.xxh3_64()
    for start in range(lo, hi, piece):
      part = view[start:min(hi, start + piece)]
      read(part, offset + start, path)
      state.update(part)
    _check_block(state, hexes, k, (lo, hi, size), path, box)
  return [functools.partial(task, k) for k in range(len(hexes))]


# A stored slice needed only in part is read in pieces of whole rows (its
# first dimension) when a row is at most this size; a wider one is read
# whole into a temporary.
_SCATTER_ROW_MAX = 4 << 20
_SCRATCH = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
  """A byte buffer of ``nbytes`` for this thread's pieces: kept per thread
  (at most ``2 * _READ_PIECE``; larger ones are new each time), so that a
  restore's pieces land in memory that is already mapped and in cache."""
  if nbytes > 2 * _READ_PIECE:
    return empty_aligned([nbytes], np.uint8)
  buf = getattr(_SCRATCH, 'buf', None)
  if buf is None or len(buf) < nbytes:
    buf = _SCRATCH.buf = empty_aligned([2 * _READ_PIECE], np.uint8)
  return buf[:nbytes]


def _scatter_tasks(read, offset, stored, dtype, digest, path,
                   targets) -> list:
  """Tasks that read the stored slice ``stored`` (a box; file ``offset``)
  in pieces of whole rows and copy each piece's overlap with every target
  ``(dest, dest box, overlap box)`` while it is in the CPU's cache; no
  buffer of the whole slice. One task per hash block: it owns the rows
  that start in its block, hashes exactly the block's bytes (re-reading
  the part of a row before its first row) and raises if they do not
  match. Destinations are written before the check: a failed restore
  returns none of them."""
  block, hexes = digest
  shape = [d - c for c, d in stored]
  row = _row_bytes(stored, dtype)
  size = row * shape[0]
  block = block or max(size, 1)
  per_piece = max(1, _READ_PIECE // row)
  parts = [(dest, tuple(slice(a - b0, b - b0) for (a, b), (b0, _)
                        in zip(inter[1:], dbox[1:])),
            tuple(slice(a - c, b - c) for (a, b), (c, _)
                  in zip(inter[1:], stored[1:])), inter[0], dbox[0][0])
           for dest, dbox, inter in targets]

  def task(k):
    import xxhash  # pylint: disable=g-import-not-at-top
    lo, hi = k * block, min(size, (k + 1) * block)
    first, end = -(-lo // row), min(shape[0], -(-hi // row))
    state = xxhash.xxh3_64()
    if first * row > lo:  # the end of a row the previous block owns
      head = _scratch(first * row - lo)
      read(head, offset + lo, path)
      state.update(head)
    for r in range(first, end, per_piece):
      r2 = min(end, r + per_piece)
      view = _scratch((r2 - r) * row)
      read(view, offset + r * row, path)
      state.update(view[:min(r2 * row, hi) - r * row])
      rows = view.view(dtype).reshape([r2 - r] + shape[1:])
      g0, g1 = stored[0][0] + r, stored[0][0] + r2
      for dest, dslices, sslices, (i0, i1), d0 in parts:
        a, b = max(i0, g0), min(i1, g1)
        if a < b:
          dest[(slice(a - d0, b - d0),) + dslices] = rows[
              (slice(a - g0, b - g0),) + sslices]
    _check_block(state, hexes, k, (lo, hi, size), path, stored)
  return [functools.partial(task, k) for k in range(len(hexes))]


def _check_block(state, hexes, k, span, path, box) -> None:
  """Raises the corrupt-slice error unless the xxh3 ``state`` of block
  ``k`` (bytes ``span`` = (lo, hi, size) of the slice ``box``) is
  ``hexes[k]``."""
  got = state.hexdigest()
  if got != hexes[k]:
    lo, hi, size = span
    where = f' (bytes {lo}-{hi} of {size})' if len(hexes) > 1 else ''
    raise _corrupt(path, f'slice {_box_str(box)} does not match its hash'
                   f'{where} (xxh3 {got}, written {hexes[k]}): the data'
                   ' file is damaged or was swapped')


def _row_bytes(box, dtype) -> int:
  """Bytes of one row (first dimension) of the slice ``box``."""
  return dtype.itemsize * int(np.prod([d - c for c, d in box[1:]],
                                      dtype=np.int64))


def run_tasks(tasks) -> None:
  """Runs ``tasks`` (callables) on the read pool; raises the first error
  once none is running any more (no read may outlive its file)."""
  futures = [_pool().submit(t) for t in tasks]
  error = None
  for future in futures:
    try:
      future.result()
    except BaseException as e:  # pylint: disable=broad-except
      if error is None:
        error = e
        for f in futures:
          f.cancel()
  if error is not None:
    raise error


def _overlap(box, stored):
  return all(a < d and c < b for (a, b), (c, d) in zip(box, stored))


def _local(outer, inner):
  """``inner`` (global box) as slices of an array holding ``outer``."""
  return tuple(slice(c - a, d - a) for (a, _), (c, d) in zip(outer, inner))


def read_arrays(directory: str, merged: dict, wanted: list) -> list:
  """The arrays ``wanted`` (``(subpath, path, sharding)``) of the packed
  directory ``directory``, each placed with its sharding; this process
  reads only the slices its devices hold, all in parallel.

  Each hash block of a stored slice is one task: read in pieces straight
  into the destination buffer (a stored slice within a device's box and
  with its whole rows), or (other bounds) in pieces of whole rows into a
  per-thread buffer whose overlaps are copied into every destination
  (``_scatter_tasks``; rows over ``_SCATTER_ROW_MAX`` and object stores:
  into a temporary of the whole slice, copied once every block matched),
  each piece hashed as it lands. Nothing is returned unless every block
  of every slice read matched its hash.

  Raises:
    gintrain.lib.errors.CheckpointReadError: a slice missing, short, or not
      matching its hash (the message names the array).
  """
  files = _Files(os.path.join(directory, PACKED_DIR))
  piece = _READ_PIECE if files.fs is None else _PIECE_BYTES
  try:
    plans = []  # per array: [(device, dest buffer)]
    tasks = []  # reads with their hash checks, independent of each other
    copies = []  # (dest, dest slices, temp, temp slices), after the reads
    # (array index, stored box) -> (read, offset, dtype, digest, path,
    # [(dest, dest box, overlap box)]): stored slices needed in part
    partial = {}
    for i, (subpath, path, sharding) in enumerate(wanted):
      info = merged.get(subpath)
      if info is None:
        raise _corrupt(path, 'the array is not in the packed index')
      shape, dtype = info['shape'], _dtype(info['dtype'])
      digests = dict(info['chunks'])
      placed = []
      boxes = {}  # box -> buffer: replicas are read once
      for device, index in sharding.addressable_devices_indices_map(
          shape).items():
        box = _box(index, shape)
        if box in boxes:
          placed.append((device, boxes[box]))
          continue
        dest = boxes[box] = empty_aligned([b - a for a, b in box], dtype)
        placed.append((device, dest))
        covered = 0
        for stored, where in info['where'].items():
          if not _overlap(box, stored):
            continue
          covered += int(np.prod([min(b, d) - max(a, c) for (a, b), (c, d)
                                  in zip(box, stored)]))
          inside = all(a <= c and d <= b for (a, b), (c, d)
                       in zip(box, stored))
          rows_whole = all(box[k] == stored[k] for k in range(1, len(box)))
          process, offset, _ = where
          if inside and rows_whole:  # contiguous in dest: read straight in
            part = dest[_local(box, stored)] if box else dest
            tasks += _read_and_check(files.fd(process), _bytes_view(part),
                                     offset, digests[stored], path, stored,
                                     piece)
            continue
          inter = tuple((max(a, c), min(b, d)) for (a, b), (c, d)
                        in zip(box, stored))
          key = (i, stored)
          if key not in partial:
            partial[key] = (files.fd(process), offset, dtype,
                            digests[stored], path, [])
          partial[key][-1].append((dest, box, inter))
        if covered != int(np.prod(dest.shape)):
          raise _corrupt(path, f'slice {_box_str(box)} is not covered by'
                         ' the stored slices')
      plans.append(placed)
    for (_, stored), (read, offset, dtype, digest, path,
                      targets) in partial.items():
      if files.fs is None and _row_bytes(stored, dtype) <= _SCATTER_ROW_MAX:
        tasks += _scatter_tasks(read, offset, stored, dtype, digest, path,
                                targets)
        continue
      temp = empty_aligned([d - c for c, d in stored], dtype)
      tasks += _read_and_check(read, _bytes_view(temp), offset, digest,
                               path, stored, piece)
      copies += [(dest, _local(box, inter), temp, _local(stored, inter))
                 for dest, box, inter in targets]
    run_tasks(tasks)
    # Overlaps of slices read whole (rows too wide, or on a store): copied
    # in parallel (numpy releases the GIL), once every hash matched.
    run_tasks([functools.partial(_copy, *c) for c in copies])
  finally:
    files.close()
  out = []
  for (subpath, path, sharding), placed in zip(wanted, plans):
    shards = [jax.device_put(dest, device) for device, dest in placed]
    out.append(jax.make_array_from_single_device_arrays(
        merged[subpath]['shape'], sharding, shards))
  return out


def _copy(dest, dslices, temp, tslices) -> None:
  dest[dslices] = temp[tslices]


def check_slices(directory: str, merged: dict, items: list) -> None:
  """Reads each stored slice ``(subpath, path, box)`` whole and checks its
  hash (``path`` names the array in errors); in parallel. Local files are
  read in pieces into per-thread buffers (``_scatter_tasks`` with nothing
  to copy); slices on a store, or with rows over ``_SCATTER_ROW_MAX``, into
  temporaries, at most 256 MiB of them at a time."""
  files = _Files(os.path.join(directory, PACKED_DIR))
  piece = _READ_PIECE if files.fs is None else _PIECE_BYTES
  try:
    batch, size = [], 0
    for n, (subpath, path, box) in enumerate(items):
      info = merged[subpath]
      process, offset, nbytes = info['where'][box]
      dtype, digest = _dtype(info['dtype']), dict(info['chunks'])[box]
      if (files.fs is None and nbytes and box and
          _row_bytes(box, dtype) <= _SCATTER_ROW_MAX):
        batch += _scatter_tasks(files.fd(process), offset, box, dtype,
                                digest, path, [])
      else:
        temp = empty_aligned([d - c for c, d in box], dtype)
        batch += _read_and_check(files.fd(process), _bytes_view(temp),
                                 offset, digest, path, box, piece)
        size += nbytes
      if size >= (256 << 20) or n == len(items) - 1:
        run_tasks(batch)
        batch, size = [], 0
  finally:
    files.close()


def describe(merged: dict) -> dict[str, Any]:
  """Arrays, slices and bytes of a merged index (for listings)."""
  return {'arrays': len(merged),
          'slices': sum(len(e['chunks']) for e in merged.values()),
          'bytes': sum(n for e in merged.values()
                       for _, _, n in e['where'].values())}
