"""Streaming, durable reads and writes of single-file msgpack checkpoints.

The bytes are exactly those of ``lib.serialization.to_bytes`` (and of flax's
``to_bytes``), but neither side ever holds the whole file as one ``bytes``
object:

* **Writing** walks the state dict once (:func:`encode`) into a list of
  segments: msgpack framing (map headers, keys, scalars, small arrays) packed
  into small byte strings, and the large arrays themselves. The segments are
  then written straight to the file (memoryviews of the array buffers, no
  copy), the file is fsynced, renamed over the final name, and the directory
  fsynced. Extra memory: the framing plus arrays under 64 KiB; an array that
  is not C-contiguous is written through 64 MiB contiguous pieces (a whole
  copy only if it is also chunked); a big-endian one is converted.
* **Reading** parses the msgpack framing from a small read-ahead window,
  allocates every array once at its final size and shape (a chunked array
  directly at its full shape) and has a thread pool fill it from the file
  with ``os.preadv`` while parsing goes on. Extra memory: none beyond the
  restored arrays. Each small array is one numpy object (no bookkeeping
  object is kept for it) and zero-size arrays of one dtype and shape share
  one read-only object, so a file of millions of tiny arrays costs about
  what the numpy objects themselves cost (flax's reader costs more).
* Only regular files are read or written: writes never follow a symlink
  (``O_NOFOLLOW``, temporaries created with ``O_EXCL``) and a FIFO, device
  or directory is refused before it could block (:class:`NotARegularFileError`).

  >>> import os, tempfile, numpy as np
  >>> d = tempfile.mkdtemp()
  >>> write_checkpoint_file({'w': np.arange(3.0)}, d + '/ck_1', d + '/ck_tmp',
  ...                       overwrite=False)
  >>> read_checkpoint_file(d + '/ck_1')
  {'w': array([0., 1., 2.])}

Snapshots for asynchronous saves (``encode(..., snapshot=True)``): numpy
arrays are copied (they may be mutated after the call returns; the caller
pays a copy into fresh memory, 1.6-1.8 s per GiB on the loaded 2-core
benchmark VM, about half a durable save, and the copy's memory until the
write finished); ``jax.Array``
leaves are immutable and are only turned into host numpy views
(``np.asarray``: zero-copy on CPU, the device-to-host transfer elsewhere).
Holding that view also keeps a later ``donate_argnums`` call from reusing the
buffer (jax skips donation of buffers with external references).

Decoding never executes code: object dtypes are refused.

**Object stores** (``s3://``, ``gs://``, ``memory://``; ``lib.storage``): a
write streams the same segments into an upload that appears under the final
name only when complete (an S3 multipart upload, completed by its last
request; no temporary name, no rename); a read downloads the object into a
local temporary staging file, decodes it as above and deletes it.

**Integrity sidecar** (beyond flax): a save may write
``<dir>/.<name>.xxh3`` holding the size of the main file and the xxh3-64
hash of each of its 8 MiB blocks (``lib.checkpoint_sidecar``: computed
while streaming it, in the one pass that hashed the whole file before; the
main file's bytes do not change; a process can check just the blocks it
reads, ``lib.msgpack_slices``), before
the main file is committed. A read verifies the file against its sidecar
when there is one (a mismatch is a ``CheckpointReadError`` naming the file);
files without one (flax's) read as before. Which saves write one:
:func:`set_integrity_sidecar` (default ``'auto'``: saves to object stores).
A save without a sidecar removes a stale one of the same name. One window
is left: an ``overwrite=True`` save of an existing step killed between
writing the new sidecar and committing the new file leaves the old file
with the new sidecar, which then reads as corrupt (never as wrong data).
"""

import concurrent.futures
import dataclasses
import errno
import functools
import logging
import os
import stat
import struct
from typing import Any

import jax
import msgpack
import numpy as np

from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoint_sidecar
from gintrain.lib import errors
from gintrain.lib import serialization
from gintrain.lib import msgpack_stream
from gintrain.lib import storage

logger = logging.getLogger(__name__)

__all__ = [
    'EncodedTree',
    'encode',
    'write_file',
    'commit_file',
    'make_parent_dirs',
    'write_checkpoint_file',
    'read_checkpoint_file',
    'fsync_dir',
    'NotARegularFileError',
    'CheckpointIsADirectoryError',
    'CheckpointWriteError',
    'set_integrity_sidecar',
    'integrity_sidecar',
    'verify_sidecar',
    'read_sidecar',
]

# Arrays smaller than this are packed into the framing bytes.
_INLINE_WRITE_BYTES = 1 << 16
# Non-contiguous arrays are written through contiguous pieces of this size.
_PIECE_BYTES = 64 << 20
# Arrays up to this size are read while parsing; larger ones in parallel.
_INLINE_READ_BYTES = 1 << 20
# Parallel reads: split into pieces of this size, read by this many threads.
_READ_PIECE_BYTES = 32 << 20
_READ_THREADS = min(8, 2 * (os.cpu_count() or 1))
_MAX_NDIM = msgpack_stream.MAX_NDIM
# The reader's memory bound, in multiples of msgpack_restore's
# (lib.msgpack_stream): 500,000 4-element arrays cost under 10x their file.
_RESTORE_SLACK = 4
# Integrity sidecars: lib.checkpoint_sidecar.
_SIDECAR_MAX_BYTES = checkpoint_sidecar.MAX_BYTES
_sidecar_mode = 'auto'


def set_integrity_sidecar(mode: bool | str) -> None:
  """Which saves write an integrity sidecar (restores always verify one).

  Args:
    mode: True (every save), False (none) or ``'auto'`` (the default: saves
      to object stores, whose files cross a network; local directories
      keep exactly flax's file set).
  """
  global _sidecar_mode
  if mode not in (True, False, 'auto'):
    raise ValueError(f'integrity sidecar mode must be True, False or'
                     f' "auto", not {mode!r}')
  _sidecar_mode = mode


def integrity_sidecar(path: str) -> bool:
  """Whether a save of ``path`` writes a sidecar now."""
  if _sidecar_mode == 'auto':
    return storage.local_file(path) is None
  return bool(_sidecar_mode)


# ---------------------------------------------------------------------------
# Errors (``OSError`` subclasses, as the raw errors they replace).


class NotARegularFileError(errors.GintrainError, OSError):
  """A checkpoint path holds a symlink, FIFO, socket, device or directory.

  Checkpoint files are only ever read and written as regular files, so a
  FIFO cannot hang a save or restore and a planted symlink cannot redirect
  a write.
  """

  def __init__(self, path, what):
    self.path, self.what = path, what
    errors.GintrainError.__init__(
        self, f'Checkpoint path "{path}" is {what}, not a regular file.',
        'Move it out of the checkpoint directory, or use another directory'
        ' or prefix.')


class CheckpointIsADirectoryError(NotARegularFileError, IsADirectoryError):
  """A checkpoint file path is a directory (and not an Orbax checkpoint)."""

  def __init__(self, path):
    NotARegularFileError.__init__(
        self, path, 'a directory (and not an Orbax checkpoint)')


class CheckpointWriteError(errors.GintrainError, OSError):
  """Writing a checkpoint failed (e.g. ENOSPC); ``errno`` is the cause's.

  The temporary file is removed; existing checkpoints are untouched.
  """

  def __init__(self, path, cause: OSError, tmp_path=None):
    self.path, self.cause, self.tmp_path = path, cause, tmp_path
    reason = cause.strerror or str(cause)
    full = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    errors.GintrainError.__init__(
        self,
        f'Cannot write checkpoint "{path}": {reason}'
        f' (errno {cause.errno}).',
        ('Free disk space (or raise the quota / file size limit) and save'
         ' again; ' if full else 'Fix the cause and save again; ') +
        'the partial file was removed and older checkpoints are intact.')
    self.errno = cause.errno  # (strerror/filename unset: str() is the message)


# ---------------------------------------------------------------------------
# Encoding.


@dataclasses.dataclass
class EncodedTree:
  """A state dict ready to be streamed: framing bytes and array buffers.

  Attributes:
    segments: ``bytes`` and C-contiguous little-endian numpy arrays, to be
      written in order. Arrays that are not C-contiguous are kept as they are
      and written in contiguous pieces.
    nbytes: the file size.
  """
  segments: list
  nbytes: int


def _ext_header(code: int, length: int) -> bytes:
  """msgpack's ext framing, as the C packer chooses it for ``length``."""
  fixed = {1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8}
  if length in fixed:
    return struct.pack('>Bb', fixed[length], code)
  if length < 1 << 8:
    return struct.pack('>BBb', 0xc7, length, code)
  if length < 1 << 16:
    return struct.pack('>BHb', 0xc8, length, code)
  if length < 1 << 32:
    return struct.pack('>BIb', 0xc9, length, code)
  raise ValueError(f'an array of {length} bytes is too large for msgpack;'
                   ' lower lib.serialization.MAX_CHUNK_SIZE')


class _Encoder:
  """Walks a state dict in ``to_bytes`` order, producing segments."""

  def __init__(self, sort_keys: bool, snapshot: bool):
    self.sort_keys = sort_keys
    self.snapshot = snapshot
    self.packer = msgpack.Packer(
        default=serialization._msgpack_ext_pack, strict_types=True)  # pylint: disable=protected-access
    self.segments = []
    self.buf = bytearray()
    self.nbytes = 0

  def _bytes(self, b):
    self.buf += b
    self.nbytes += len(b)

  def _big(self, arr: np.ndarray):
    if self.buf:
      self.segments.append(bytes(self.buf))
      self.buf = bytearray()
    self.segments.append(arr)
    self.nbytes += arr.nbytes

  def finish(self) -> EncodedTree:
    if self.buf:
      self.segments.append(bytes(self.buf))
    return EncodedTree(self.segments, self.nbytes)

  def _leaf(self, x, path: str):
    try:
      self._bytes(self.packer.pack(x))
    except TypeError as e:
      raise TypeError(
          f'Cannot serialize the leaf at {path or "/"}: a {type(x).__name__}'
          f' ({e}). Leaves must be arrays, numpy scalars, str, bytes, int,'
          ' float, bool, complex or None; register other types with'
          ' register_serialization_state.') from e

  def _array(self, x, path: str, chunkable: bool, private: bool = False):
    # A snapshot copies numpy arrays unless ``private``; jax arrays are
    # immutable, and converted big-endian arrays are private copies already.
    private = private or isinstance(x, jax.Array)
    arr = np.asarray(x)
    if not arr.dtype.isnative:  # stored little-endian (flax: garbage)
      arr, private = serialization._as_little_endian(arr), True  # pylint: disable=protected-access
    try:
      header, nbytes = serialization.array_header(arr.shape, arr.dtype)
    except ValueError as e:
      raise ValueError(f'{e} (leaf at {path or "/"})') from e
    if chunkable and serialization.needs_chunking(arr):
      self._chunked(arr, path, private)
      return
    self._bytes(_ext_header(serialization._ExtType.ndarray,  # pylint: disable=protected-access
                            len(header) + nbytes))
    self._bytes(header)
    if nbytes < _INLINE_WRITE_BYTES:
      self._bytes(arr.tobytes('C'))
    elif self.snapshot and not private:
      self._big(np.array(arr, order='C', copy=True))
    else:
      self._big(arr)

  def _chunked(self, arr: np.ndarray, path: str, private: bool):
    """Writes flax's chunked-array dict; chunks are views of ``arr``."""
    if (self.snapshot and not private) or not arr.flags.c_contiguous:
      arr, private = np.array(arr, order='C', copy=True), True
    self._bytes(self.packer.pack_map_header(3))
    self._bytes(self.packer.pack(serialization.CHUNKED_KEY))
    self._bytes(self.packer.pack(True))
    self._bytes(self.packer.pack('shape'))
    self._bytes(self.packer.pack_map_header(arr.ndim))
    for i, dim in enumerate(arr.shape):
      self._bytes(self.packer.pack(str(i)))
      self._bytes(self.packer.pack(int(dim)))
    chunk_size = max(1, int(serialization.MAX_CHUNK_SIZE / arr.dtype.itemsize))
    flat = arr.reshape(-1)
    starts = range(0, flat.size, chunk_size)
    self._bytes(self.packer.pack('chunks'))
    self._bytes(self.packer.pack_map_header(len(starts)))
    for i, start in enumerate(starts):
      self._bytes(self.packer.pack(str(i)))
      # Chunks are never chunked again (flax packs them directly).
      self._array(flat[start:start + chunk_size], f'{path}/chunks/{i}',
                  chunkable=False, private=private)

  def encode(self, x, path: str = '', chunkable: bool = True):
    if type(x) is dict:  # pylint: disable=unidiomatic-typecheck
      keys = sorted(x) if self.sort_keys else list(x)
      self._bytes(self.packer.pack_map_header(len(keys)))
      for k in keys:
        self._leaf(k, f'{path}/<key {k!r}>')
        self.encode(x[k], f'{path}/{k}', chunkable)
    elif type(x) is list:  # pylint: disable=unidiomatic-typecheck
      # flax neither converts nor chunks arrays below a list.
      self._bytes(self.packer.pack_array_header(len(x)))
      for i, v in enumerate(x):
        self.encode(v, f'{path}/{i}', False)
    elif isinstance(x, (np.ndarray, jax.Array)):
      self._array(x, path, chunkable)
    else:
      self._leaf(x, path)


def encode(state_dict: Any, sort_keys: bool = False,
           snapshot: bool = False) -> EncodedTree:
  """Prepares ``state_dict`` for streaming; the bytes are ``to_bytes``'s.

  Args:
    state_dict: nested dicts/lists of arrays and scalars (the output of
      ``to_state_dict``); dict order is kept unless ``sort_keys``.
    sort_keys: sort dict keys as ``msgpack_serialize(in_place=False)`` does
      (flax's multi-process writer).
    snapshot: make the result independent of later changes to numpy arrays
      in ``state_dict`` (they are copied; jax arrays are immutable and are
      not). Use for asynchronous saves.

  Returns:
    An :class:`EncodedTree`.

  Raises:
    TypeError: a leaf msgpack cannot encode (the message names its path).
    ValueError: an object or structured array dtype.
    OverflowError: an int beyond 64 bits.
  """
  encoder = _Encoder(sort_keys, snapshot)
  encoder.encode(state_dict)
  return encoder.finish()


def _write_all(fd: int, data) -> None:
  view = memoryview(data)
  while view.nbytes:
    written = os.write(fd, view)
    view = view[written:]


def _byte_view(arr: np.ndarray) -> memoryview:
  return memoryview(arr.reshape(-1).view(np.uint8))


def _write_array(write, arr: np.ndarray) -> None:
  """Passes ``arr``'s bytes to ``write`` (views; pieces if not contiguous)."""
  if arr.nbytes == 0:
    return
  if arr.flags.c_contiguous:
    write(_byte_view(arr))
    return
  if arr.ndim == 0:
    write(arr.tobytes())
    return
  row_bytes = max(1, arr.nbytes // arr.shape[0])
  rows = max(1, _PIECE_BYTES // row_bytes)
  for start in range(0, arr.shape[0], rows):
    write(_byte_view(np.ascontiguousarray(arr[start:start + rows])))


def _write_segments(tree: 'EncodedTree', write, hasher=None) -> None:
  """Streams ``tree``'s bytes to ``write`` (and ``hasher``), in order."""
  if hasher is not None:
    plain = write

    def write(data):
      hasher.update(data)
      plain(data)
  for segment in tree.segments:
    if isinstance(segment, np.ndarray):
      _write_array(write, segment)
    else:
      write(segment)


def fsync_dir(path: str) -> None:
  """fsyncs a directory so that renames and creations in it are durable."""
  fd = os.open(path or '.', os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


_kind = msgpack_stream.file_kind


def _not_regular(path: str, mode: int) -> NotARegularFileError:
  if stat.S_ISDIR(mode):
    return CheckpointIsADirectoryError(path)
  return NotARegularFileError(path, _kind(mode))


def _open_regular(path: str, flags: int, follow: bool) -> int:
  """Opens ``path`` only if it is a regular file; never blocks on a FIFO
  (``lib.msgpack_stream.open_regular``).

  Raises:
    NotARegularFileError: ``path`` is a directory, FIFO, socket, device or
      (unless ``follow``) a symbolic link.
    OSError: it cannot be opened (e.g. ``FileNotFoundError``).
  """
  return msgpack_stream.open_regular(path, flags, follow, _not_regular)


def _create_file(path: str, exclusive: bool) -> int:
  """Creates ``path`` for writing; never follows a link or opens a FIFO.

  Exclusive: ``O_CREAT | O_EXCL`` (fails with ``FileExistsError``, also for
  a dangling symlink). Otherwise an existing regular file is truncated and
  anything else is refused.
  """
  flags = (os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW |
           getattr(os, 'O_CLOEXEC', 0))
  if exclusive:
    return os.open(path, flags | os.O_EXCL, 0o666)
  try:
    fd = os.open(path, flags | os.O_EXCL, 0o666)
  except FileExistsError:
    fd = _open_regular(path, os.O_WRONLY, follow=False)
    try:
      os.ftruncate(fd, 0)
    except BaseException:
      os.close(fd)
      raise
  return fd


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def write_file(tree, path: str, sort_keys: bool = False,
               exclusive: bool = False, hasher=None) -> None:
  """Writes ``tree`` (a state dict or an :class:`EncodedTree`) to ``path``.

  The file is created (or, unless ``exclusive``, a regular file there is
  truncated), written, and fsynced before returning. Symbolic links are not
  followed and FIFOs, devices and directories are refused. A failed write
  leaves no file behind.

  Args:
    tree: a state dict or an :class:`EncodedTree`.
    path: the file to write.
    sort_keys: sort dict keys (ignored for an :class:`EncodedTree`).
    exclusive: fail with ``FileExistsError`` if anything exists at ``path``.
    hasher: a ``checkpoint_sidecar.Hasher`` fed the file's bytes as they
      are written.

  Raises:
    NotARegularFileError: something other than a regular file is at
      ``path`` (nothing is written).
    CheckpointWriteError: writing failed (e.g. disk full); the message names
      ``path``, which is removed.
  """
  if not isinstance(tree, EncodedTree):
    tree = encode(tree, sort_keys=sort_keys)
  if storage.local_file(path) is None:
    _upload_file(tree, path, exclusive, hasher)
    return
  fd = _create_file(path, exclusive)
  try:
    _write_segments(tree, functools.partial(_write_all, fd), hasher)
    os.fsync(fd)
  except BaseException as e:
    os.close(fd)
    _remove_quietly(path)
    if isinstance(e, OSError):
      raise CheckpointWriteError(path, e) from e
    raise
  os.close(fd)


def _upload_file(tree: EncodedTree, url: str, exclusive: bool,
                 hasher=None) -> None:
  """:func:`write_file` to an object store (appears when complete)."""
  if exclusive and storage.exists(url):
    raise FileExistsError(errno.EEXIST, 'File exists', url)
  upload = None
  try:
    upload = storage.Upload(url)
    _write_segments(tree, upload.write, hasher)
    upload.commit()
  except BaseException as e:
    if upload is not None:
      try:
        upload.abort()
      except Exception:  # pylint: disable=broad-except
        pass
    if isinstance(e, Exception) and not isinstance(e, errors.GintrainError):
      raise CheckpointWriteError(url, _as_oserror(e)) from e
    raise


def commit_file(tmp_path: str, final_path: str, overwrite: bool) -> None:
  """Renames ``tmp_path`` to ``final_path`` and fsyncs the directory.

  On an object store the rename is a copy and a delete.

  Raises:
    gintrain.lib.errors.AlreadyExistsError: ``final_path`` exists and not
      ``overwrite`` (only reachable when two writers race).
  """
  if storage.local_file(final_path) is None:
    if not overwrite and storage.exists(final_path):
      raise errors.AlreadyExistsError(final_path)
    side = checkpoint_naming.sidecar_path(final_path)
    if storage.exists(side):  # an older file's: it would not match
      storage.remove(side)
    storage.move(tmp_path, final_path)  # a server-side copy, then a delete
    return
  if not overwrite and os.path.lexists(final_path):
    raise errors.AlreadyExistsError(final_path)
  os.replace(tmp_path, final_path)
  fsync_dir(os.path.dirname(final_path))


def make_parent_dirs(path: str) -> None:
  """Creates the directory of ``path`` (durably) if it does not exist.

  For a URL only the store is checked (object stores have no directories;
  uploads create what they need).
  """
  if storage.local_file(path) is None:
    storage.check(path)
    return
  directory = os.path.dirname(path)
  if not directory or os.path.isdir(directory):
    return
  os.makedirs(directory, exist_ok=True)
  fsync_dir(os.path.dirname(os.path.abspath(directory)))


def _write_tmp(tree, final_path: str, tmp_path: str | None,
               sort_keys: bool, tmp_prefix: str, hasher=None) -> str:
  """Writes the temporary file of a save; returns its path.

  ``tmp_path`` None: a new unique name (``.<tmp_prefix>tmp-<token>``),
  created exclusively, retried on the (astronomically rare) collision.
  """
  if tmp_path is not None:
    try:
      write_file(tree, tmp_path, sort_keys, exclusive=True, hasher=hasher)
    except FileExistsError:
      # A stale temporary of this exact name: replace it if it is a file.
      st = os.lstat(tmp_path)
      if not stat.S_ISREG(st.st_mode):
        raise _not_regular(tmp_path, st.st_mode) from None
      os.remove(tmp_path)
      write_file(tree, tmp_path, sort_keys, exclusive=True, hasher=hasher)
    return tmp_path
  dir_path = os.path.dirname(final_path)
  for attempt in range(8):
    tmp_path = checkpoint_naming.new_tmp_path(dir_path, tmp_prefix)
    try:
      write_file(tree, tmp_path, sort_keys, exclusive=True, hasher=hasher)
      return tmp_path
    except FileExistsError:
      if attempt == 7:
        raise
  raise AssertionError('unreachable')


def _write_local_sidecar(final_path: str, hasher, nbytes: int) -> None:
  """Writes (fsynced) or, with no ``hasher``, removes the sidecar."""
  side = checkpoint_naming.sidecar_path(final_path)
  if hasher is None:
    try:
      st = os.lstat(side)
    except FileNotFoundError:
      return
    if stat.S_ISREG(st.st_mode):  # a stale one would not match
      os.remove(side)
    return
  fd = _create_file(side, exclusive=False)
  try:
    _write_all(fd, hasher.text(nbytes))
    os.fsync(fd)
  finally:
    os.close(fd)


def _as_oserror(e: BaseException) -> OSError:
  return e if isinstance(e, OSError) else OSError(
      errno.EIO, f'{type(e).__name__}: {e}')


def _write_url_checkpoint(tree, final_path: str, overwrite: bool,
                          sort_keys: bool) -> None:
  """Uploads a checkpoint to an object store: sidecar, then the file.

  The file appears only when its upload completes (after the sidecar).
  """
  if not isinstance(tree, EncodedTree):
    tree = encode(tree, sort_keys=sort_keys)
  if not overwrite and storage.exists(final_path):
    raise errors.AlreadyExistsError(final_path)
  hasher = (checkpoint_sidecar.Hasher() if integrity_sidecar(final_path)
            else None)
  side = checkpoint_naming.sidecar_path(final_path)
  upload = None
  try:
    upload = storage.Upload(final_path)
    _write_segments(tree, upload.write, hasher)
    if hasher is not None:
      storage.write_bytes(side, hasher.text(tree.nbytes))
    elif storage.exists(side):
      storage.remove(side)
    upload.commit()
  except BaseException as e:
    if upload is not None:
      try:
        upload.abort()
      except Exception:  # pylint: disable=broad-except
        pass
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
      raise
    if isinstance(e, errors.GintrainError):
      raise
    raise CheckpointWriteError(final_path, _as_oserror(e)) from e


def _write_checkpoint(tree, final_path: str, tmp_path: str | None,
                      overwrite: bool, sort_keys: bool,
                      tmp_prefix: str) -> str | None:
  if storage.local_file(final_path) is None:
    _write_url_checkpoint(tree, final_path, overwrite, sort_keys)
    return None
  make_parent_dirs(final_path)
  if not isinstance(tree, EncodedTree):
    tree = encode(tree, sort_keys=sort_keys)
  hasher = (checkpoint_sidecar.Hasher() if integrity_sidecar(final_path)
            else None)
  try:
    tmp_path = _write_tmp(tree, final_path, tmp_path, sort_keys, tmp_prefix,
                          hasher)
  except CheckpointWriteError as e:
    raise CheckpointWriteError(final_path, e.cause, e.path) from e.cause
  try:
    _write_local_sidecar(final_path, hasher, tree.nbytes)
    commit_file(tmp_path, final_path, overwrite)
  except BaseException as e:
    _remove_quietly(tmp_path)
    if isinstance(e, OSError) and not isinstance(e, errors.GintrainError):
      raise CheckpointWriteError(final_path, e, tmp_path) from e
    raise
  return tmp_path


def write_checkpoint_file(tree, final_path: str, tmp_path: str | None,
                          overwrite: bool, sort_keys: bool = False) -> None:
  """Durably writes a checkpoint file: tmp file, fsync, rename, dir fsync.

  After a crash at any moment ``final_path`` is either absent (or its
  previous version) or complete; at worst a stale temporary file remains
  (see ``checkpoint_naming.remove_stale_tmp_files``).

  Args:
    tree: a state dict or an :class:`EncodedTree` (from :func:`encode`).
    final_path: the checkpoint's name.
    tmp_path: where the file is written first (same directory), created
      exclusively (a stale regular file there is replaced). None: a unique
      name of this writer (``checkpoint_naming.new_tmp_path``), which is
      what saves use so that concurrent writers never share a file.
    overwrite: replace an existing ``final_path``.
    sort_keys: sort dict keys (ignored for an :class:`EncodedTree`).

  Raises:
    CheckpointWriteError: writing or committing failed (e.g. the disk is
      full); the message names ``final_path``, the temporary file is
      removed and older checkpoints are untouched.
    NotARegularFileError: ``tmp_path`` is taken by a non-regular file.
    gintrain.lib.errors.AlreadyExistsError: ``final_path`` exists and not
      ``overwrite``.
  """
  _write_checkpoint(tree, final_path, tmp_path, overwrite, sort_keys,
                    os.path.basename(final_path))


def write_and_retain(tree, final_path: str, tmp_path: str | None,
                     base_path: str, keep: int, overwrite: bool,
                     keep_every_n_steps: int | None) -> None:
  """:func:`write_checkpoint_file`, then the retention pass of flax's saves.

  The task both save functions run inline or hand to an ``AsyncManager``.
  ``tmp_path`` None (what they pass) writes through a unique temporary of
  this writer, ``<dir>/.<prefix>tmp-<host>-<pid>-<random>``. Afterwards
  temporaries of crashed writers of this prefix are removed
  (``checkpoint_naming.remove_stale_tmp_files``).
  """
  dir_path, prefix = os.path.split(base_path)
  _write_checkpoint(tree, final_path, tmp_path, overwrite, False, prefix)
  logger.info('Saved checkpoint at %s', final_path)
  checkpoint_naming.remove_invalid_checkpoints(
      final_path, base_path, keep, overwrite, keep_every_n_steps,
      has_mpa=False)
  checkpoint_naming.remove_stale_tmp_files(dir_path, prefix)


# ---------------------------------------------------------------------------
# Decoding.


_Corrupt = msgpack_stream.StreamError


@dataclasses.dataclass(eq=False, slots=True)
class _PendingArray:
  """A large array found while parsing; its data is read from the file.

  Small arrays never get one: they are read at once into their final numpy
  array (see ``_Parser.array``).
  """
  dtype: np.dtype
  shape: tuple
  offset: int
  nbytes: int
  dest: np.ndarray | None = None  # the array (or a flat view) read into
  started: bool = False  # its read was issued (or done) while parsing

  __hash__ = None  # an array is not a valid map key (as in msgpack_restore)


_pread_bytes = msgpack_stream.pread_bytes
_pread_into = msgpack_stream.pread_into


class _Reader:
  """Reads array data into place: inline, or by a thread pool in pieces."""

  def __init__(self, fd: int, pool: concurrent.futures.Executor | None):
    self.fd = fd
    self.pool = pool
    self.futures = []

  def read(self, p: _PendingArray) -> None:
    if p.dest is None:
      p.dest = np.empty(p.shape, p.dtype)
    p.started = True
    view = memoryview(p.dest.reshape(-1).view(np.uint8))
    for start in range(0, p.nbytes, _READ_PIECE_BYTES):
      piece = view[start:start + _READ_PIECE_BYTES]
      if self.pool is None:
        _pread_into(self.fd, piece, p.offset + start)
      else:
        self.futures.append(self.pool.submit(
            _pread_into, self.fd, piece, p.offset + start))

  def wait(self) -> None:
    for future in self.futures:
      future.result()
    self.futures = []


class _Parser(msgpack_stream.Parser):
  """The shared reader (``lib.msgpack_stream``), arrays read into place.

  Arrays up to ``_INLINE_READ_BYTES`` are read at once (read-only); larger
  ones become :class:`_PendingArray` (filled by ``reader``), whose reads
  start as soon as they are parsed, in file order, except for the chunks of
  a chunked array: those are deferred until the whole array can be
  allocated (see :func:`_plan_chunked`). Zero-size arrays of one dtype and
  shape are one shared read-only object.
  """

  def __init__(self, fd: int, size: int, reader: _Reader):
    super().__init__(fd, size, slack=_RESTORE_SLACK)
    self.reader = reader
    self.pending = []
    self.empties = {}  # (dtype, shape) -> the shared zero-size array

  def array(self, dtype, shape, offset, nbytes, defer):
    if nbytes == 0:
      return self._empty(dtype, shape, offset)
    if nbytes <= _INLINE_READ_BYTES:
      return self._load(dtype, shape, offset, nbytes)
    pending = _PendingArray(dtype, shape, offset, nbytes)
    if not defer:
      self.reader.read(pending)
    self.pending.append(pending)
    return pending

  def _empty(self, dtype: np.dtype, shape: tuple, offset: int) -> np.ndarray:
    key = (dtype, shape)
    arr = self.empties.get(key)
    if arr is None:
      try:
        arr = np.empty(shape, dtype)
      except (ValueError, MemoryError) as e:
        raise _Corrupt(f'impossible array shape {shape} at offset {offset}:'
                       f' {e}') from e
      arr.flags.writeable = False
      self.empties[key] = arr
    return arr

  def _load(self, dtype: np.dtype, shape: tuple, offset: int,
            nbytes: int) -> np.ndarray:
    """Reads a small array now (from the window if it holds it)."""
    try:
      arr = np.empty(shape, dtype)
    except (ValueError, MemoryError) as e:
      raise _Corrupt(f'impossible array shape {shape} at offset {offset}:'
                     f' {e}') from e
    view = memoryview(arr.reshape(-1).view(np.uint8))
    off = offset - self.window_start
    if 0 <= off and off + nbytes <= len(self.window):
      view[:] = memoryview(self.window)[off:off + nbytes]
    else:
      _pread_into(self.fd, view, offset)
    arr.flags.writeable = False
    return arr


def _plan_chunked(node) -> np.ndarray | None:
  """Allocates a chunked array whole; its chunks are read into it."""
  try:
    shape = tuple(node['shape'][str(i)] for i in range(len(node['shape'])))
    chunks = [node['chunks'][str(i)] for i in range(len(node['chunks']))]
  except (KeyError, TypeError):
    return None
  if not chunks or not all(
      isinstance(c, (_PendingArray, np.ndarray)) and
      c.dtype == chunks[0].dtype and len(c.shape) == 1 for c in chunks):
    return None
  if not (len(shape) <= _MAX_NDIM and
          all(type(d) is int and 0 <= d < 2**63 for d in shape)):  # pylint: disable=unidiomatic-typecheck
    return None
  size = sum(c.shape[0] for c in chunks)
  if int(np.prod(shape, dtype=object)) != size:
    return None
  try:
    out = np.empty(shape, chunks[0].dtype)
  except (ValueError, MemoryError):
    return None  # left to unchunk_array_leaves_in_place (names the path)
  flat = out.reshape(-1)
  start = 0
  for c in chunks:
    if isinstance(c, np.ndarray):  # small: read while parsing
      flat[start:start + c.shape[0]] = c
    elif c.started:  # not recognised as a chunk while parsing
      flat[start:start + c.shape[0]] = c.dest
    else:
      c.dest = flat[start:start + c.shape[0]]
    start += c.shape[0]
  return out


def _plan_unchunk(node):
  """Like ``unchunk_array_leaves_in_place``, planning reads into one array."""
  if isinstance(node, dict):
    if serialization.CHUNKED_KEY in node:
      out = _plan_chunked(node)
      return node if out is None else out
    for k, v in node.items():
      if isinstance(v, dict):
        node[k] = _plan_unchunk(v)
  return node


def _resolve(node):
  """Replaces every pending array by its numpy array (read-only, as flax)."""
  if isinstance(node, _PendingArray):
    arr = node.dest
    if arr.shape != node.shape:  # a chunk read into a flat array
      arr = arr.reshape(node.shape)
    arr.flags.writeable = False
    return arr
  if isinstance(node, dict):
    for k, v in node.items():
      if isinstance(v, (dict, list, _PendingArray)):
        node[k] = _resolve(v)
  elif isinstance(node, list):
    for i, v in enumerate(node):
      if isinstance(v, (dict, list, _PendingArray)):
        node[i] = _resolve(v)
  return node


def _decode(fd: int, size: int, reader: _Reader):
  parser = _Parser(fd, size, reader)
  state = parser.parse_all()
  state = _plan_unchunk(state)
  for p in parser.pending:
    if not p.started:
      reader.read(p)
  reader.wait()
  state = _resolve(state)
  try:
    return serialization.unchunk_array_leaves_in_place(state)
  except (ValueError, TypeError, KeyError) as e:
    raise _Corrupt(f'bad chunked array: {e}') from e


def read_checkpoint_file(path: str, parallel: bool = True):
  """Reads a msgpack checkpoint file into its state dict.

  The result equals ``lib.serialization.msgpack_restore`` of the file's
  bytes (flax's too): numpy arrays (read-only, except arrays that were
  stored chunked), numpy/Python scalars, nested dicts and lists. Each array
  is allocated once, at its final size, and read straight into.

  Args:
    path: the checkpoint file.
    parallel: read large files with several threads (while the rest of the
      file is being parsed).

  Raises:
    gintrain.lib.errors.CheckpointReadError: the file is truncated, corrupt or not a
      msgpack checkpoint (the message names ``path``).
    NotARegularFileError: ``path`` is a directory
      (:class:`CheckpointIsADirectoryError`, an ``IsADirectoryError``), a
      FIFO, socket or device; checked without opening it, so a FIFO never
      blocks. A symlink to a regular file is followed.
    OSError: the file cannot be opened.
  """
  if storage.local_file(path) is None:
    return _read_url_checkpoint(path, parallel)
  return _read_local(path, parallel, path, _read_local_sidecar(path))


def _read_local_sidecar(path: str) -> bytes | None:
  """The bytes of ``path``'s sidecar, or None if it has none."""
  side = checkpoint_naming.sidecar_path(path)
  try:
    fd = _open_regular(side, os.O_RDONLY, follow=False)
  except FileNotFoundError:
    return None
  except OSError as e:
    raise errors.CheckpointReadError(
        path, f'its integrity sidecar {side} cannot be read: {e}') from e
  try:
    parts, left = [], _SIDECAR_MAX_BYTES + 1
    while left > 0:
      part = os.read(fd, left)
      if not part:
        break
      parts.append(part)
      left -= len(part)
    return b''.join(parts)
  finally:
    os.close(fd)


def read_sidecar(path: str) -> checkpoint_sidecar.Sidecar | None:
  """The parsed sidecar of the local checkpoint file ``path`` (None: it has
  none).

  Raises:
    gintrain.lib.errors.CheckpointReadError: unreadable or malformed.
  """
  data = _read_local_sidecar(path)
  return None if data is None else checkpoint_sidecar.parse(path, data)


def verify_sidecar(path: str) -> bool:
  """Checks the local checkpoint file ``path`` against its sidecar by
  reading it whole; False if it has no sidecar.

  Raises:
    gintrain.lib.errors.CheckpointReadError: it does not match, or the
      sidecar is malformed.
  """
  sidecar = _read_local_sidecar(path)
  if sidecar is None:
    return False
  fd = _open_regular(path, os.O_RDONLY, follow=True)
  try:
    try:
      _verify(fd, os.fstat(fd).st_size, path, sidecar)
    except (_Corrupt, OSError) as e:
      raise errors.CheckpointReadError(path, f'read failed: {e}') from e
  finally:
    os.close(fd)
  return True


def _read_url_checkpoint(url: str, parallel: bool):
  """Downloads ``url`` to a temporary staging file and reads that."""
  fs, fs_path = storage.filesystem(url)
  try:
    info = storage.call(url, fs.info, fs_path)  # store failures: StoreError
  except FileNotFoundError:
    raise FileNotFoundError(errno.ENOENT, 'No such checkpoint', url) from None
  if info.get('type') == 'directory':
    raise CheckpointIsADirectoryError(url)
  try:
    sidecar = storage.read_bytes(checkpoint_naming.sidecar_path(url),
                                 limit=_SIDECAR_MAX_BYTES + 1)
  except FileNotFoundError:
    sidecar = None
  try:
    with storage.staged_download(url) as local:
      return _read_local(local, parallel, url, sidecar)
  except FileNotFoundError:
    raise FileNotFoundError(errno.ENOENT, 'No such checkpoint', url) from None


def _verify(fd: int, size: int, name: str, sidecar: bytes) -> None:
  """Checks the file against its sidecar (size, then the xxh3-64 hashes of
  its blocks, or of the whole file for a version-1 sidecar)."""
  checkpoint_sidecar.verify_file(
      functools.partial(_pread_into, fd), size, name,
      checkpoint_sidecar.parse(name, sidecar))


def _read_local(path: str, parallel: bool, name: str,
                sidecar: bytes | None):
  """Reads the local file ``path``; errors name ``name``."""
  fd = _open_regular(path, os.O_RDONLY, follow=True)
  pool = None
  try:
    st = os.fstat(fd)
    if sidecar is not None:
      try:
        _verify(fd, st.st_size, name, sidecar)
      except _Corrupt as e:
        raise errors.CheckpointReadError(name, str(e)) from e
      except OSError as e:
        raise errors.CheckpointReadError(name, f'read failed: {e}') from e
    if parallel and st.st_size > 2 * _READ_PIECE_BYTES:
      pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS)
    try:
      return _decode(fd, st.st_size, _Reader(fd, pool))
    except _Corrupt as e:
      raise errors.CheckpointReadError(name, str(e)) from e
    except RecursionError as e:
      raise errors.CheckpointReadError(name, 'nesting too deep') from e
    except (ValueError, TypeError, OverflowError, MemoryError) as e:
      # e.g. a shape numpy cannot make: the message must name the file
      raise errors.CheckpointReadError(
          name, f'{type(e).__name__}: {e}') from e
    except OSError as e:
      raise errors.CheckpointReadError(name, f'read failed: {e}') from e
  finally:
    if pool is not None:  # no read may outlive the file descriptor
      pool.shutdown(wait=True, cancel_futures=True)
    os.close(fd)
