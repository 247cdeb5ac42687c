"""Checkpoint file names: paths, natural sort, listing, retention, overwrite.

Everything here works on names only (no array I/O), with flax's exact rules:

* A checkpoint of ``step`` in ``ckpt_dir`` is ``<ckpt_dir>/<prefix><step>``
  with ``str(step)`` (``5``, ``5.0``, ``1e-05``).
* A save first writes a temporary file of its own, created exclusively:
  ``<ckpt_dir>/.<prefix>tmp-<host>-<pid>-<random>`` (:func:`new_tmp_path`),
  so that two writers on one directory (a job launched twice, every host of
  a shared filesystem) never write into each other's file. flax's single
  ``<prefix>tmp`` name is still recognised (and ignored) when listing.
  Listing and retention ignore every writer's temporaries; a save removes
  those of crashed writers only (:func:`remove_stale_tmp_files`): ones whose
  process is known to be dead (same host and pid namespace), or untouched
  for :data:`STALE_TMP_SECONDS` (6 hours).
* A prefix is a file name prefix: it may hold no path separator and must not
  be empty (:func:`validate_prefix`).
* Retention deletes only regular files and directories (never symlinks,
  FIFOs, sockets or devices, and never follows a link).
* Names sort "naturally": numeric substrings compare as numbers.

  >>> natural_sort(['ckpt_10', 'ckpt_9', 'ckpt_1.0e1', 'ckpt_-2'])
  ['ckpt_-2', 'ckpt_9', 'ckpt_10', 'ckpt_1.0e1']
  >>> safe_normpath('gs://bucket//a/./b/')
  'gs://bucket/a/b'

* A name that starts with the prefix but holds no number (``checkpoint_best``)
  sorts after every numbered one.

Listing uses glob matching of ``<prefix>*`` (``pathlib.PurePath.match``), so
glob characters in a prefix are live, as in flax.

* A checkpoint may have an integrity sidecar, ``<dir>/.<name>.xxh3``
  (:func:`sidecar_path`): never listed as a checkpoint, deleted with its
  checkpoint by retention.
* Directories given as URLs (``s3://``, ``gs://``, ``memory://``; see
  ``lib.storage``) are listed and pruned through fsspec with the same
  rules; local paths stay on the ``os`` functions.
"""

import hashlib
import logging
import os
import pathlib
import re
import secrets
import shutil
import stat
import time
from typing import Iterable

from gintrain.lib import errors
from gintrain.lib import storage

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
    'validate_prefix',
    'new_tmp_path',
    'is_tmp_name',
    'remove_stale_tmp_files',
    'STALE_TMP_SECONDS',
    'SIDECAR_SUFFIX',
    'sidecar_path',
    'is_sidecar_name',
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
# ``.<checkpoint name><SIDECAR_SUFFIX>``: the checkpoint file's hash.
SIDECAR_SUFFIX = '.xxh3'
# A temporary file (or its ``_gda`` directory) untouched for this long
# belongs to a crashed writer and is removed by the next save.
STALE_TMP_SECONDS = 6 * 3600
# flax's own ``<prefix>tmp``: flax overwrites and renames it away at its next
# save; ours removes one untouched for this long (a writer writes it at once).
FLAX_TMP_SECONDS = 60
# ``.<prefix>tmp-<host id>-<pid>-<random>`` (+ ``_gda`` for array dirs).
_TMP_NAME_RE = re.compile(
    r'\.(?P<prefix>.*)tmp-(?P<host>[0-9a-f]{16})-(?P<pid>[0-9]+)-[0-9a-f]{8}'
    r'(?:_gda)?')


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding='ascii') as f:
      return f.read().strip()
  except (OSError, UnicodeDecodeError):
    return None


def _compute_host_id() -> str | None:
  """An id of this kernel boot and pid namespace (None if unknown).

  Two processes with the same id see the same pids, so a writer can tell
  that another writer's process is dead.
  """
  boot_id = _read_text('/proc/sys/kernel/random/boot_id')
  try:
    pid_ns = os.readlink('/proc/self/ns/pid')
  except OSError:
    pid_ns = None
  if not boot_id or not pid_ns:
    return None
  return hashlib.sha256(f'{boot_id} {pid_ns}'.encode()).hexdigest()[:16]


_HOST_ID = _compute_host_id()
_UNKNOWN_HOST_ID = '0' * 16


def validate_prefix(prefix: str) -> str:
  """Returns ``prefix`` if it is a valid checkpoint file name prefix.

  >>> validate_prefix('checkpoint_')
  'checkpoint_'

  Raises:
    ValueError: the prefix is empty, not a str, or holds a path separator
      or a NUL character (it could name files outside the directory).
  """
  if not isinstance(prefix, str) or not prefix:
    raise ValueError(
        f'Invalid checkpoint prefix {prefix!r}: it must be a non-empty str.')
  seps = {'/', '\0', os.sep, os.altsep} - {None}
  if any(c in prefix for c in seps) or prefix in ('.', '..'):
    raise ValueError(
        f'Invalid checkpoint prefix {prefix!r}: a prefix is part of a file'
        ' name and may hold no path separator; put directories in ckpt_dir.')
  return prefix


def new_tmp_path(dir_path: str, prefix: str, token: str | None = None) -> str:
  """A fresh temporary path for one save: ``<dir>/.<prefix>tmp-<token>``.

  Args:
    dir_path: the checkpoint directory.
    prefix: the checkpoint prefix.
    token: ``<host>-<pid>-<random>`` (:func:`new_tmp_token`); a new one if
      None.
  """
  token = token or new_tmp_token()
  return os.path.join(dir_path, f'.{prefix}{_TMP_STEP}-{token}')


def new_tmp_token() -> str:
  """``<host id>-<pid>-<8 random hex digits>``: unique per writer and save."""
  return (f'{_HOST_ID or _UNKNOWN_HOST_ID}-{os.getpid()}-'
          f'{secrets.token_hex(4)}')


def is_tmp_name(name: str, prefix: str | None = None) -> bool:
  """Whether ``name`` is a save's temporary (ours or flax's ``<prefix>tmp``).

  >>> is_tmp_name('.ck_tmp-0123456789abcdef-42-89abcdef', 'ck_')
  True
  >>> is_tmp_name('ck_tmp_gda', 'ck_'), is_tmp_name('ck_12', 'ck_')
  (True, False)

  Args:
    name: a file name (no directory).
    prefix: only temporaries of this prefix; None: of any prefix (flax's
      ``<prefix>tmp`` is then not recognised).
  """
  match = _TMP_NAME_RE.fullmatch(name)
  if match and (prefix is None or match.group('prefix') == prefix):
    return True
  return prefix is not None and name in (
      f'{prefix}{_TMP_STEP}', f'{prefix}{_TMP_STEP}{MP_ARRAY_POSTFIX}')


def sidecar_path(ckpt_path: str) -> str:
  """The integrity sidecar of a checkpoint file: ``<dir>/.<name>.xxh3``.

  >>> sidecar_path('/r/checkpoint_5'), sidecar_path('s3://b/r/checkpoint_5')
  ('/r/.checkpoint_5.xxh3', 's3://b/r/.checkpoint_5.xxh3')
  """
  head, _, name = ckpt_path.rpartition('/')
  return f'{head}/.{name}{SIDECAR_SUFFIX}' if head or _ else (
      f'.{name}{SIDECAR_SUFFIX}')


def is_sidecar_name(name: str) -> bool:
  """Whether ``name`` is a checkpoint's integrity sidecar."""
  return name.startswith('.') and name.endswith(SIDECAR_SUFFIX)


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
  ``tmp_path`` is flax's temporary name, which the overwrite check ignores;
  saves write to a unique :func:`new_tmp_path` instead.

  >>> get_checkpoint_paths('ckpts//', 3, 'ck_')
  ('ckpts/ck_3', 'ckpts/ck_tmp', 'ckpts/ck_')

  Raises:
    ValueError: an invalid prefix (:func:`validate_prefix`).
    gintrain.lib.storage.StorageError: a URL of an unknown store, or of
      one whose package is not installed.
  """
  validate_prefix(prefix)
  ckpt_dir = safe_normpath(storage.check(os.fspath(ckpt_dir)))
  return (checkpoint_path(ckpt_dir, step, prefix),
          checkpoint_path(ckpt_dir, _TMP_STEP, prefix),
          os.path.join(ckpt_dir, prefix))


def is_orbax_dir(path: str) -> bool:
  """Whether ``path`` (a local path or URL) is an Orbax checkpoint
  directory: it holds a ``checkpoint``, ``_METADATA`` or ``manifest.ocdbt``
  entry (flax's test)."""
  return storage.isdir(path) and any(
      storage.exists(storage.join(path, name))
      for name in ('checkpoint', '_METADATA', 'manifest.ocdbt'))


def _listdir_or_empty(path: str) -> list[str]:
  return storage.listdir(path)


def _matching_paths(dir_path: str, prefix: str) -> list[str]:
  """Entries of ``dir_path`` matching ``<prefix>*`` except ``*_gda``.

  Every writer's temporaries (``<prefix>tmp`` too) are left out: retention
  never deletes a file another writer is still writing.
  """
  paths = []
  for name in _listdir_or_empty(dir_path):
    pure = pathlib.PurePath(name)
    if (pure.match(f'{prefix}*') and not pure.match(f'*{MP_ARRAY_POSTFIX}')
        and not pure.match(f'{prefix}{_TMP_STEP}')
        and not is_tmp_name(name) and not is_sidecar_name(name)):
      paths.append(os.path.join(dir_path, name))
  return paths


def all_checkpoints(ckpt_dir: str | os.PathLike,
                    prefix: str = 'checkpoint_') -> list[str]:
  """Naturally sorted checkpoint paths in ``ckpt_dir`` (``[]`` if missing).

  Skips ``<prefix>tmp`` (flax's temporary), every writer's
  ``.<prefix>tmp-*`` temporaries, ``*_gda`` array directories and Orbax's
  ``*.orbax-checkpoint-tmp*`` directories.
  """
  ckpt_dir = storage.check(os.fspath(ckpt_dir))
  paths = []
  for name in _listdir_or_empty(ckpt_dir):
    pure = pathlib.PurePath(name)
    if (pure.match(f'{prefix}*') and not pure.match(f'{prefix}{_TMP_STEP}')
        and not pure.match(f'*{MP_ARRAY_POSTFIX}')
        and not pure.match(f'*{ORBAX_TMP_DIR_SUFFIX}*')
        and not is_tmp_name(name) and not is_sidecar_name(name)):
      paths.append(os.path.join(ckpt_dir, name))
  return natural_sort(paths)


def _lstat_or_none(path: str) -> os.stat_result | None:
  try:
    return os.lstat(path)
  except FileNotFoundError:
    return None


def _remove_path(path: str, st: os.stat_result | None = None) -> bool:
  """Removes a regular file or a directory tree (links are not followed).

  Returns False, leaving it in place, for anything else (a symlink, FIFO,
  socket or device): retention deletes checkpoints, nothing else.
  """
  st = st or _lstat_or_none(path)
  if st is None:
    return False
  if stat.S_ISDIR(st.st_mode):
    shutil.rmtree(path)  # does not follow symlinks inside the tree
  elif stat.S_ISREG(st.st_mode):
    os.remove(path)
  else:
    logging.warning('Not removing "%s": it is not a regular file or'
                    ' directory, so not a checkpoint.', path)
    return False
  return True


def _remove_url_checkpoint(path: str, has_mpa: bool) -> bool:
  """Removes an object-store checkpoint (file or directory), its ``_gda``
  directory (``has_mpa``) and its sidecar."""
  if has_mpa:
    storage.rmtree(path + MP_ARRAY_POSTFIX)
  try:
    storage.remove(sidecar_path(path))
  except FileNotFoundError:
    pass
  try:
    if storage.isdir(path):
      storage.rmtree(path)
    else:
      storage.remove(path)
  except FileNotFoundError:
    return False
  return True


def _remove_checkpoint(path: str, has_mpa: bool) -> bool:
  logging.info('Removing checkpoint at %s', path)
  if storage.local_file(path) is None:
    return _remove_url_checkpoint(path, has_mpa)
  sidecar = sidecar_path(path)
  sidecar_st = _lstat_or_none(sidecar)
  if sidecar_st is not None and stat.S_ISREG(sidecar_st.st_mode):
    os.remove(sidecar)
  if has_mpa:
    mpa_st = _lstat_or_none(path + MP_ARRAY_POSTFIX)
    if mpa_st is not None and stat.S_ISDIR(mpa_st.st_mode):
      shutil.rmtree(path + MP_ARRAY_POSTFIX)
  return _remove_path(path)


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

  Only regular files and directories are deleted (:func:`_remove_path`);
  other writers' temporaries are never candidates.

  Returns:
    The deleted paths, oldest first.

  Raises:
    ValueError: an invalid prefix (:func:`validate_prefix`).
  """
  dir_path, prefix = os.path.split(base_path)
  validate_prefix(prefix)
  paths = natural_sort(_matching_paths(dir_path, prefix))
  removed = []
  if overwrite and ckpt_path in paths:
    end = paths.index(ckpt_path) + 1
    for path in paths[end:]:
      if _remove_checkpoint(path, has_mpa):
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
      if _remove_checkpoint(path, has_mpa):
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


def _newest_mtime(path: str, st: os.stat_result) -> float:
  """The newest mtime in a tree (links not followed)."""
  newest = st.st_mtime
  if stat.S_ISDIR(st.st_mode):
    for root, dirs, files in os.walk(path):
      for name in dirs + files:
        try:
          newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
        except OSError:
          pass
  return newest


def _writer_is_dead(name: str) -> bool:
  """True only if ``name``'s writer ran here (same pids) and has exited."""
  match = _TMP_NAME_RE.fullmatch(name)
  if not match or _HOST_ID is None or match.group('host') != _HOST_ID:
    return False
  try:
    os.kill(int(match.group('pid')), 0)
  except ProcessLookupError:
    return True
  except (OSError, OverflowError):
    return False
  return False


def remove_stale_tmp_files(dir_path: str, prefix: str,
                           max_age: float = STALE_TMP_SECONDS) -> list[str]:
  """Removes temporaries of ``prefix`` left in ``dir_path`` by dead writers.

  A temporary (``.<prefix>tmp-*``, flax's ``<prefix>tmp``, and their
  ``_gda`` directories) is removed if its writer ran on this machine, in this
  pid namespace, and its process no longer exists; or if nothing in it was
  modified for ``max_age`` seconds (a live writer keeps writing or commits
  within minutes); flax's ``<prefix>tmp`` (writer unknown) once untouched
  for :data:`FLAX_TMP_SECONDS` (flax's next save would overwrite it). Only regular files and directories are removed. Errors
  are logged, never raised: this is housekeeping after a committed save.

  Object-store directories are skipped (their uploads are never visible
  before they complete).

  Returns:
    The removed paths.
  """
  removed = []
  if storage.local_file(dir_path) is None:
    return removed
  now = time.time()
  for name in _listdir_or_empty(dir_path):
    if not is_tmp_name(name, prefix):
      continue
    path = os.path.join(dir_path, name)
    try:
      st = os.lstat(path)
      if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        continue
      age = (min(max_age, FLAX_TMP_SECONDS) if name in (
          f'{prefix}{_TMP_STEP}', f'{prefix}{_TMP_STEP}{MP_ARRAY_POSTFIX}')
             else max_age)
      if not (_writer_is_dead(name) or now - _newest_mtime(path, st) > age):
        continue
      logging.info('Removing the temporary file of a dead writer: %s', path)
      if _remove_path(path, st):
        removed.append(path)
    except FileNotFoundError:
      pass  # another writer cleaned it up
    except OSError as e:
      logging.warning('Could not remove stale temporary "%s": %s', path, e)
  return removed
