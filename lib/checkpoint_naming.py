"""Checkpoint file names: paths, natural sort, listing, retention, overwrite.

Everything here works on names only (no array I/O), with flax's exact rules:

* A checkpoint of ``step`` in ``ckpt_dir`` is ``<ckpt_dir>/<prefix><step>``
  with ``str(step)`` (``5``, ``5.0``, ``1e-05``); a save first writes
  ``<ckpt_dir>/<prefix>tmp``.
* Names sort "naturally": numeric substrings compare as numbers.

  >>> natural_sort(['ckpt_10', 'ckpt_9', 'ckpt_1.0e1', 'ckpt_-2'])
  ['ckpt_-2', 'ckpt_9', 'ckpt_10', 'ckpt_1.0e1']
  >>> safe_normpath('gs://bucket//a/./b/')
  'gs://bucket/a/b'

* A name that starts with the prefix but holds no number (``checkpoint_best``)
  sorts after every numbered one.

Listing uses glob matching of ``<prefix>*`` (``pathlib.PurePath.match``), so
glob characters in a prefix are live, as in flax.
"""

import logging
import os
import pathlib
import re
import shutil
from typing import Iterable

from gintrain.lib import errors

__all__ = [
    'SIGNED_FLOAT_RE',
    'UNSIGNED_FLOAT_RE',
    'MODULE_NUM_RE',
    'SCHEME_RE',
    'MP_ARRAY_POSTFIX',
    'ORBAX_TMP_DIR_SUFFIX',
    'natural_sort',
    'safe_normpath',
    'checkpoint_path',
    'checkpoint_path_step',
    'get_checkpoint_paths',
    'all_checkpoints',
    'remove_invalid_checkpoints',
    'check_overwrite',
]

# A number with an optional captured sign, e.g. '-1.5e3', '+2', '.5'.
SIGNED_FLOAT_RE = re.compile(
    r'([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)')
# The same, but the sign is matched outside the group (dropped by re.split).
UNSIGNED_FLOAT_RE = re.compile(
    r'[-+]?((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)')
# A pre-Linen module name: '<name>_<counter>'.
MODULE_NUM_RE = re.compile(r'(.*)_\d+$')
# An optional URL scheme such as 'gs://' in front of a path.
SCHEME_RE = re.compile(
    '^(?P<scheme>[a-z][a-z0-9.+-]+://)?(?P<path>.*)', re.I)

# Sibling directory '<checkpoint>_gda' holding multi-process arrays.
MP_ARRAY_POSTFIX = '_gda'
# Orbax's marker for directories still being written
# (orbax.checkpoint.utils.TMP_DIR_SUFFIX).
ORBAX_TMP_DIR_SUFFIX = '.orbax-checkpoint-tmp'

_TMP_STEP = 'tmp'


def natural_sort(file_list: Iterable[str], signed: bool = True) -> list[str]:
  """Sorts names so that numeric substrings compare as numbers.

  Each name is split on numbers; pieces that start with a number become
  floats, the others stay strings, and the piece lists are compared.

  >>> natural_sort(['f_1_10', 'f_1_2', 'f_0.01', 'f_1e-05'])
  ['f_1e-05', 'f_0.01', 'f_1_2', 'f_1_10']

  Args:
    file_list: names or paths.
    signed: whether a leading ``-``/``+`` belongs to the number. If False the
      sign is treated as a separator (``f_-1`` sorts like ``f_1``).

  Returns:
    A new sorted list (stable: equal keys such as ``5`` and ``5.0`` keep
    their input order).
  """
  float_re = SIGNED_FLOAT_RE if signed else UNSIGNED_FLOAT_RE

  def key(name):
    return [float(p) if float_re.match(p) else p for p in float_re.split(name)]

  return sorted(file_list, key=key)


def safe_normpath(path: str) -> str:
  """``os.path.normpath`` that keeps a leading URL scheme such as ``gs://``.

  >>> safe_normpath('./a/b/c'), safe_normpath('/a/../b/c'), safe_normpath('')
  ('a/b/c', '/b/c', '.')
  """
  match = SCHEME_RE.match(path)
  return (match.group('scheme') or '') + os.path.normpath(match.group('path'))


def checkpoint_path(ckpt_dir: str, step, prefix: str = 'checkpoint_') -> str:
  """``<ckpt_dir>/<prefix><step>`` with ``str(step)``, as flax names files."""
  return os.path.join(ckpt_dir, f'{prefix}{step}')


def checkpoint_path_step(path: str) -> float | None:
  """The last number in the whole path (directories included), or None.

  >>> checkpoint_path_step('/r1/checkpoint_2.5'), checkpoint_path_step('/a1/ck')
  (2.5, 1.0)
  """
  for piece in reversed(SIGNED_FLOAT_RE.split(path)):
    if SIGNED_FLOAT_RE.match(piece):
      return float(piece)
  return None


def get_checkpoint_paths(
    ckpt_dir: str | os.PathLike, step, prefix: str = 'checkpoint_'
) -> tuple[str, str, str]:
  """``(final_path, tmp_path, base_path)`` of a save into ``ckpt_dir``.

  The directory is normalised first (``dir//`` and ``./dir`` both work).

  >>> get_checkpoint_paths('ckpts//', 3, 'ck_')
  ('ckpts/ck_3', 'ckpts/ck_tmp', 'ckpts/ck_')
  """
  ckpt_dir = safe_normpath(os.fspath(ckpt_dir))
  return (checkpoint_path(ckpt_dir, step, prefix),
          checkpoint_path(ckpt_dir, _TMP_STEP, prefix),
          os.path.join(ckpt_dir, prefix))


def _listdir_or_empty(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except FileNotFoundError:
    return []


def _matching_paths(dir_path: str, prefix: str) -> list[str]:
  """Entries of ``dir_path`` matching ``<prefix>*`` except ``*_gda``."""
  paths = []
  for name in _listdir_or_empty(dir_path):
    pure = pathlib.PurePath(name)
    if pure.match(f'{prefix}*') and not pure.match(f'*{MP_ARRAY_POSTFIX}'):
      paths.append(os.path.join(dir_path, name))
  return paths


def all_checkpoints(ckpt_dir: str | os.PathLike,
                    prefix: str = 'checkpoint_') -> list[str]:
  """Naturally sorted checkpoint paths in ``ckpt_dir`` (``[]`` if missing).

  Skips ``<prefix>tmp`` (an interrupted save), ``*_gda`` array directories
  and Orbax's ``*.orbax-checkpoint-tmp*`` directories.
  """
  ckpt_dir = os.fspath(ckpt_dir)
  paths = []
  for name in _listdir_or_empty(ckpt_dir):
    pure = pathlib.PurePath(name)
    if (pure.match(f'{prefix}*') and not pure.match(f'{prefix}{_TMP_STEP}')
        and not pure.match(f'*{MP_ARRAY_POSTFIX}')
        and not pure.match(f'*{ORBAX_TMP_DIR_SUFFIX}*')):
      paths.append(os.path.join(ckpt_dir, name))
  return natural_sort(paths)


def _remove_path(path: str):
  if os.path.isdir(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def _remove_checkpoint(path: str, has_mpa: bool):
  logging.info('Removing checkpoint at %s', path)
  if has_mpa and os.path.exists(path + MP_ARRAY_POSTFIX):
    shutil.rmtree(path + MP_ARRAY_POSTFIX)
  _remove_path(path)


def remove_invalid_checkpoints(
    ckpt_path: str, base_path: str, keep: int, overwrite: bool,
    keep_every_n_steps: int | float | None, has_mpa: bool) -> list[str]:
  """Applies flax's retention rules after ``ckpt_path`` was committed.

  1. With ``overwrite`` every checkpoint sorting after ``ckpt_path`` is
     deleted.
  2. Of the rest, all but the newest ``keep`` are deleted (``keep=0`` deletes
     nothing), except that with ``keep_every_n_steps`` the oldest candidate
     whose step is at least ``keep_every_n_steps`` above the last protected
     one is protected (steps parsed from the whole path; step 0 is never
     protected).

  Args:
    ckpt_path: the checkpoint just written.
    base_path: ``<dir>/<prefix>``.
    keep: number of newest checkpoints to keep.
    overwrite: whether newer checkpoints are deleted.
    keep_every_n_steps: protect one old checkpoint every that many steps.
    has_mpa: also delete each removed checkpoint's ``<path>_gda`` directory.

  Returns:
    The deleted paths, oldest first.
  """
  dir_path, prefix = os.path.split(base_path)
  paths = natural_sort(_matching_paths(dir_path, prefix))
  removed = []
  if overwrite and ckpt_path in paths:
    end = paths.index(ckpt_path) + 1
    for path in paths[end:]:
      _remove_checkpoint(path, has_mpa)
      removed.append(path)
    paths = paths[:end]
  if len(paths) > keep:
    last_kept = -float('inf')
    for path in paths[:-keep]:
      if keep_every_n_steps:
        step = checkpoint_path_step(path)
        if step and step - last_kept >= keep_every_n_steps:
          last_kept = step
          continue
      _remove_checkpoint(path, has_mpa)
      removed.append(path)
  return removed


def check_overwrite(ckpt_tmp_path: str, ckpt_path: str, base_path: str, step):
  """Raises unless ``ckpt_path`` would be the newest checkpoint.

  A stale ``<prefix>tmp`` from an interrupted save is ignored; checkpoints of
  other prefixes and ``*_gda`` directories never conflict.

  Raises:
    gintrain.lib.errors.InvalidCheckpointError: ``ckpt_path`` exists already, or some
      checkpoint (e.g. a larger step, or ``<prefix>best``) sorts after it.
  """
  dir_path, prefix = os.path.split(base_path)
  paths = _matching_paths(dir_path, prefix)
  if ckpt_path in paths:
    raise errors.InvalidCheckpointError(ckpt_path, step)
  paths = natural_sort(paths + [ckpt_path])
  if paths[-1] == ckpt_tmp_path:
    paths.pop()
  if paths[-1] != ckpt_path:
    raise errors.InvalidCheckpointError(ckpt_path, step)
