"""Orbax as an optional checkpoint backend (flax's ``orbax_checkpointer`` path).

``lib.checkpoints`` writes single-file msgpack checkpoints. It hands a save to
Orbax only when the caller passes an ``orbax_checkpointer``, and a restore when
the chosen path is an Orbax checkpoint *directory* (see
:func:`is_orbax_checkpoint`). Orbax is an optional dependency
(``pip install gintrain[orbax]``) and is imported only on those paths.

Example (needs orbax-checkpoint)::

  >>> import tempfile, numpy as np
  >>> import orbax.checkpoint as ocp
  >>> d = tempfile.mkdtemp()
  >>> ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  >>> save_with_orbax(d + '/checkpoint_1', {'w': np.arange(3)}, ckptr)
  >>> is_orbax_checkpoint(d + '/checkpoint_1')
  True
  >>> restore_with_orbax(d + '/checkpoint_1', None)['w']
  array([0, 1, 2])
"""

import os
from typing import Any

import jax
import numpy as np

from gintrain.lib import serialization

__all__ = [
    'ORBAX_CKPT_FILENAME',
    'ORBAX_MANIFEST_OCDBT',
    'ORBAX_METADATA_FILENAME',
    'ORBAX_TMP_DIR_SUFFIX',
    'import_orbax',
    'is_orbax_checkpoint',
    'save_with_orbax',
    'restore_with_orbax',
    'restore_args_from_target',
    'construct_transformations',
]

# Any of these inside a directory marks it as an Orbax checkpoint.
ORBAX_CKPT_FILENAME = 'checkpoint'
ORBAX_MANIFEST_OCDBT = 'manifest.ocdbt'
ORBAX_METADATA_FILENAME = '_METADATA'
# Orbax's marker for an unfinished save (``ocp.utils.TMP_DIR_SUFFIX``), hard
# coded so that listing checkpoints never needs orbax.
ORBAX_TMP_DIR_SUFFIX = '.orbax-checkpoint-tmp'

_INSTALL_HINT = ('Orbax checkpointing needs the optional dependency'
                 ' orbax-checkpoint: pip install gintrain[orbax]')


def import_orbax():
  """Returns the ``orbax.checkpoint`` module, imported on first use.

  Raises:
    ImportError: orbax-checkpoint is not installed; the message says how to
      install it (``pip install gintrain[orbax]``).
  """
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{_INSTALL_HINT} ({e}).') from e
  return ocp


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an Orbax checkpoint directory.

  True when it holds a ``checkpoint``, ``_METADATA`` or ``manifest.ocdbt``
  entry (flax's test). A msgpack checkpoint file, or a missing path, is not.
  Needs no orbax.
  """
  path = os.fspath(path)
  return any(
      os.path.exists(os.path.join(path, name))
      for name in (ORBAX_CKPT_FILENAME, ORBAX_METADATA_FILENAME,
                   ORBAX_MANIFEST_OCDBT))


def _handler(checkpointer):
  return getattr(checkpointer, 'handler', None) or getattr(
      checkpointer, '_handler', None)


def _wait(checkpointer):
  """Blocks until an asynchronous Orbax checkpointer finished its last save."""
  wait = getattr(checkpointer, 'wait_until_finished', None)
  if wait is not None:
    wait()


def _default_checkpointer(ocp):
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def save_with_orbax(ckpt_path: str, target: Any, orbax_checkpointer,
                    overwrite: bool = False, before_save=None) -> None:
  """Saves ``target`` as the Orbax checkpoint directory ``ckpt_path``.

  Waits for the checkpointer's previous asynchronous save first. Retention
  (``keep``...) and the return value are the caller's business.

  Args:
    ckpt_path: the final checkpoint path (a directory Orbax creates).
    target: a pytree; a bare leaf (array, number) is only accepted by an
      ``ocp.ArrayCheckpointHandler`` checkpointer.
    orbax_checkpointer: an ``ocp.Checkpointer`` / ``ocp.AsyncCheckpointer``;
      None uses ``ocp.Checkpointer(ocp.PyTreeCheckpointHandler())``.
    overwrite: passed to Orbax as ``force`` (replace an existing directory;
      without it Orbax raises ``ValueError``).
    before_save: called with no arguments after the checks, right before
      Orbax writes (``save_checkpoint_multiprocess`` prunes old checkpoints
      there, as flax does).

  Raises:
    ValueError: ``target`` is a single leaf and the handler is not an
      ``ArrayCheckpointHandler`` (nothing is written); Orbax's own errors
      (e.g. empty containers, an existing destination) pass through.
    ImportError: orbax-checkpoint is not installed.
  """
  ocp = import_orbax()
  if orbax_checkpointer is None:
    orbax_checkpointer = _default_checkpointer(ocp)
  _wait(orbax_checkpointer)
  is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(target))
  if is_leaf and not isinstance(_handler(orbax_checkpointer),
                                ocp.ArrayCheckpointHandler):
    raise ValueError(
        f'Cannot save a single {type(target).__name__} to "{ckpt_path}" with'
        ' Orbax: its PyTree handler only accepts containers (dict, list,'
        ' dataclass). Wrap the value, e.g. {"value": x}, use an'
        ' ocp.ArrayCheckpointHandler checkpointer, or save without'
        ' orbax_checkpointer (msgpack).')
  if before_save is not None:
    before_save()
  orbax_checkpointer.save(ckpt_path, target, force=overwrite)


def restore_args_from_target(target: Any) -> Any:
  """Orbax ``restore_args`` putting each leaf back like the target's leaf.

  Without any sharded leaf (no ``.sharding``) every leaf comes back as numpy,
  as in flax. Otherwise a leaf with a ``sharding`` (``jax.Array``,
  ``jax.ShapeDtypeStruct``) is restored as a ``jax.Array`` with that sharding
  and dtype, and every other leaf as Orbax's helper would (a numpy scalar,
  which that helper rejects, comes back as numpy).
  """
  ocp = import_orbax()
  numpy_args = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)
  sharding = lambda x: getattr(x, 'sharding', None)
  leaves = jax.tree_util.tree_leaves(target)
  if not any(sharding(x) is not None for x in leaves):
    return jax.tree_util.tree_map(numpy_args, target)

  def leaf_args(x):
    if isinstance(x, np.generic):
      return numpy_args(x)
    return ocp.checkpoint_utils.construct_restore_args(
        x, sharding(x), set_global_shape=False)

  return jax.tree_util.tree_map(leaf_args, target)


def construct_transformations(target: Any, transforms: dict | None) -> dict:
  """``transforms`` if given, else a fallback transform for each None leaf."""
  if transforms is not None:
    return transforms
  ocp = import_orbax()
  flat = ocp.utils.to_flat_dict(target, sep='/', keep_empty_nodes=True)
  return {k: ocp.Transform(use_fallback=True)
          for k, v in flat.items() if v is None}


def restore_with_orbax(path: str, target: Any, orbax_checkpointer=None,
                       orbax_transforms: dict | None = None) -> Any:
  """Restores the Orbax checkpoint directory ``path``.

  Args:
    path: an Orbax checkpoint directory (:func:`is_orbax_checkpoint`).
    target: None to get Orbax's tree as a state dict (nested dicts; jax
      arrays come back as ``jax.Array``, numpy as numpy), or an object whose
      structure, shardings and types the result takes (via
      :func:`restore_args_from_target` and ``lib.serialization
      .from_state_dict``).
    orbax_checkpointer: the checkpointer to read with; default
      ``ocp.Checkpointer(ocp.PyTreeCheckpointHandler())``. An asynchronous
      one is waited for first.
    orbax_transforms: Orbax transformations for a PyTree handler; default:
      fall back to the checkpoint's value for each None leaf of ``target``.

  Raises:
    ImportError: orbax-checkpoint is not installed.
  """
  ocp = import_orbax()
  if orbax_checkpointer is None:
    orbax_checkpointer = _default_checkpointer(ocp)
  _wait(orbax_checkpointer)
  kwargs = {}
  if target is not None:
    kwargs['restore_args'] = restore_args_from_target(target)
    if isinstance(_handler(orbax_checkpointer), ocp.PyTreeCheckpointHandler):
      kwargs['transforms'] = construct_transformations(target,
                                                       orbax_transforms)
  restored = orbax_checkpointer.restore(path, item=target, **kwargs)
  restored = serialization.to_state_dict(restored)
  if target is None:
    return restored
  return serialization.from_state_dict(target, restored)
