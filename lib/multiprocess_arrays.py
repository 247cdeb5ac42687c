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

Example (one process, so nothing is split out)::

  >>> import numpy as np
  >>> split_multiprocess_arrays({'a': np.zeros(2), 'b': {}})
  ({'a': array([0., 0.]), 'b': {}}, [])
"""

import logging
import os
import re
import shutil
from typing import Any

import jax

from gintrain.lib import errors
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
]

logger = logging.getLogger(__name__)

# Directory suffix of the arrays of checkpoint ``<path>``: ``<path>_gda``.
MP_ARRAY_POSTFIX = '_gda'
# A split-out array's place in the state dict holds ``MP_ARRAY_PH + subpath``.
MP_ARRAY_PH = '//GDAPlaceholder:'
# Written last into ``<path>_gda`` on object stores (no atomic rename there).
COMMIT_SUCCESS_FILE = 'commit_success.txt'

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


def prepare_array_dir(tmp_path: str, final_path: str, subpaths) -> None:
  """Process 0, before any process writes: a clean directory to write into.

  Local paths: removes a stale ``<tmp>_gda`` left by an interrupted save and
  creates ``<tmp>_gda/<subpath>`` for each array. Object stores: deletes
  everything under ``<final>_gda`` (a commit file of an earlier save there
  must not vouch for this one).
  """
  if is_remote_path(final_path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    _kvstore(array_dir(final_path)).delete_range(ts.KvStore.KeyRange()).result()
    return
  tmp_dir = array_dir(tmp_path)
  if os.path.exists(tmp_dir):
    logger.info('Removing outdated multi-process array files at %s', tmp_dir)
    shutil.rmtree(tmp_dir)
  for subpath in subpaths:
    os.makedirs(_array_path(tmp_dir, subpath), exist_ok=True)


def save_multiprocess_arrays(gda_manager, arrays: list, tmp_path: str,
                             final_path: str, on_commit) -> None:
  """Starts writing ``arrays`` (``(subpath, jax.Array)`` pairs); all processes.

  Every process writes its own shards through ``gda_manager`` (a
  ``jax.experimental.array_serialization.serialization
  .GlobalAsyncCheckpointManager``) into ``<tmp>_gda`` (``<final>_gda`` on
  object stores). jax calls ``on_commit`` on process 0 once every process
  finished; ``gda_manager.wait_until_finished()`` waits for that and raises
  its errors.
  """
  target_dir = array_dir(final_path if is_remote_path(final_path) else tmp_path)
  specs = [_array_spec(_array_path(target_dir, subpath))
           for subpath, _ in arrays]
  gda_manager.serialize([arr for _, arr in arrays], specs,
                        on_commit_callback=on_commit)


def commit_array_dir(tmp_path: str, final_path: str) -> None:
  """Process 0, after every process finished writing: publish the arrays.

  Local: ``<final>_gda`` (if any, e.g. from an interrupted commit or an
  overwrite) is replaced by ``<tmp>_gda`` with a rename, and the parent
  directory is fsynced. Object stores: writes :data:`COMMIT_SUCCESS_FILE`.
  """
  final_dir = array_dir(final_path)
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
  else:
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
  _check_committed(ckpt_path, [p for _, _, p in wanted], step)
  arrays = _read_into([s for _, s, _ in wanted],
                      [_read_spec(p) for _, _, p in wanted])
  return _replace_leaves(state_dict, {
      key: arr for (key, _, _), arr in zip(wanted, arrays)})


def _read_into(shardings, specs) -> list:
  """The arrays stored at ``specs``, each placed with its sharding; every
  process reads only its devices' slices, all reads in flight at once.

  Written here rather than through jax's ``run_deserialization``, which
  copies every slice once more on the host (an ``astype``): measured at
  about half of a 1 GiB restore on 2 processes.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  stores = [ts.open(spec, open=True) for spec in specs]
  stores = [future.result() for future in stores]
  pending = []  # (array index, device, read future)
  for i, (sharding, store) in enumerate(zip(shardings, stores)):
    shape = tuple(store.shape)
    for device, index in sharding.addressable_devices_indices_map(
        shape).items():
      pending.append((i, device, store[index].read()))
  per_array = [[] for _ in stores]
  for i, device, future in pending:
    per_array[i].append(jax.device_put(future.result(), device))
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
  _check_committed(ckpt_path, [p for _, _, p in wanted], step)
  arrays = gda_manager.deserialize([s for _, s, _ in wanted],
                                   [_read_spec(p) for _, _, p in wanted])
  return _replace_leaves(state_dict, {
      key: arr for (key, _, _), arr in zip(wanted, arrays)})
