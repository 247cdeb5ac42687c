"""Arrays that span processes, stored beside a msgpack checkpoint.

A ``jax.Array`` that is not fully addressable (some of its shards live on
other processes' devices; a replicated array over a multi-process mesh is one
too) cannot go into the single msgpack file that process 0 writes. As in flax,
such a leaf is replaced in the state dict by the string
``MP_ARRAY_PH + subpath`` (``subpath`` = its dict keys joined with ``/``) and
the array itself is written by every process, each its own shards, with jax's
array serialization (tensorstore, zarr) into ``<checkpoint>_gda/<subpath>``.

Commit protocol for a local (or any POSIX) path: arrays are written into
``<prefix>tmp_gda``; once every process finished, process 0 replaces
``<checkpoint>_gda`` by it with a rename. Object stores (``gs://``,
``s3://``) have no atomic rename: arrays go straight to ``<checkpoint>_gda``
and :data:`COMMIT_SUCCESS_FILE` is written there last; a restore without it
raises ``MPARestoreDataCorruptedError``.

Integrity: before the commit every process writes
``<gda>/.gintrain_integrity/process_<i>.json``: for each shard it wrote
(replica 0 of each slice), the slice's box and the xxh3-64 hash of its
values (C order). A restore checks every slice it reads whole against its
hash, and reads whole (and checks) the stored slices it needs only part of,
so a deleted, truncated, swapped or overwritten chunk, or a missing array
metadata file, raises ``CheckpointReadError`` naming the array; a store's
fill value is never returned for a slice that was written.
:func:`verify_arrays` checks a whole checkpoint (each process its share of
the slices, then all agree). Array directories without the integrity folder
(written by flax) restore unchecked.

Example (one process, so nothing is split out)::

  >>> import numpy as np
  >>> split_multiprocess_arrays({'a': np.zeros(2), 'b': {}})
  ({'a': array([0., 0.]), 'b': {}}, [])
"""

import json
import logging
import os
import re
import shutil
import zlib
from typing import Any

import jax
import numpy as np

from gintrain.lib import errors
from gintrain.lib import packed_arrays
from gintrain.lib import save_status
from gintrain.lib import serialization

__all__ = [
    'MP_ARRAY_POSTFIX',
    'MP_ARRAY_PH',
    'COMMIT_SUCCESS_FILE',
    'is_multiprocess_array',
    'is_remote_path',
    'array_dir',
    'split_multiprocess_arrays',
    'prepare_array_dir',
    'save_multiprocess_arrays',
    'commit_array_dir',
    'restore_multiprocess_arrays',
    'read_arrays',
    'verify_arrays',
    'INTEGRITY_DIR',
    'FORMATS',
    'DEFAULT_FORMAT',
    'resolve_format',
]

logger = logging.getLogger(__name__)

# Directory suffix of the arrays of checkpoint ``<path>``: ``<path>_gda``.
MP_ARRAY_POSTFIX = '_gda'
# A split-out array's place in the state dict holds ``MP_ARRAY_PH + subpath``.
MP_ARRAY_PH = '//GDAPlaceholder:'
# Written last into ``<path>_gda`` on object stores (no atomic rename there).
COMMIT_SUCCESS_FILE = 'commit_success.txt'
# Per-process hash manifests inside ``<path>_gda`` (see the module doc).
INTEGRITY_DIR = '.gintrain_integrity'
INTEGRITY_VERSION = 1
# Layouts of ``<path>_gda``: 'zarr' is flax's (one tensorstore zarr array
# per array, chunk files per slice; flax reads it), 'packed' is
# lib.packed_arrays (two files per process; objects on object stores).
FORMATS = ('zarr', 'packed')
DEFAULT_FORMAT = 'zarr'
# Bytes of slices read at once when checking hashes.
_VERIFY_BYTES_IN_FLIGHT = 256 << 20

_REMOTE_RE = re.compile(r'^(gs|s3)://', re.I)


def is_multiprocess_array(value: Any) -> bool:
  """True for a ``jax.Array`` some of whose shards belong to other processes."""
  return isinstance(value, jax.Array) and not value.is_fully_addressable


def is_remote_path(path: str) -> bool:
  """True for object-store paths (``gs://``, ``s3://``): no atomic rename."""
  return bool(_REMOTE_RE.match(path))


def array_dir(ckpt_path: str) -> str:
  """The directory holding the arrays of checkpoint ``ckpt_path``."""
  return ckpt_path + MP_ARRAY_POSTFIX


def _check_subpath(subpath: str, what: str) -> str:
  parts = subpath.split('/')
  if subpath and any(p in ('', '.', '..') for p in parts):
    raise ValueError(
        f'{what}: the array key path "{subpath}" has an empty, "." or ".."'
        ' component, so it cannot name a directory under the checkpoint\'s'
        f' {MP_ARRAY_POSTFIX} folder. Rename the dict key.')
  return subpath


def split_multiprocess_arrays(state_dict: Any) -> tuple[Any, list]:
  """Replaces every multi-process array by a placeholder string.

  Args:
    state_dict: a state dict (nested dicts, from
      ``lib.serialization.to_state_dict``) or a bare leaf. Only dicts are
      walked (as flax does); empty dicts are kept.

  Returns:
    ``(state, arrays)``: a copy of the dict structure with each
    non-fully-addressable ``jax.Array`` replaced by ``MP_ARRAY_PH + subpath``,
    and the list of ``(subpath, array)`` pairs in walk order. A bare
    multi-process leaf becomes ``MP_ARRAY_PH`` with subpath ``''``.

  Raises:
    ValueError: a key path of a split-out array cannot name a directory.
  """
  arrays = []

  def walk(node, keys):
    if isinstance(node, dict):
      return {k: walk(v, keys + (str(k),)) for k, v in node.items()}
    if is_multiprocess_array(node):
      subpath = _check_subpath('/'.join(keys), 'Cannot save')
      arrays.append((subpath, node))
      return MP_ARRAY_PH + subpath
    return node

  return walk(state_dict, ()), arrays


def _array_path(directory: str, subpath: str) -> str:
  return os.path.join(directory, subpath) if subpath else directory


def _array_serialization():
  """jax.experimental.array_serialization.serialization (loads tensorstore)."""
  from jax.experimental.array_serialization import serialization  # pylint: disable=g-import-not-at-top
  return serialization


def _array_spec(path: str) -> dict:
  """jax's tensorstore spec for the array at ``path``; on object stores with
  the kvstore of ``lib.storage`` (endpoint, region and credentials from the
  store's usual environment variables, which tensorstore ignores)."""
  ser = _array_serialization()
  spec = ser.get_tensorstore_spec(path)
  if is_remote_path(path):
    from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
    kvstore = storage.tensorstore_kvstore_spec(path)
    kvstore['path'] = kvstore.get('path', '').rstrip('/')
    spec['kvstore'] = kvstore
  return spec


def _kvstore(directory: str):
  """A tensorstore key-value store rooted at ``directory`` (any driver)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = dict(_array_spec(directory)['kvstore'])
  spec['path'] = spec.get('path', '').rstrip('/') + '/'
  return ts.KvStore.open(spec).result()


def _has_commit_file(directory: str) -> bool:
  result = _kvstore(directory).read(COMMIT_SUCCESS_FILE).result()
  return result.state == 'value'


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


# -- integrity -------------------------------------------------------------


def _digest(data) -> str:
  """xxh3-64 of an array's values in C order (any dtype, bfloat16 too)."""
  import xxhash  # pylint: disable=g-import-not-at-top
  flat = np.ascontiguousarray(data).reshape(-1)
  return xxhash.xxh3_64_hexdigest(flat.view(np.uint8))


def _box(index, shape) -> tuple:
  """A shard's index (tuple of slices) as ``((start, stop), ...)``."""
  return tuple(tuple(sl.indices(n)[:2]) for sl, n in zip(index, shape))


def _box_str(box) -> str:
  return '[' + ', '.join(f'{a}:{b}' for a, b in box) + ']'


def _manifest_key(process: int) -> str:
  return f'{INTEGRITY_DIR}/process_{process}.json'


def shard_manifest(arrays: list) -> dict:
  """This process's integrity record of ``arrays`` (``(subpath, array)``):
  the box and hash of every shard it writes (replica 0 of each slice)."""
  out = {}
  for subpath, arr in arrays:
    chunks = []
    for shard in arr.addressable_shards:
      if shard.replica_id != 0:
        continue
      chunks.append({'box': [list(b) for b in _box(shard.index, arr.shape)],
                     'xxh3': _digest(np.asarray(shard.data))})
    out[subpath] = {'shape': list(arr.shape), 'dtype': str(arr.dtype),
                    'chunks': chunks}
  return {'version': INTEGRITY_VERSION, 'process': jax.process_index(),
          'process_count': jax.process_count(), 'arrays': out}


def _write_manifest(directory: str, manifest: dict) -> None:
  data = json.dumps(manifest, sort_keys=True).encode()
  key = _manifest_key(manifest['process'])
  if is_remote_path(directory):
    _kvstore(directory).write(key, data).result()
    return
  path = os.path.join(directory, key)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)


def _corrupt(path: str, reason: str) -> errors.CheckpointReadError:
  reason = re.sub(r'\s*\[tensorstore_spec=.*', '', ' '.join(
      str(reason).split()))  # tensorstore appends its whole spec
  return errors.CheckpointReadError(path, reason[:400])


def _read_manifest_bytes(directory: str, process: int) -> bytes | None:
  if is_remote_path(directory):
    result = _kvstore(directory).read(_manifest_key(process)).result()
    return bytes(result.value) if result.state == 'value' else None
  try:
    with open(os.path.join(directory, _manifest_key(process)), 'rb') as f:
      return f.read()
  except FileNotFoundError:
    return None


def _has_integrity_dir(directory: str) -> bool:
  if is_remote_path(directory):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    prefix = (INTEGRITY_DIR + '/').encode()
    keys = _kvstore(directory).list(ts.KvStore.KeyRange(
        inclusive_min=prefix, exclusive_max=prefix[:-1] + b'0')).result()
    return bool(keys)
  return os.path.isdir(os.path.join(directory, INTEGRITY_DIR))


def load_manifests(directory: str) -> tuple[dict | None, int]:
  """``(merged manifest, checksum of its bytes)`` of the array directory
  ``directory``; ``(None, 0)`` for one without integrity data (flax's).

  The merged manifest maps each array subpath to ``{'shape', 'dtype',
  'chunks': [(box, xxh3), ...]}`` over all writing processes.

  Raises:
    gintrain.lib.errors.CheckpointReadError: a process's manifest is
      missing, unreadable or inconsistent.
  """
  if packed_arrays.is_packed(directory):
    return packed_arrays.load_index(directory)
  first = _read_manifest_bytes(directory, 0)
  if first is None:
    if _has_integrity_dir(directory):
      raise _corrupt(os.path.join(directory, INTEGRITY_DIR),
                     f'{_manifest_key(0)} is missing')
    return None, 0
  blobs = [first]
  merged = {}
  count = None
  crc = 0
  process = 0
  while True:
    name = os.path.join(directory, _manifest_key(process))
    data = blobs[process]
    crc = zlib.crc32(data, crc)
    try:
      manifest = json.loads(data)
      if (manifest['version'] != INTEGRITY_VERSION or
          manifest['process'] != process):
        raise ValueError('wrong version or process number')
      if count is None:
        count = int(manifest['process_count'])
      elif manifest['process_count'] != count:
        raise ValueError('the process count differs from process 0\'s')
      for subpath, info in manifest['arrays'].items():
        entry = merged.setdefault(subpath, {
            'shape': tuple(info['shape']), 'dtype': info['dtype'],
            'chunks': []})
        if (entry['shape'] != tuple(info['shape']) or
            entry['dtype'] != info['dtype']):
          raise ValueError(f'array "{subpath}" has another shape or dtype'
                           ' than in process 0\'s manifest')
        entry['chunks'] += [(tuple(tuple(int(x) for x in b)
                                   for b in c['box']), str(c['xxh3']))
                            for c in info['chunks']]
    except (ValueError, KeyError, TypeError) as e:
      raise _corrupt(name, f'bad integrity manifest ({e})') from None
    process += 1
    if process >= count:
      break
    data = _read_manifest_bytes(directory, process)
    if data is None:
      raise _corrupt(os.path.join(directory, _manifest_key(process)),
                     f'the integrity manifest of process {process} of'
                     f' {count} is missing')
    blobs.append(data)
  return merged, crc


def _array_info(merged: dict | None, subpath: str, path: str):
  """The manifest entry of ``subpath``, checked to cover its whole array."""
  if merged is None:
    return None
  info = merged.get(subpath)
  if info is None:
    raise _corrupt(path, 'the array has no entry in the integrity manifests')
  volume = sum(int(np.prod([b - a for a, b in box]))
               for box, _ in info['chunks'])
  if volume != int(np.prod(info['shape'])):
    raise _corrupt(path, f'the integrity manifests cover {volume} of the'
                   f' {int(np.prod(info["shape"]))} elements of the array')
  return info


def _check_store(store, info, path) -> None:
  if info is None:
    return
  if (tuple(store.shape) != tuple(info['shape']) or
      str(np.dtype(store.dtype.numpy_dtype)) != info['dtype']):
    raise _corrupt(path, f'its metadata says {tuple(store.shape)}'
                   f' {store.dtype.numpy_dtype}, the checkpoint wrote'
                   f' {tuple(info["shape"])} {info["dtype"]}')


def _open_stores(paths: list, infos: list) -> list:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  futures = [ts.open(_read_spec(p), open=True) for p in paths]
  stores = []
  for path, info, future in zip(paths, infos, futures):
    try:
      store = future.result()
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupt(path, f'cannot open the array: {e}') from None
    _check_store(store, info, path)
    stores.append(store)
  return stores


def _result(future, path, box):
  try:
    return future.result()
  except Exception as e:  # pylint: disable=broad-except
    raise _corrupt(path, f'cannot read slice {_box_str(box)}: {e}') from None


def _compare(data, digest, path, box) -> None:
  got = _digest(data)
  if got != digest:
    raise _corrupt(path, f'slice {_box_str(box)} does not match its hash'
                   f' (xxh3 {got}, written {digest}): a chunk file is'
                   ' missing, swapped or damaged')


def _check_chunks(items: list) -> None:
  """Reads each ``(store, path, box, digest)`` whole and checks its hash,
  at most ``_VERIFY_BYTES_IN_FLIGHT`` bytes in flight."""
  pending, in_flight = [], 0
  for store, path, box, digest in items:
    index = tuple(slice(a, b) for a, b in box)
    pending.append((store[index].read(), path, box, digest))
    in_flight += int(np.prod([b - a for a, b in box])) * store.dtype.numpy_dtype.itemsize
    if in_flight >= _VERIFY_BYTES_IN_FLIGHT:
      for future, p, b, d in pending:
        _compare(_result(future, p, b), d, p, b)
      pending, in_flight = [], 0
  for future, p, b, d in pending:
    _compare(_result(future, p, b), d, p, b)


# (array directory, manifest checksum) that every process verified whole.
_VERIFIED: set = set()


def _agree_on_error(ckpt_path: str, paths: list,
                    error: Exception | None) -> None:
  """Every process raises if any process found the arrays corrupt."""
  if jax.process_count() > 1:
    index = -1
    if error is not None:
      where = getattr(error, 'path', None)
      index = paths.index(where) if where in paths else len(paths)
    mine = np.array([zlib.crc32(ckpt_path.encode()) & 0x7fffffff,
                     error is not None, index], np.int32)
    everyone = save_status.allgather(mine)  # no program to compile
    if (everyone[:, 0] != mine[0]).any():
      raise _corrupt(array_dir(ckpt_path), 'the processes checked different'
                     ' checkpoints at once')
    failed = np.flatnonzero(everyone[:, 1]).tolist()
    if error is None and failed:
      where = int(everyone[failed[0], 2])
      name = paths[where] if 0 <= where < len(paths) else array_dir(
          ckpt_path)
      raise _corrupt(name, f'it failed its integrity check on process(es)'
                     f' {failed} (their log names the slice)')
  if error is not None:
    raise error


def verify_arrays(ckpt_path: str, state_dict: Any, step=None) -> None:
  """Checks the arrays of checkpoint ``ckpt_path`` against their hashes.

  Every process must call it with the same arguments: each reads and
  checks a share of the stored slices (all of them in one process), then
  the processes agree, so all raise or none does. Array directories without
  integrity data (written by flax) only get their metadata checked.

  Args:
    ckpt_path: the checkpoint file.
    state_dict: its decoded tree (placeholders name the arrays).
    step: unused; for symmetry with the restore functions.

  Raises:
    gintrain.lib.errors.CheckpointReadError (a ``ValueError``): an array is
      missing, was never committed, or a slice does not match its hash; the
      message names the array.
  """
  del step
  subpaths = sorted({v[len(MP_ARRAY_PH):] for v in _flatten(state_dict)
                     .values() if _is_placeholder(v)})
  if not subpaths:
    return
  directory = array_dir(ckpt_path)
  error = None
  key = None
  paths = [_array_path(directory, s) for s in subpaths]
  try:
    for s in subpaths:
      _check_subpath(s, f'Cannot restore {ckpt_path}')
    try:
      _check_committed(ckpt_path, paths, None)
    except errors.MPARestoreDataCorruptedError:
      raise _corrupt(directory, 'the sharded array data is missing or was'
                     ' never committed') from None
    merged, crc = load_manifests(directory)
    key = (directory, crc)
    infos = [_array_info(merged, subpath, path)
             for subpath, path in zip(subpaths, paths)]
    items = [(i, box, digest) for i, info in enumerate(infos) if info
             for box, digest in info['chunks']]
    share = items[jax.process_index()::jax.process_count()]
    if merged is not None and infos and 'where' in infos[0]:
      packed_arrays.check_slices(directory, merged, [
          (subpaths[i], paths[i], box) for i, box, _ in share])
      share = []
    needed = (sorted({i for i, _, _ in share}) if merged is not None
              else list(range(len(subpaths))))
    opened = _open_stores([paths[i] for i in needed],
                          [infos[i] for i in needed])
    stores = dict(zip(needed, opened))
    _check_chunks([(stores[i], paths[i], box, digest)
                   for i, box, digest in share])
  except Exception as e:  # pylint: disable=broad-except
    error = e if isinstance(e, errors.CheckpointReadError) else _corrupt(
        directory, f'cannot check the sharded arrays: {e}')
  _agree_on_error(ckpt_path, paths, error)
  if key is not None:
    _VERIFIED.add(key)


def resolve_format(array_format: str | None, path: str) -> str:
  """The layout a save of checkpoint ``path`` writes: ``array_format`` (None:
  :data:`DEFAULT_FORMAT`), on local paths and object stores alike.

  Raises:
    ValueError: an unknown format.
  """
  array_format = DEFAULT_FORMAT if array_format is None else array_format
  if array_format not in FORMATS:
    raise ValueError(f'array_format={array_format!r}: expected one of'
                     f' {", ".join(FORMATS)}.')
  del path  # both layouts work locally and on object stores
  return array_format


def prepare_array_dir(tmp_path: str, final_path: str, subpaths,
                      array_format: str | None = None) -> None:
  """Process 0, before any process writes: a clean directory to write into.

  Local paths: removes a stale ``<tmp>_gda`` left by an interrupted save and
  creates ``<tmp>_gda`` (and ``<tmp>_gda/<subpath>`` for each array in the
  zarr layout). Object stores: deletes everything under ``<final>_gda`` (a
  commit file of an earlier save there must not vouch for this one).
  """
  if is_remote_path(final_path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    _kvstore(array_dir(final_path)).delete_range(ts.KvStore.KeyRange()).result()
    return
  tmp_dir = array_dir(tmp_path)
  if os.path.exists(tmp_dir):
    logger.info('Removing outdated multi-process array files at %s', tmp_dir)
    shutil.rmtree(tmp_dir)
  os.makedirs(tmp_dir, exist_ok=True)
  if resolve_format(array_format, final_path) == 'packed':
    os.makedirs(os.path.join(tmp_dir, packed_arrays.PACKED_DIR))
    return
  for subpath in subpaths:
    os.makedirs(_array_path(tmp_dir, subpath), exist_ok=True)


_WRITER = None  # one background thread for packed writes


def _writer():
  global _WRITER
  if _WRITER is None:
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    _WRITER = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='gintrain-packed-writer')
  return _WRITER


def save_multiprocess_arrays(gda_manager, arrays: list, tmp_path: str,
                             final_path: str, on_commit,
                             array_format: str | None = None,
                             host_memory_budget: int | None = None,
                             buffers_stay_valid: bool = False,
                             wait_also=()) -> None:
  """Starts writing ``arrays`` (``(subpath, jax.Array)`` pairs); all processes.

  Every process writes its own shards through ``gda_manager`` (a
  ``jax.experimental.array_serialization.serialization
  .GlobalAsyncCheckpointManager``) into ``<tmp>_gda`` (``<final>_gda`` on
  object stores). jax calls ``on_commit`` on process 0 once every process
  finished; ``gda_manager.wait_until_finished()`` waits for that and raises
  its errors.

  In the packed layout (``array_format='packed'``) the slices this process
  writes are copied to the host before returning (the caller may then
  change or donate the device buffers) and written by a background thread;
  ``gda_manager`` only runs the barrier and ``on_commit``. If those copies
  would exceed ``host_memory_budget`` bytes (None: no bound), the slices are
  instead written before returning, brought to the host one at a time.
  With ``buffers_stay_valid`` (the caller neither deletes nor donates the
  arrays until the save is complete) nothing is copied before returning:
  the background writer brings each slice to the host as it writes it
  (host memory: two slices). A write that fails (e.g. a full disk) raises
  ``checkpoint_io.CheckpointWriteError`` naming the checkpoint, from
  ``gda_manager.wait_until_finished()`` / ``check_for_errors()``, on every
  process (``lib.save_status``: the others' with the failed process's
  reason), not only on the one that failed. ``wait_also``: futures (packed
  layout: process 0's main-file write) whose failure fails this process's
  part the same way.
  """
  target_dir = array_dir(final_path if is_remote_path(final_path) else tmp_path)
  if resolve_format(array_format, final_path) == 'packed':
    _save_packed(gda_manager, arrays, target_dir, on_commit,
                 host_memory_budget, buffers_stay_valid, final_path,
                 wait_also)
    return
  # The hashes of this process's shards go in before its data and before
  # the commit (which checks every process's manifest is there).
  _write_manifest(target_dir, shard_manifest(arrays))
  specs = [_array_spec(_array_path(target_dir, subpath))
           for subpath, _ in arrays]
  gda_manager.serialize([arr for _, arr in arrays], specs,
                        on_commit_callback=on_commit)


def _save_packed(gda_manager, arrays, target_dir, on_commit,
                 host_memory_budget=None, buffers_stay_valid=False,
                 final_path=None, wait_also=()) -> None:
  gda_manager.wait_until_finished()  # the previous save, as serialize does
  background = (hasattr(gda_manager, '_add_futures') and
                hasattr(gda_manager, '_start_async_commit'))
  copy = background and not buffers_stay_valid
  if copy and host_memory_budget is not None and (
      packed_arrays.snapshot_bytes(arrays) > host_memory_budget):
    background = copy = False  # no copies: written now, one slice at a time
  snap = packed_arrays.snapshot(arrays, copy=copy)
  del arrays
  # Every process learns whether another failed its part (jax's barrier
  # alone would leave them waiting for its timeout).
  status = save_status.start(final_path or target_dir,
                             getattr(gda_manager, '_timeout_secs', 300))

  def write():
    from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top
    try:
      try:
        nbytes = packed_arrays.write_process_files(
            target_dir, snap, jax.process_index(), jax.process_count())
        for future in wait_also:  # process 0's main file
          future.result()
      except checkpoint_io.CheckpointWriteError:
        raise
      except OSError as e:
        raise checkpoint_io.CheckpointWriteError(
            final_path or target_dir, e, target_dir) from e
      finally:
        snap.clear()  # the host copies (or device arrays) go now
    except BaseException as e:
      if status is not None:
        status.publish(e)
      raise
    if status is not None:
      status.publish(None)
      status.wait_others()
    return nbytes
  if not background:  # a jax without the hooks: write, then commit
    write()
    gda_manager.serialize([], [], on_commit_callback=on_commit)
    return
  # jax's commit thread waits for our write as it would for tensorstore's,
  # then meets the other processes at its barrier and runs on_commit.
  future = _writer().submit(write)
  gda_manager._add_futures([future])  # pylint: disable=protected-access
  gda_manager._start_async_commit(on_commit)  # pylint: disable=protected-access

  def forget_commit(done):
    # jax's wait_until_finished() would otherwise wait (for its timeout)
    # for the commit key of this failed save, once its error was raised.
    if done.exception() is not None:
      gda_manager._count = None  # pylint: disable=protected-access
  future.add_done_callback(forget_commit)


def commit_array_dir(tmp_path: str, final_path: str) -> None:
  """Process 0, after every process finished writing: publish the arrays.

  Local: ``<final>_gda`` (if any, e.g. from an interrupted commit or an
  overwrite) is replaced by ``<tmp>_gda`` with a rename, and the parent
  directory is fsynced. Object stores: writes :data:`COMMIT_SUCCESS_FILE`.
  """
  final_dir = array_dir(final_path)
  written = final_dir if is_remote_path(final_path) else array_dir(tmp_path)
  load_manifests(written)  # every process's hashes are there, or raise
  if is_remote_path(final_path):
    _kvstore(final_dir).write(
        COMMIT_SUCCESS_FILE,
        f'Checkpoint commit was successful to {final_dir}'.encode()).result()
    return
  if os.path.exists(final_dir):
    logger.info('Removing outdated checkpoint arrays at %s', final_dir)
    shutil.rmtree(final_dir)
  os.rename(array_dir(tmp_path), final_dir)
  _fsync_dir(os.path.dirname(final_dir) or '.')


def _flatten(tree: Any, keys: tuple = ()) -> dict:
  """Nested dicts -> {key tuple: leaf}; empty dicts kept as leaves."""
  if isinstance(tree, dict) and tree:
    flat = {}
    for k, v in tree.items():
      flat.update(_flatten(v, keys + (k,)))
    return flat
  return {keys: tree}


def _is_placeholder(value: Any) -> bool:
  return isinstance(value, str) and value.startswith(MP_ARRAY_PH)


def _read_spec(path: str) -> dict:
  spec = _array_spec(path)
  if not is_remote_path(path) and os.path.exists(
      os.path.join(path, 'zarr.json')):
    spec['driver'] = 'zarr3'
  return spec


def _replace_leaves(tree: Any, new: dict, keys: tuple = ()) -> Any:
  if keys in new:
    return new[keys]
  if isinstance(tree, dict):
    return {k: _replace_leaves(v, new, keys + (k,)) for k, v in tree.items()}
  return tree


def _check_committed(ckpt_path: str, paths, step) -> None:
  if is_remote_path(ckpt_path):
    if not _has_commit_file(array_dir(ckpt_path)):
      raise errors.MPARestoreDataCorruptedError(step, ckpt_path)
  elif not packed_arrays.is_packed(array_dir(ckpt_path)):
    for path in paths:
      if not os.path.isdir(path):
        raise errors.MPARestoreDataCorruptedError(step, ckpt_path)


def _placeholder_path(ckpt_path: str, value: str) -> str:
  subpath = _check_subpath(value[len(MP_ARRAY_PH):],
                           f'Cannot restore {ckpt_path}')
  return _array_path(array_dir(ckpt_path), subpath)


def read_arrays(state_dict: Any, ckpt_path: str, shardings: Any,
                step=None) -> Any:
  """Puts the arrays of ``<ckpt_path>_gda`` in place of their placeholders,
  each read straight into the sharding given for it.

  Unlike :func:`restore_multiprocess_arrays`, the shardings may be any
  (fully addressable ones included), so a checkpoint written by N
  processes restores onto another mesh, process count or device count;
  each process reads only the slices its devices hold.

  Args:
    state_dict: the decoded msgpack state dict.
    ckpt_path: the checkpoint file's path.
    shardings: a tree with the dict structure of ``state_dict`` (e.g.
      ``to_state_dict`` of a tree of ``jax.sharding.Sharding``) whose leaf
      at each placeholder's key path is the sharding to read into.
    step: for error messages.

  Raises:
    gintrain.lib.errors.MPARestoreTargetRequiredError: a placeholder with no
      sharding at its key path.
    gintrain.lib.errors.MPARestoreDataCorruptedError: array data missing
      (or never committed, on object stores).
    gintrain.lib.errors.CheckpointReadError: a slice read does not match
      its hash, or an array's metadata or integrity manifest is damaged.
  """
  flat = _flatten(state_dict)
  placeholders = {k: v for k, v in flat.items() if _is_placeholder(v)}
  if not placeholders:
    return state_dict
  flat_shardings = _flatten(shardings)
  wanted = []
  for key, value in placeholders.items():
    sharding = flat_shardings.get(key)
    if not isinstance(sharding, jax.sharding.Sharding):
      raise errors.MPARestoreTargetRequiredError(
          ckpt_path, step, '/'.join(map(str, key)) or None)
    wanted.append((key, sharding, _placeholder_path(ckpt_path, value)))
  arrays = _read_checked(ckpt_path, wanted, step)
  return _replace_leaves(state_dict, {
      key: arr for (key, _, _), arr in zip(wanted, arrays)})


def _read_checked(ckpt_path: str, wanted: list, step) -> list:
  """The arrays of ``wanted`` (``(key, sharding, path)``), read and checked
  against the checkpoint's integrity manifests (if it has them)."""
  paths = [p for _, _, p in wanted]
  arrays, error = None, None
  try:
    _check_committed(ckpt_path, paths, step)
    directory = array_dir(ckpt_path)
    merged, crc = load_manifests(directory)
    prefix = directory.rstrip('/') + '/'
    subpaths = [p[len(prefix):] if p.startswith(prefix) else ''
                for p in paths]
    infos = [_array_info(merged, sp, p) for sp, p in zip(subpaths, paths)]
    if merged is not None and infos and 'where' in infos[0]:
      arrays = packed_arrays.read_arrays(directory, merged, [
          (sp, p, s) for sp, p, (_, s, _) in zip(subpaths, paths, wanted)])
    else:
      arrays = _read_into([s for _, s, _ in wanted], paths, infos,
                          verified=(directory, crc) in _VERIFIED)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  # A slice is checked by the process that reads it: all raise, or none.
  _agree_on_error(ckpt_path, paths, error)
  return arrays


def _read_into(shardings, paths, infos, verified=False) -> list:
  """The arrays stored at ``paths``, each placed with its sharding; every
  process reads only its devices' slices, all reads in flight at once.

  With integrity data (``infos``, from :func:`_array_info`), a slice read
  that is a whole stored slice is checked against its hash; stored slices
  read only in part are read whole and checked too, unless ``verified``
  (:func:`verify_arrays` checked them all already).

  Written here rather than through jax's ``run_deserialization``, which
  copies every slice once more on the host (an ``astype``): measured at
  about half of a 1 GiB restore on 2 processes.
  """
  stores = _open_stores(paths, infos)
  pending = []  # (array index, device, box, read future, stored inside)
  partial = {}  # (array index, stored box) -> digest: read only in part
  for i, (sharding, store) in enumerate(zip(shardings, stores)):
    shape = tuple(store.shape)
    chunks = infos[i]['chunks'] if infos[i] else ()
    for device, index in sharding.addressable_devices_indices_map(
        shape).items():
      box = _box(index, shape)
      inside = []  # stored slices within this read: checked from its data
      for stored, digest in chunks:
        if not all(a < d and c < b for (a, b), (c, d) in zip(box, stored)):
          continue  # no overlap
        if all(a <= c and d <= b for (a, b), (c, d) in zip(box, stored)):
          inside.append((stored, digest))
        elif not verified:
          partial[(i, stored)] = digest
      pending.append((i, device, box, store[index].read(), inside))
  per_array = [[] for _ in stores]
  checked = set()
  for i, device, box, future, inside in pending:
    data = _result(future, paths[i], box)
    for stored, digest in inside:
      if (i, stored) not in checked:
        part = tuple(slice(c - a, d - a) for (a, _), (c, d) in zip(box, stored))
        _compare(data[part], digest, paths[i], stored)
        checked.add((i, stored))
    per_array[i].append(jax.device_put(data, device))
  _check_chunks([(stores[i], paths[i], box, digest)
                 for (i, box), digest in partial.items()
                 if (i, box) not in checked])
  return [jax.make_array_from_single_device_arrays(
      tuple(store.shape), sharding, shards)
          for store, sharding, shards in zip(stores, shardings, per_array)]


def restore_multiprocess_arrays(state_dict: Any, target: Any, ckpt_path: str,
                                step, gda_manager,
                                allow_partial: bool = False) -> Any:
  """Puts the arrays of ``<ckpt_path>_gda`` in place of their placeholders.

  Each placeholder is matched with the leaf at the same dict key path of
  ``to_state_dict(target)``; that leaf must be a multi-process
  ``jax.Array``, whose sharding the restored array gets. Runs on every
  process (each reads its own shards). A state dict without placeholders is
  returned as is, whatever the other arguments.

  Args:
    state_dict: the decoded msgpack state dict (or a bare leaf).
    target: the object being restored into, or None.
    ckpt_path: the checkpoint file's path (arrays live in
      ``<ckpt_path>_gda``).
    step: the requested step, only for error messages.
    gda_manager: a ``GlobalAsyncCheckpointManager``; its pending save is
      waited for first.
    allow_partial: skip (with a logged warning) placeholders without a
      suitable target leaf instead of raising; they stay placeholder strings.

  Raises:
    gintrain.lib.errors.MPACheckpointingRequiredError: placeholders but no
      ``gda_manager``.
    gintrain.lib.errors.MPARestoreTargetRequiredError: a placeholder without a
      multi-process array at its place in ``target`` (and not
      ``allow_partial``).
    gintrain.lib.errors.MPARestoreDataCorruptedError: the array data is missing, or on
      an object store was never committed.
    gintrain.lib.errors.CheckpointReadError: a slice read does not match
      its hash, or an array's metadata or integrity manifest is damaged.
  """
  flat = _flatten(state_dict)
  placeholders = {k: v for k, v in flat.items() if _is_placeholder(v)}
  if not placeholders:
    return state_dict
  if gda_manager is None:
    raise errors.MPACheckpointingRequiredError(ckpt_path, step)
  flat_target = {}
  if target is not None:
    flat_target = _flatten(serialization.to_state_dict(target))
  wanted = []  # (key, sharding, array path)
  for key, value in placeholders.items():
    leaf = flat_target.get(key)
    if not is_multiprocess_array(leaf):
      name = '/'.join(map(str, key))
      if not allow_partial:
        raise errors.MPARestoreTargetRequiredError(ckpt_path, step,
                                                   name or None)
      logger.warning(
          'Multi-process array "%s" of %s is not restored: the target has no'
          ' multi-process jax.Array there'
          ' (allow_partial_mpa_restoration=True).',
          name, ckpt_path)
      continue
    wanted.append((key, leaf.sharding, _placeholder_path(ckpt_path, value)))
  if not wanted:
    return state_dict
  gda_manager.wait_until_finished()
  arrays = _read_checked(ckpt_path, wanted, step)
  return _replace_leaves(state_dict, {
      key: arr for (key, _, _), arr in zip(wanted, arrays)})
