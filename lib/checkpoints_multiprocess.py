"""``save_checkpoint_multiprocess``: one checkpoint written by many processes.

Every process calls it with the same arguments (SPMD). Process 0 writes the
msgpack file (the bytes of flax's ``save_checkpoint_multiprocess``: dict keys
sorted) and prunes old checkpoints; ``jax.Array`` leaves that are not fully
addressable are written by every process, each its own shards, into the
``<checkpoint>_gda`` directory beside it (see ``lib.multiprocess_arrays``).
``lib.checkpoints.restore_checkpoint`` reads both back.

In a single process with ordinary arrays it behaves like ``save_checkpoint``
except for the key order on disk::

  >>> import tempfile, numpy as np
  >>> from gintrain.lib.checkpoints import restore_checkpoint
  >>> d = tempfile.mkdtemp()
  >>> save_checkpoint_multiprocess(d, {'b': 1, 'a': np.ones(2)}, 3)[len(d):]
  '/checkpoint_3'
  >>> restore_checkpoint(d, None)
  {'a': array([1., 1.]), 'b': 1}

Commit order with multi-process arrays: process 0 picks a unique temporary
name ``<tmp>`` = ``.<prefix>tmp-<host>-<pid>-<random>`` and broadcasts it,
then writes ``<tmp>`` (created exclusively, fsynced); every process writes
its shards into ``<tmp>_gda``; once all finished (jax's
``GlobalAsyncCheckpointManager`` barrier) process 0 renames ``<tmp>_gda`` ->
``<checkpoint>_gda``, then ``<tmp>`` -> ``<checkpoint>``, then prunes and
removes temporaries of crashed writers. A crash at any point leaves the previous
checkpoint intact; the newest checkpoint *file* always has its arrays.

All processes take the same decisions: a failure on one process (the
overwrite check, serializing the tree on process 0, writing the file, the
previous asynchronous save) makes every process raise, instead of leaving
the others waiting at the next barrier.
"""

import functools
import logging
import os
import warnings
import zlib
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import errors
from gintrain.lib import msgpack_slices
from gintrain.lib import multiprocess_arrays
from gintrain.lib import save_status
from gintrain.lib import serialization
from gintrain.lib import storage

__all__ = ['save_checkpoint_multiprocess', 'restore_checkpoint',
           'checkpoint_files']

logger = logging.getLogger(__name__)

# How long the other processes wait for process 0's background write of a
# checkpoint without sharded arrays (jax's commit barrier's default).
_STATUS_TIMEOUT_S = 600


def _barrier(name: str) -> None:
  """A barrier over all processes (flax's names); no-op in one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _agree(name: str, error: BaseException | None, share: str = ''
           ) -> str:
  """A barrier at which every process learns whether any process failed.

  Raises ``error`` on the process that had it, and on every other process a
  ``lib.errors.GintrainError`` naming the failed processes. The barrier's
  name is checked to be the same everywhere, as ``sync_global_devices``
  does. Returns process 0's ``share`` (ASCII, at most 64 characters).
  """
  if jax.process_count() > 1:
    name_hash = zlib.crc32(name.encode()) & 0x7fffffff
    data = np.frombuffer(share.encode('ascii').ljust(64, b'\0'), np.uint8)
    mine = np.concatenate([[name_hash, error is not None],
                           data.astype(np.int32)]).astype(np.int32)
    everyone = save_status.allgather(mine)  # no program to compile
    if (everyone[:, 0] != mine[0]).any():
      raise AssertionError(
          f'Processes reached different barriers at {name!r}.')
    failed = np.flatnonzero(everyone[:, 1]).tolist()
    if error is None and failed:
      raise errors.GintrainError(
          f'Checkpoint save aborted at {name!r}: process(es) {failed} failed.',
          'See the log of those processes for the cause.')
    share = bytes(everyone[0, 2:].astype(np.uint8)).rstrip(b'\0').decode(
        'ascii')
  if error is not None:
    raise error
  return share


def _call(fn, *args, **kwargs) -> BaseException | None:
  """Runs ``fn``; returns the exception it raised (None if none)."""
  try:
    fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


def _save_with_orbax(ckpt_path, base_path, target, keep, overwrite,
                     keep_every_n_steps, orbax_checkpointer) -> None:
  from gintrain.lib import orbax_delegation  # pylint: disable=g-import-not-at-top

  def prune_first():
    # As flax: the cleanup runs before the save, on process 0 only.
    if jax.process_index() == 0:
      checkpoint_naming.remove_invalid_checkpoints(
          ckpt_path, base_path, keep, overwrite, keep_every_n_steps,
          has_mpa=True)

  orbax_delegation.save_with_orbax(ckpt_path, target, orbax_checkpointer,
                                   overwrite, before_save=prune_first)


def _commit(tmp_path, ckpt_path, base_path, keep, overwrite,
            keep_every_n_steps, async_manager) -> None:
  """Process 0, once every process wrote its arrays: publish the checkpoint."""
  multiprocess_arrays.commit_array_dir(tmp_path, ckpt_path)
  if async_manager:
    async_manager.wait_previous_save()  # the main file's write
  checkpoint_io.commit_file(tmp_path, ckpt_path, overwrite)
  logger.info('Saved checkpoint at %s', ckpt_path)
  checkpoint_naming.remove_invalid_checkpoints(
      ckpt_path, base_path, keep, overwrite, keep_every_n_steps, has_mpa=True)
  checkpoint_naming.remove_stale_tmp_files(*os.path.split(base_path))
  _sweep_crashed_saves(*os.path.split(base_path), tmp_path)


def _sweep_crashed_saves(dir_path: str, prefix: str, current_tmp: str) -> list:
  """Process 0, after a commit: removes what crashed multi-process saves
  left in ``dir_path``. Returns the removed paths; errors are logged.

  * ``<prefix><step>_gda`` with no ``<prefix><step>`` file: arrays of a
    save that died before its main file was committed (object stores write
    arrays in place; locally the crash fell between the two renames);
  * on object stores, ``.<prefix>tmp-*`` objects other than this save's:
    the main-file uploads of dead saves (``remove_stale_tmp_files`` leaves
    URLs alone; saves into one directory are serialised, so none is live).
  """
  removed = []
  url = storage.local_file(dir_path) is None
  current = os.path.basename(current_tmp)
  for name in storage.listdir(dir_path):
    path = os.path.join(dir_path, name)
    stale = False
    if name.startswith(prefix) and name.endswith(
        multiprocess_arrays.MP_ARRAY_POSTFIX):
      main = name[:-len(multiprocess_arrays.MP_ARRAY_POSTFIX)]
      stale = (not checkpoint_naming.is_tmp_name(main, prefix) and
               main != prefix + 'tmp' and
               not storage.exists(os.path.join(dir_path, main)))
    elif url and checkpoint_naming.is_tmp_name(name, prefix):
      stale = not name.startswith(current)
    if not stale:
      continue
    try:
      logger.info('Removing what a crashed save left: %s', path)
      storage.rmtree(path)
      removed.append(path)
    except Exception as e:  # pylint: disable=broad-except
      logger.warning('Could not remove "%s" (left by a crashed save): %s',
                     path, e)
  return removed


def save_checkpoint_multiprocess(
    ckpt_dir: str | os.PathLike,
    target: Any,
    step: int | float,
    prefix: str = 'checkpoint_',
    keep: int = 1,
    overwrite: bool = False,
    keep_every_n_steps: int | None = None,
    async_manager: Any | None = None,
    gda_manager: Any | None = None,
    orbax_checkpointer: Any | None = None,
    array_format: str | None = None,
    host_memory_budget: int | None = None,
    buffers_stay_valid: bool = False,
) -> str:
  """Saves ``target`` from every process as ``<ckpt_dir>/<prefix><step>``.

  Must be called by every process, with the same arguments; ``ckpt_dir``
  must be visible to all of them (shared filesystem).

  Args:
    ckpt_dir: directory (str or path-like), created if missing.
    target: any object ``lib.serialization`` can turn into a state dict.
    step: int or float, written as ``str(step)``.
    prefix: file name prefix.
    keep: number of newest checkpoints to keep (0 keeps all).
    overwrite: replace a checkpoint of this step and delete every checkpoint
      sorting after it. Without it such a save raises on every process.
    keep_every_n_steps: also keep one older checkpoint every that many steps.
    async_manager: process 0 writes the file in a background thread (a
      snapshot of the tree is taken first).
    gda_manager: a ``jax.experimental.array_serialization.serialization
      .GlobalAsyncCheckpointManager``; required when ``target`` holds
      ``jax.Array`` leaves that are not fully addressable. They are written
      asynchronously; ``gda_manager.wait_until_finished()`` waits for the
      commit (the next save waits for it too).
    orbax_checkpointer: save as an Orbax checkpoint directory with it (every
      process calls Orbax; process 0 prunes old checkpoints first).
    array_format: the layout of ``<checkpoint>_gda`` (not a flax argument):
      ``'zarr'`` (flax's: a zarr array per array, a chunk file per slice;
      flax restores it) or ``'packed'`` (``lib.packed_arrays``: two files per
      process, restores read straight into the device buffers; on object
      stores two objects a process). None: ``multiprocess_arrays.DEFAULT_FORMAT``
      ('zarr'). Both carry integrity hashes and both restore with
      ``restore_checkpoint``.
    host_memory_budget: packed layout only: the most bytes of host memory
      this save may hold for the background write (a copy of this
      process's slices). Over it, the slices are written before returning,
      one at a time on the host. None: no bound (about 1x the process's
      slice bytes).
    buffers_stay_valid: packed layout only: the caller promises not to
      delete or donate the sharded arrays of ``target`` until the save is
      complete (``gda_manager.wait_until_finished()``); then nothing is
      copied before returning (the call blocks only for the barriers) and
      the background writer brings each slice to the host as it writes it.

  Returns:
    The checkpoint path (it may not exist yet when a manager is used).

  Raises:
    gintrain.lib.errors.MPACheckpointingRequiredError: multi-process arrays but no
      ``gda_manager``; nothing is written.
    gintrain.lib.errors.InvalidCheckpointError: not ``overwrite`` and a checkpoint of
      this step, or one sorting after it, exists (on any process); nothing
      is written.
    TypeError: a leaf that cannot be serialized.
    gintrain.lib.errors.GintrainError: the save failed on another process.
    ValueError: ``prefix`` is empty or holds a path separator (on every
      process, before any barrier).
  """
  checkpoint_naming.validate_prefix(prefix)
  array_format = multiprocess_arrays.resolve_format(array_format,
                                                    os.fspath(ckpt_dir))
  ckpt_path, tmp_path, base_path = checkpoint_naming.get_checkpoint_paths(
      ckpt_dir, step, prefix)

  def wait_last_save():
    waited = None
    if async_manager:
      waited = _call(async_manager.wait_previous_save)
    if gda_manager is not None and waited is None:
      waited = _call(gda_manager.wait_until_finished)
    return waited

  if orbax_checkpointer is not None:
    _barrier('Flax:Checkpoint:StartSave')
    if async_manager or gda_manager is not None:
      _agree('Flax:Checkpoint:WaitLastSaveDone', wait_last_save())
    logger.info('Saving checkpoint at step: %s', step)
    _save_with_orbax(ckpt_path, base_path, target, keep, overwrite,
                     keep_every_n_steps, orbax_checkpointer)
    return ckpt_path

  logger.info('Saving checkpoint at step: %s', step)
  warnings.warn(
      'Single-file msgpack checkpoints are the legacy flax format, which flax'
      ' deprecates in favour of Orbax; pass orbax_checkpointer= to write'
      ' Orbax checkpoints.', DeprecationWarning, stacklevel=2)
  state = serialization.to_state_dict(target)
  state, arrays = multiprocess_arrays.split_multiprocess_arrays(state)
  if arrays and gda_manager is None:
    raise errors.MPACheckpointingRequiredError(ckpt_path, step)

  # One exchange, where flax has four (start, last save done, overwrite
  # check, temporary name): each process's outcome of waiting for the last
  # save, the overwrite check and (process 0) the encoding, with process
  # 0's temporary name for the arrays. The caller blocks for two
  # exchanges in all.
  is_writer = jax.process_index() == 0
  error = wait_last_save()
  if error is None and not overwrite:
    error = _call(checkpoint_naming.check_overwrite, tmp_path, ckpt_path,
                  base_path, step)
  encoded = None
  if is_writer and error is None:
    try:
      encoded = checkpoint_io.encode(
          state, sort_keys=True, snapshot=bool(async_manager))
    except Exception as e:  # pylint: disable=broad-except
      error = e
  token = checkpoint_naming.new_tmp_token()[:64] if (
      arrays and is_writer) else ''
  token = _agree('Flax:Checkpoint:CheckOverwriteBeforeSave', error, token)

  if not arrays:
    write_and_clean_up = functools.partial(
        checkpoint_io.write_and_retain, encoded, ckpt_path, None,
        base_path, keep, overwrite, keep_every_n_steps)
    if async_manager:
      # The other processes' "save" waits for process 0's outcome, so that
      # a failed background write fails the save on every process
      # (lib.save_status), not on process 0 alone.
      status = save_status.start(ckpt_path, _STATUS_TIMEOUT_S)
      if status is not None:
        write_and_clean_up = (
            functools.partial(status.run_and_publish, write_and_clean_up)
            if is_writer else functools.partial(status.wait_others, [0]))
      if is_writer or status is not None:
        async_manager.save_async(write_and_clean_up)
    else:
      if is_writer:
        error = _call(write_and_clean_up)
      _agree('Flax:Checkpoint:MainFileWritten', error)
    return ckpt_path

  # Multi-process arrays: the file is committed after all arrays are written.
  tmp_path = checkpoint_naming.new_tmp_path(*os.path.split(base_path), token)
  if is_writer:
    def write_tmp():
      checkpoint_io.make_parent_dirs(ckpt_path)
      try:
        checkpoint_io.write_file(encoded, tmp_path, exclusive=True)
      except checkpoint_io.CheckpointWriteError as e:
        raise checkpoint_io.CheckpointWriteError(
            ckpt_path, e.cause, e.path) from e.cause
    if async_manager:
      async_manager.save_async(write_tmp)
    else:
      error = _call(write_tmp)
    if error is None:
      error = _call(multiprocess_arrays.prepare_array_dir, tmp_path,
                    ckpt_path, [subpath for subpath, _ in arrays],
                    array_format)
  _agree('Flax:Checkpoint:AfterCreateMPADir', error)
  multiprocess_arrays.save_multiprocess_arrays(
      gda_manager, arrays, tmp_path, ckpt_path,
      on_commit=functools.partial(
          _commit, tmp_path, ckpt_path, base_path, keep, overwrite,
          keep_every_n_steps, async_manager),
      array_format=array_format, host_memory_budget=host_memory_budget,
      buffers_stay_valid=buffers_stay_valid,
      # A failed main file fails process 0's part: every process learns it.
      wait_also=([async_manager.save_future] if is_writer and async_manager
                 and async_manager.save_future is not None else []))
  return ckpt_path


def _sharding_of(leaf):
  """The sharding of a target leaf (a ``jax.Array``, or a
  ``jax.ShapeDtypeStruct`` with one), else None."""
  sharding = getattr(leaf, 'sharding', None)
  return sharding if isinstance(sharding, jax.sharding.Sharding) else None


def _place(value, sharding):
  """A host leaf of the msgpack file placed with ``sharding`` (each
  process puts only its devices' slices)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


def restore_checkpoint(ckpt_dir: str | os.PathLike, target: Any,
                       step: int | float | None = None,
                       prefix: str = 'checkpoint_') -> Any:
  """Restores a (multi-process) checkpoint into the shardings of ``target``.

  Unlike flax's ``restore_checkpoint`` this needs no ``gda_manager`` and
  takes the shardings from ``target``: every leaf that is a ``jax.Array``
  or a ``jax.ShapeDtypeStruct`` with a ``sharding`` comes back as a
  ``jax.Array`` with that sharding, whatever process count, mesh or layout
  (``packed`` or ``zarr``) wrote it. Each process reads only the slices its
  devices hold, straight into their buffers, checked against the
  checkpoint's hashes; so does a checkpoint written by one process (its
  arrays whole in the msgpack file: ``lib.msgpack_slices``; with a
  block-hashed integrity sidecar each block read is checked, while a file
  with an older sidecar, one hash of the whole file, is read whole to be
  checked). Other leaves come back
  as stored. Every process calls it (errors are agreed, so all raise or
  none).

  Args:
    ckpt_dir: a checkpoint file, or a directory of ``<prefix><step>`` files.
    target: the tree to restore into (its structure and shardings).
    step: the step to restore from a directory (None: the newest).
    prefix: the checkpoint file prefix.

  Returns:
    ``target``'s structure with the checkpoint's values, or ``target`` if
    the directory holds no checkpoint.

  Raises:
    gintrain.lib.errors.CheckpointReadError: unreadable or damaged (the
      message names the file or array).
    gintrain.lib.errors.MPARestoreTargetRequiredError: a sharded array of
      the checkpoint with no sharded leaf at its place in ``target``.
    gintrain.lib.errors.MPARestoreDataCorruptedError: the sharded arrays are
      missing or were never committed.
  """
  path = os.fspath(ckpt_dir)
  if storage.isdir(path):
    if step is not None:
      path = checkpoint_naming.checkpoint_path(path, step, prefix)
    else:
      found = checkpoint_naming.all_checkpoints(path, prefix)
      if not found:
        logger.info('Found no checkpoint files in %s with prefix %s', path,
                    prefix)
        return target
      path = found[-1]
  target_state = serialization.to_state_dict(target)
  shardings = jax.tree_util.tree_map(
      _sharding_of, target_state,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  # Large arrays of the msgpack file (a checkpoint written by one process)
  # stay unread until placed: each process reads only its devices' slices.
  state = None
  if any(s is not None for s in jax.tree_util.tree_leaves(shardings)):
    state = msgpack_slices.read_lazily(path)
  if state is None:
    state = checkpoint_io.read_checkpoint_file(path)
  state = multiprocess_arrays.read_arrays(state, path, shardings, step)
  lazy = []  # (StoredArray, sharding): read together, in parallel

  def collect(stored, sharding):
    if sharding is not None and isinstance(stored,
                                           msgpack_slices.StoredArray):
      lazy.append((stored, sharding))
    return stored
  if isinstance(state, dict) and isinstance(shardings, dict):
    _map_pairs(collect, state, shardings)
  elif shardings is not None and not isinstance(shardings, dict):
    collect(state, shardings)
  placed = dict(zip([id(a) for a, _ in lazy],
                    msgpack_slices.place(lazy) if lazy else []))

  def place(stored, sharding):
    if id(stored) in placed and isinstance(stored, msgpack_slices.StoredArray):
      return placed[id(stored)]
    if sharding is None or isinstance(stored, jax.Array):
      return stored
    return _place(msgpack_slices.materialize(stored), sharding)
  if isinstance(state, dict) and isinstance(shardings, dict):
    state = _map_pairs(place, state, shardings)
  elif shardings is not None and not isinstance(shardings, dict):
    state = place(state, shardings)
  return serialization.from_state_dict(target,
                                       msgpack_slices.materialize(state))


def _map_pairs(fn, state, shardings):
  """``fn(stored, sharding)`` over the leaves of ``state`` that have a
  sharding at the same key path (dicts only, as state dicts are)."""
  if isinstance(state, dict) and isinstance(shardings, dict):
    return {k: (_map_pairs(fn, v, shardings[k]) if k in shardings else v)
            for k, v in state.items()}
  if isinstance(shardings, dict):
    return state
  return fn(state, shardings)



def _tree_files(path: str) -> tuple[int, int]:
  """``(bytes, files)`` under the directory ``path`` ((0, 0): nothing)."""
  total = files = 0
  local = storage.local_file(path)
  if local is not None:
    for root, _, names in os.walk(local):
      for name in names:
        try:
          total += os.lstat(os.path.join(root, name)).st_size
          files += 1
        except FileNotFoundError:
          pass  # removed meanwhile
    return total, files
  fs, fs_path = storage.filesystem(path)
  try:
    found = fs.find(fs_path, detail=True)
  except FileNotFoundError:
    found = {}
  for entry in found.values():
    if entry.get('type', 'file') == 'file':
      total, files = total + int(entry.get('size') or 0), files + 1
  return total, files


def checkpoint_files(ckpt_path: str) -> tuple[int, int]:
  """``(bytes, files)`` of the checkpoint ``ckpt_path`` (a local path or a
  URL): its msgpack file (or, for an Orbax checkpoint, its directory), its
  integrity sidecar and its sharded arrays (``<ckpt_path>_gda``); what is
  missing counts as nothing.

    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> from gintrain.lib.checkpoints import save_checkpoint
    >>> size, files = checkpoint_files(save_checkpoint(d, {'a': np.zeros(256)}, 1))
    >>> files, size > 2048
    (1, True)
  """
  total = files = 0
  for item in (ckpt_path, checkpoint_naming.sidecar_path(ckpt_path)):
    try:
      info = storage.info(item)
    except (FileNotFoundError, NotADirectoryError):
      continue
    if info['type'] == 'directory':
      size, count = _tree_files(item)
      total, files = total + size, files + count
    elif info['type'] == 'file':
      total, files = total + info['size'], files + 1
  size, count = _tree_files(multiprocess_arrays.array_dir(ckpt_path))
  return total + size, files + count
