"""Checkpoints: ``flax.training.checkpoints`` without flax.

Saving writes one msgpack file per step (flax's "legacy" format, byte for byte
what flax writes for the same tree); Orbax is used only when an
``orbax_checkpointer`` is passed, or when restoring an Orbax directory.

  >>> import tempfile, numpy as np
  >>> d = tempfile.mkdtemp()
  >>> state = {'w': np.arange(3.0), 'step': 7}
  >>> save_checkpoint(d, state, step=7, keep=2)[len(d):]
  '/checkpoint_7'
  >>> restore_checkpoint(d, target=state)
  {'w': array([0., 1., 2.]), 'step': 7}

A save writes a temporary file of its own, ``<dir>/.<prefix>tmp-<host>-<pid>-
<random>`` (created exclusively, never through a symlink), fsyncs it, renames
it to ``<dir>/<prefix><step>`` and fsyncs the directory, then deletes
checkpoints per ``keep``/``keep_every_n_steps``/``overwrite`` (regular files
and directories only) and removes temporaries left by crashed writers (see
``checkpoint_naming``). After a crash at any moment the latest checkpoint is
complete, and two writers on one directory never mix their data.
:func:`latest_valid_checkpoint` finds the newest checkpoint that reads back.

Object stores: every function here also takes a URL (``s3://bucket/run``,
``gs://...``, ``memory://...``, any protocol fsspec knows; see
``lib.storage``). A save streams the file into an upload that appears under
its final name only when complete, so a killed save is never listed; a
restore downloads into a temporary staging file. Local paths keep the
``os`` code path above. An unknown scheme, or a store whose package is
missing, raises ``lib.storage.StorageError`` (one line naming the extra to
install) before anything is written. Saves to object stores also write an
integrity sidecar ``.<name>.xxh3`` (``checkpoint_io.set_integrity_sidecar``
for local ones); restores verify it when present.

Differences from flax (deliberate): a failed :class:`AsyncManager` save is
re-raised by the next wait or save; files and directory are fsynced;
big-endian arrays are stored little-endian; restoring a path that does not
exist logs a warning naming it; a prefix holding a path separator, or an
empty one, is refused; each writer has its own temporary file; only regular
files are read as checkpoints (a FIFO or device raises instead of blocking).
"""

import collections.abc
import functools
import logging
import os
import warnings
from typing import Any

import jax

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import errors
from gintrain.lib import multiprocess_arrays
from gintrain.lib import orbax_delegation
from gintrain.lib import serialization
from gintrain.lib import storage
from gintrain.lib.async_manager import AsyncManager
from gintrain.lib.checkpoint_naming import MODULE_NUM_RE
from gintrain.lib.checkpoint_naming import MP_ARRAY_POSTFIX
from gintrain.lib.checkpoint_naming import natural_sort
from gintrain.lib.checkpoint_naming import safe_normpath
from gintrain.lib.checkpoint_naming import SCHEME_RE
from gintrain.lib.checkpoint_naming import SIGNED_FLOAT_RE
from gintrain.lib.checkpoint_naming import UNSIGNED_FLOAT_RE
from gintrain.lib.checkpoints_multiprocess import save_checkpoint_multiprocess
from gintrain.lib.multiprocess_arrays import COMMIT_SUCCESS_FILE
from gintrain.lib.multiprocess_arrays import MP_ARRAY_PH
from gintrain.lib.orbax_delegation import ORBAX_CKPT_FILENAME
from gintrain.lib.orbax_delegation import ORBAX_MANIFEST_OCDBT
from gintrain.lib.orbax_delegation import ORBAX_METADATA_FILENAME

__all__ = [
    'AsyncManager',
    'save_checkpoint',
    'save_checkpoint_multiprocess',
    'restore_checkpoint',
    'latest_checkpoint',
    'latest_valid_checkpoint',
    'available_steps',
    'convert_pre_linen',
    'natural_sort',
    'safe_normpath',
    'SIGNED_FLOAT_RE',
    'UNSIGNED_FLOAT_RE',
    'MODULE_NUM_RE',
    'SCHEME_RE',
    'MP_ARRAY_POSTFIX',
    'MP_ARRAY_PH',
    'COMMIT_SUCCESS_FILE',
    'ORBAX_CKPT_FILENAME',
    'ORBAX_MANIFEST_OCDBT',
    'ORBAX_METADATA_FILENAME',
]

logger = logging.getLogger(__name__)

PyTree = Any


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    target: PyTree,
    step: int | float,
    prefix: str = 'checkpoint_',
    keep: int = 1,
    overwrite: bool = False,
    keep_every_n_steps: int | None = None,
    async_manager: AsyncManager | None = None,
    orbax_checkpointer: Any | None = None,
) -> str:
  """Saves ``target`` as ``<ckpt_dir>/<prefix><step>`` (single process).

  Every process that calls it writes its own file; for multi-process
  training use ``save_checkpoint_multiprocess``.

  Args:
    ckpt_dir: directory (str or path-like), created if missing.
    target: any object ``lib.serialization`` can turn into a state dict.
    step: int or float, written as ``str(step)`` (``3`` and ``3.0`` are
      different files).
    prefix: file name prefix.
    keep: number of newest checkpoints to keep (0 keeps all).
    overwrite: replace a checkpoint of this step and delete every checkpoint
      sorting after it. Without it such a save raises.
    keep_every_n_steps: also keep one older checkpoint every that many steps.
    async_manager: write in a background thread. The call blocks only to
      wait for the previous save, check for overwriting, and take a snapshot
      of ``target`` (numpy arrays are copied; ``jax.Array`` leaves are not).
      A failed background save raises at the next save or
      ``async_manager.wait_previous_save()``.
    orbax_checkpointer: save as an Orbax checkpoint directory with it.

  Returns:
    The checkpoint path (with ``async_manager`` it may not exist yet).

  Raises:
    gintrain.lib.errors.InvalidCheckpointError: not ``overwrite`` and a checkpoint
      of this step, or one sorting after it (e.g. ``<prefix>best``), exists.
      Nothing is written.
    TypeError: ``target`` holds a leaf that cannot be serialized.
    ValueError: ``prefix`` is empty or holds a path separator.
    gintrain.lib.checkpoint_io.CheckpointWriteError: the write failed (e.g.
      the disk is full; an ``OSError`` naming the path). The partial file
      is removed, older checkpoints are intact.
  """
  checkpoint_naming.validate_prefix(prefix)
  if async_manager:
    async_manager.wait_previous_save()
  ckpt_path, tmp_path, base_path = checkpoint_naming.get_checkpoint_paths(
      ckpt_dir, step, prefix)
  logger.info('Saving checkpoint at step: %s', step)

  if orbax_checkpointer is not None:
    if storage.local_file(ckpt_path) is None:
      raise ValueError(f'{ckpt_path}: Orbax saves through this function take'
                       ' local paths only; use Orbax directly for URLs.')
    if jax.process_count() > 1:
      logger.warning(
          'Multiple JAX processes detected when calling single-process'
          ' save_checkpoint: every process must call it, or devices hang.')
    orbax_delegation.save_with_orbax(ckpt_path, target, orbax_checkpointer,
                                     overwrite)
    if jax.process_index() == 0:
      checkpoint_naming.remove_invalid_checkpoints(
          ckpt_path, base_path, keep, overwrite, keep_every_n_steps,
          has_mpa=True)
    return ckpt_path

  warnings.warn(
      'Single-file msgpack checkpoints are the legacy flax format, which flax'
      ' deprecates in favour of Orbax; pass orbax_checkpointer= to write'
      ' Orbax checkpoints.', DeprecationWarning, stacklevel=2)
  if not overwrite:
    checkpoint_naming.check_overwrite(tmp_path, ckpt_path, base_path, step)
  encoded = checkpoint_io.encode(
      serialization.to_state_dict(target), snapshot=async_manager is not None)

  write_and_clean_up = functools.partial(
      checkpoint_io.write_and_retain, encoded, ckpt_path, None, base_path,
      keep, overwrite, keep_every_n_steps)
  if async_manager:
    async_manager.save_async(write_and_clean_up)
  else:
    write_and_clean_up()
  return ckpt_path


def latest_checkpoint(ckpt_dir: str | os.PathLike,
                      prefix: str = 'checkpoint_') -> str | None:
  """The path of the newest checkpoint in ``ckpt_dir``, or None.

  Newest = last in :func:`natural_sort` order; names starting with the
  prefix but holding no number (``checkpoint_best``) count as newest.
  ``<prefix>tmp``, every writer's temporaries, ``*_gda`` and unfinished
  Orbax directories are ignored. Names only: the file is not opened (see
  :func:`latest_valid_checkpoint`).
  """
  paths = checkpoint_naming.all_checkpoints(ckpt_dir, prefix)
  return paths[-1] if paths else None


# What reading a bad checkpoint raises (CheckpointReadError is a ValueError).
_UNREADABLE = (errors.CheckpointReadError, OSError, ValueError)


def latest_valid_checkpoint(ckpt_dir: str | os.PathLike,
                            prefix: str = 'checkpoint_') -> str | None:
  """The newest checkpoint in ``ckpt_dir`` that reads back, or None.

  Candidates are :func:`latest_checkpoint`'s, newest first. A msgpack
  checkpoint must be a regular file that decodes completely (every byte is
  read: as costly as restoring it); an Orbax directory must be an Orbax
  checkpoint (it is not opened). Each one skipped is logged as a warning
  naming it and why. Use it to resume after a crash or a bad disk left the
  latest checkpoint corrupt::

    path = latest_valid_checkpoint(ckpt_dir)
    state = restore_checkpoint(path, state) if path else state

  Raises:
    ValueError: ``prefix`` is empty or holds a path separator.
  """
  checkpoint_naming.validate_prefix(prefix)
  for path in reversed(checkpoint_naming.all_checkpoints(ckpt_dir, prefix)):
    if _isdir(path) and not os.path.islink(path):
      if _is_orbax(path):
        return path
      logger.warning('Skipping checkpoint "%s": a directory that is not an'
                     ' Orbax checkpoint.', path)
      continue
    try:
      checkpoint_io.read_checkpoint_file(path, parallel=True)
    except _UNREADABLE as e:
      logger.warning('Skipping corrupt checkpoint "%s": %s', path, e)
      continue
    return path
  return None


def available_steps(ckpt_dir: str | os.PathLike, prefix: str = 'checkpoint_',
                    step_type: type = int) -> list[int | float]:
  """The steps of the checkpoints in ``ckpt_dir``, oldest first.

  Each is the text after the prefix converted with ``step_type``.

  Raises:
    ValueError: a name does not convert (``checkpoint_2.5`` with ``int``,
      ``checkpoint_best`` with any type).
  """
  steps = []
  for path in checkpoint_naming.all_checkpoints(ckpt_dir, prefix):
    steps.append(step_type(path[path.rfind(prefix) + len(prefix):]))
  return steps


_exists = storage.exists
_isdir = storage.isdir


_is_orbax = checkpoint_naming.is_orbax_dir


def _wait_for_orbax(orbax_checkpointer) -> None:
  wait = getattr(orbax_checkpointer, 'wait_until_finished', None)
  if wait is not None:
    wait()


def restore_checkpoint(
    ckpt_dir: str | os.PathLike,
    target: Any | None,
    step: int | float | None = None,
    prefix: str = 'checkpoint_',
    parallel: bool = True,
    gda_manager: Any | None = None,
    allow_partial_mpa_restoration: bool = False,
    orbax_checkpointer: Any | None = None,
    orbax_transforms: dict | None = None,
) -> PyTree:
  """Restores the latest (or the given step's) checkpoint.

  Args:
    ckpt_dir: a directory of checkpoints, or one checkpoint file or Orbax
      directory.
    target: the object to restore into (its structure and types; leaves are
      replaced without shape or dtype checks). None returns the state dict
      (lists and tuples come back as ``{'0': ..}`` dicts).
    step: the step to restore (``<ckpt_dir>/<prefix><step>``); None for the
      latest.
    prefix: checkpoint name prefix (ignored for a file path).
    parallel: read large files with several threads.
    gda_manager: needed when the checkpoint holds multi-process arrays.
    allow_partial_mpa_restoration: skip multi-process arrays without a
      matching array in ``target`` instead of raising.
    orbax_checkpointer: the checkpointer for an Orbax checkpoint.
    orbax_transforms: Orbax transformations for an Orbax restore.

  Returns:
    The restored object. If ``step`` is None and there is no checkpoint (the
    path does not exist, or holds none with ``prefix``) ``target`` itself;
    a missing path also logs a warning naming it.

  Raises:
    ValueError: ``step`` given but ``<ckpt_dir>/<prefix><step>`` missing,
      or (with ``step``) an empty prefix or one with a path separator.
    gintrain.lib.errors.CheckpointReadError: the file is corrupt or truncated.
    gintrain.lib.checkpoint_io.NotARegularFileError: the checkpoint path is a
      directory that is not an Orbax checkpoint (then also an
      ``IsADirectoryError``), a FIFO, socket or device (an ``OSError``
      naming the path, raised without blocking).
    ValueError: the checkpoint does not fit ``target``'s structure.
  """
  if orbax_checkpointer is not None:
    _wait_for_orbax(orbax_checkpointer)
  ckpt_dir = safe_normpath(storage.check(os.fspath(ckpt_dir)))
  if step is not None:
    checkpoint_naming.validate_prefix(prefix)
    ckpt_path = checkpoint_naming.checkpoint_path(ckpt_dir, step, prefix)
    if not _exists(ckpt_path):
      raise ValueError(f'Matching checkpoint not found: {ckpt_path}')
  elif not _exists(ckpt_dir):
    logger.warning(
        'No checkpoint restored: "%s" does not exist; returning the target'
        ' unchanged.', ckpt_dir)
    return target
  elif not _isdir(ckpt_dir):
    ckpt_path = ckpt_dir
  elif _is_orbax(ckpt_dir):
    ckpt_path = ckpt_dir
  else:
    ckpt_path = latest_checkpoint(ckpt_dir, prefix)
    if not ckpt_path:
      logger.info('Found no checkpoint files in %s with prefix %s', ckpt_dir,
                  prefix)
      return target

  if _is_orbax(ckpt_path):
    logger.info('Restoring orbax checkpoint from %s', ckpt_path)
    return orbax_delegation.restore_with_orbax(
        ckpt_path, target, orbax_checkpointer, orbax_transforms)

  logger.info('Restoring legacy checkpoint from %s', ckpt_path)
  state_dict = checkpoint_io.read_checkpoint_file(ckpt_path, parallel)
  if _has_placeholder(state_dict):
    state_dict = multiprocess_arrays.restore_multiprocess_arrays(
        state_dict, target, ckpt_path, step, gda_manager,
        allow_partial_mpa_restoration)
  if target is None:
    return state_dict
  return serialization.from_state_dict(target, state_dict)


def _has_placeholder(tree) -> bool:
  """Whether a multi-process array placeholder string is in ``tree``."""
  if isinstance(tree, str):
    return tree.startswith(MP_ARRAY_PH)
  if isinstance(tree, dict):
    return any(_has_placeholder(v) for v in tree.values())
  return False


def _frozen_dict_type(params) -> type | None:
  """flax's ``FrozenDict`` (recognised by name; lib never imports flax)."""
  ty = type(params)
  if (isinstance(params, collections.abc.Mapping) and
      ty.__name__ == 'FrozenDict'):
    return ty
  return None


def convert_pre_linen(params: PyTree) -> PyTree:
  """Renames pre-Linen submodule counters to Linen's per-type counters.

  Pre-Linen numbered submodules across types (``Conv_0, Dense_1``); Linen
  numbers each type on its own (``Conv_0, Dense_0``). Keys are visited in
  :func:`natural_sort` order and every ``<name>_<n>`` key is renumbered per
  ``<name>``; values are converted recursively. Already-Linen trees come
  back unchanged.

  >>> convert_pre_linen({'mod_2': 1, 'mod_11': 2, 'mod_1': 0, 'x': {'a_3': 4}})
  {'mod_0': 0, 'mod_1': 1, 'mod_2': 2, 'x': {'a_0': 4}}

  Args:
    params: a dict (or flax ``FrozenDict``) of parameters; anything else is
      returned unchanged (lists are not descended into).

  Returns:
    A new dict (``FrozenDict`` in, ``FrozenDict`` out) in natural-sort key
    order.
  """
  frozen = _frozen_dict_type(params)
  if not isinstance(params, dict) and frozen is None:
    return params
  renamed = {}
  counts: dict[str, int] = {}
  for name in natural_sort(params.keys()):
    value = params[name]
    match = MODULE_NUM_RE.match(name)
    if match:
      module = match.group(1)
      num = counts.get(module, 0)
      counts[module] = num + 1
      name = f'{module}_{num}'
    renamed[name] = convert_pre_linen(value)
  return frozen(renamed) if frozen is not None else renamed
