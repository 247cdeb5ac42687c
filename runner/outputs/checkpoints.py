"""Checkpoint policy, resume, keep-best and weights-only init for the loop.

A run's checkpoints live in ``<workdir>/checkpoints/<prefix><step>`` (the
flax msgpack format of ``lib.checkpoints``); with keep-best on, the best ones
(by an eval metric) live in ``<workdir>/best_checkpoints/``. The trainer's
tree in each::

    {'state': TrainState,          # step, params, opt_state, model_state
     'data': {...},                # the data source's position (get_state)
     'early_stopping': ...,        # each checkpointed action's state, under
     'best': {'steps', 'values'}}  # its checkpoint_key

Restored trees are checked against the model before use: a missing or extra
leaf, or a shape or dtype mismatch, is a :class:`RunnerError` naming the
leaves. Loading never executes code (msgpack, no pickle).
"""

import concurrent.futures
import dataclasses
import os
import re
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints
from gintrain.lib import multiprocess_arrays
from gintrain.lib import orbax_delegation
from gintrain.lib import serialization
from gintrain.lib import storage
from gintrain.runner.parallel import distributed
from gintrain.runner.errors import RunnerError

__all__ = ['CheckpointPolicy', 'Checkpointer', 'check_tree', 'load_params',
           'InitFrom', 'InitReport', 'select_params',
           'read_runner_checkpoint', 'read_arrays',
           'CHECKPOINT_DIR', 'BEST_DIR', 'CORRUPT_DIR']

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best_checkpoints'
# Where a resume moves checkpoints that do not read back (kept, not deleted).
CORRUPT_DIR = 'corrupt_checkpoints'
_MODES = ('min', 'max')
# How long a sharded save waits for the slowest process's shards.
_BARRIER_TIMEOUT_S = 600


def _is_int(value, minimum):
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= minimum)


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
  """When and what to save.

  Attributes:
    every_steps: save every this many steps (0: only the final checkpoint,
      and on preemption).
    keep: how many recent checkpoints to keep (0: all).
    keep_every_n_steps: also keep one checkpoint per this many steps (None:
      off), as ``lib.checkpoints.save_checkpoint``'s argument.
    best_metric: an eval metric (e.g. ``'accuracy'``) whose best values
      keep their checkpoints in ``best_checkpoints/`` (None: off).
    best_mode: ``'min'`` or ``'max'``: which end of ``best_metric`` is best.
    keep_best: how many best checkpoints to keep.
    async_save: write checkpoint files in a background thread.
    prefix: file name prefix of the checkpoints.
  """
  every_steps: int = 0
  keep: int = 3
  keep_every_n_steps: int | None = None
  best_metric: str | None = None
  best_mode: str = 'min'
  keep_best: int = 1
  async_save: bool = True
  prefix: str = 'checkpoint_'

  def __post_init__(self):
    checks = [
        ('every_steps', _is_int(self.every_steps, 0), 'an integer >= 0'),
        ('keep', _is_int(self.keep, 0), 'an integer >= 0'),
        ('keep_every_n_steps', self.keep_every_n_steps is None or
         _is_int(self.keep_every_n_steps, 1), 'None or an integer >= 1'),
        ('best_metric', self.best_metric is None or
         (isinstance(self.best_metric, str) and self.best_metric),
         'None or a metric name'),
        ('best_mode', self.best_mode in _MODES, "'min' or 'max'"),
        ('keep_best', _is_int(self.keep_best, 1), 'an integer >= 1'),
        ('async_save', isinstance(self.async_save, bool), 'True or False'),
        ('prefix', isinstance(self.prefix, str) and self.prefix and
         '/' not in self.prefix and not self.prefix[-1].isdigit(),
         'a non-empty file name prefix not ending in a digit'),
    ]
    for name, ok, want in checks:
      if not ok:
        raise RunnerError(f'checkpoint_policy.{name} must be {want}, got'
                          f' {getattr(self, name)!r}.')


def _describe(leaf):
  return f'{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}'


def _flatten(tree, prefix=''):
  """``{'a/b': leaf}`` of a state dict (dicts only; leaves are the rest)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}/'))
    return out
  return {prefix.rstrip('/'): tree}


def check_tree(expected, restored, what: str, against: str = 'the model',
               hint: str = '') -> None:
  """Raises naming every leaf of ``restored`` that does not fit ``expected``.

  Both are state dicts (``lib.serialization.to_state_dict`` output).
  Array-like leaves must agree in shape and dtype.

    >>> import numpy as np
    >>> check_tree({'w': np.zeros(2)}, {'w': np.ones(2)}, 'x')
    >>> check_tree({'w': np.zeros(2)}, {'w': np.zeros(3)}, 'ckpt')
    Traceback (most recent call last):
    ...
    gintrain.runner.errors.RunnerError: ckpt does not match the model: w: float64[3] in the checkpoint, float64[2] expected.

  Raises:
    RunnerError: ``<what> does not match <against>: <leaf>: ...; ...``
      followed by ``hint``.
  """
  want, got = _flatten(expected), _flatten(restored)
  faults = []
  for key in want:
    if key not in got:
      faults.append(f'{key}: missing from the checkpoint')
      continue
    w, g = want[key], got[key]
    if hasattr(w, 'dtype') and hasattr(w, 'shape'):
      if not (hasattr(g, 'dtype') and hasattr(g, 'shape')):
        faults.append(f'{key}: {type(g).__name__} in the checkpoint,'
                      f' {_describe(w)} expected')
      elif np.shape(w) != np.shape(g) or np.dtype(w.dtype) != np.dtype(
          g.dtype):
        faults.append(f'{key}: {_describe(g)} in the checkpoint,'
                      f' {_describe(w)} expected')
  faults += [f'{key}: not in the model' for key in got if key not in want]
  if faults:
    shown = '; '.join(faults[:6])
    more = f'; and {len(faults) - 6} more' if len(faults) > 6 else ''
    raise RunnerError(f'{what} does not match {against}: {shown}{more}.'
                      + (f' {hint}' if hint else ''))


def _read(path: str):
  """The raw tree of the checkpoint file ``path``; arrays saved as sharded
  files (``<path>_gda``) are left as placeholders (see :func:`read_arrays`)."""
  try:
    return checkpoint_io.read_checkpoint_file(path)
  except (OSError, ValueError, ImportError) as e:
    raise RunnerError(f'cannot read checkpoint {path}: {e}') from e


def read_arrays(path: str, tree: Any, shardings: Any = None,
                step: int | None = None) -> Any:
  """``tree`` (read from checkpoint ``path``) with the arrays its writer
  saved as sharded files (``<path>_gda``, multi-process runs) read in.

  Args:
    path: the checkpoint file.
    tree: its raw tree (or a subtree, with ``shardings`` to match).
    shardings: a tree of ``jax.sharding.Sharding`` with the structure of
      the model's state (e.g. a partitioner's ``shardings``): each process
      reads only the slices its devices hold, whatever mesh or process
      count wrote the checkpoint. None: whole arrays on the host (numpy).

  Raises:
    RunnerError: the array files are missing or do not fit.
  """
  import jax  # pylint: disable=g-import-not-at-top
  to_host = shardings is None
  if to_host:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, tree)
  try:
    out = multiprocess_arrays.read_arrays(
        tree, path, serialization.to_state_dict(shardings), step)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, RunnerError):
      raise
    raise RunnerError(f'cannot read the sharded arrays of checkpoint {path}'
                      f' ({multiprocess_arrays.array_dir(path)}):'
                      f' {" ".join(str(e).split())}') from e
  return jax.device_get(out) if to_host and out is not tree else out


@dataclasses.dataclass(frozen=True)
class InitFrom:
  """Where ``--init_from`` loads weights from, and which ones.

  Paths are the ``'/'``-joined keys of a parameter, e.g.
  ``'Dense_1/kernel'``. A checkpoint leaf is first renamed by the first
  ``rename`` pair whose pattern it matches (``re.sub``); a model leaf is
  loaded when its path matches some ``include`` pattern and no ``exclude``
  pattern (``re.search``: anchor with ``^``/``$`` for whole names), and is
  left at its initial value otherwise.

  Attributes:
    path: a checkpoint file, a directory of ``checkpoint_*`` files, or a
      run's workdir.
    include: regular expressions; leaves to load (default: all).
    exclude: regular expressions; leaves to leave at their initial value.
    rename: ``(pattern, replacement)`` pairs applied to checkpoint paths,
      giving the model path each loads into.
  """
  path: str
  include: tuple = ('.*',)
  exclude: tuple = ()
  rename: tuple = ()

  def __post_init__(self):
    for name in ('include', 'exclude'):
      patterns = getattr(self, name)
      if isinstance(patterns, str):
        patterns = (patterns,)
      object.__setattr__(self, name, tuple(
          _compile(f'init_from.{name}', p) for p in patterns))
    pairs = []
    for pair in ((self.rename,) if _is_pair(self.rename) else self.rename):
      if not _is_pair(pair):
        raise RunnerError('init_from.rename must be a list of (pattern,'
                          f' replacement) pairs, got {self.rename!r}.')
      pairs.append((_compile('init_from.rename', pair[0]), pair[1]))
    object.__setattr__(self, 'rename', tuple(pairs))

  def __str__(self):
    return self.path


def _is_pair(x):
  return (isinstance(x, (tuple, list)) and len(x) == 2 and
          all(isinstance(s, str) for s in x))


def _compile(what, pattern):
  if isinstance(pattern, re.Pattern):
    return pattern
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise RunnerError(f'{what}: {pattern!r} is not a regular expression'
                      f' ({e}).') from None


@dataclasses.dataclass
class InitReport:
  """What :func:`load_params` did (paths as in :class:`InitFrom`).

  Attributes:
    path: the checkpoint file read.
    loaded: ``{model path: checkpoint path}`` of the leaves loaded.
    initial: model paths left at their initial value.
    unused: checkpoint paths that were not loaded.
  """
  path: str
  loaded: dict
  initial: list
  unused: list

  def lines(self) -> list[str]:
    """The report, as log lines."""
    def names(paths):
      return ', '.join(paths) if paths else '(none)'
    renamed = [f'{m} <- {c}' if m != c else m for m, c in self.loaded.items()]
    return [f'init_from {self.path}: loaded {len(self.loaded)} leaves:'
            f' {names(renamed)}',
            f'init_from {self.path}: left at their initial value'
            f' ({len(self.initial)}): {names(self.initial)}',
            f'init_from {self.path}: unused in the checkpoint'
            f' ({len(self.unused)}): {names(self.unused)}']


def _checkpoint_params(path: str, flag: str):
  """``(file, raw params tree)`` of the checkpoint at ``path``."""
  if not os.path.exists(path):
    raise RunnerError(f'{flag}={path}: no such file or directory.')
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    path = os.path.join(path, CHECKPOINT_DIR)  # a run's workdir
  if os.path.isdir(path):
    if orbax_delegation.is_orbax_checkpoint(path):
      raise RunnerError(f'{flag}={path}: an Orbax checkpoint directory; give'
                        ' a msgpack checkpoint file (checkpoint_<step>), a'
                        ' folder of them, or a run\'s workdir.')
    latest = checkpoints.latest_checkpoint(path)
    if latest is None:
      looks_like_file = re.fullmatch(r'.+_\d+', os.path.basename(
          os.path.normpath(path)))
      raise RunnerError(
          f'{flag}={path}: a directory that holds no checkpoint_* file'
          + (' (a checkpoint is a file named checkpoint_<step>, not a'
             ' directory)' if looks_like_file else '') + '.')
    if os.path.isdir(latest):
      raise RunnerError(f'{flag}={latest}: a directory, not a checkpoint'
                        ' file; give the checkpoint file itself.')
    path = latest
  raw = read_arrays(path, _read(path))
  if raw is None:
    raise RunnerError(f'{flag}={path}: the directory holds no'
                      ' checkpoint_* file.')
  if isinstance(raw, dict) and isinstance(raw.get('state'), dict):
    raw = raw['state']
  if isinstance(raw, dict) and 'params' in raw and 'opt_state' in raw:
    raw = raw['params']
  return path, raw


def select_params(rules: InitFrom, params: Any, raw: Any,
                  path: str | None = None) -> tuple[Any, InitReport]:
  """``params`` with the leaves ``rules`` select replaced from ``raw``.

  Args:
    rules: the include/exclude/rename rules.
    params: the model's (initial) parameters.
    raw: the checkpoint's parameter tree (a state dict).
    path: the checkpoint file, for messages (default ``rules.path``).

  Returns:
    ``(params, report)``.

  Raises:
    RunnerError: an included leaf missing from the checkpoint, two
      checkpoint leaves renamed onto one, or a shape/dtype mismatch.
  """
  flag = f'--init_from={rules.path}'
  path = path or rules.path
  want = _flatten(serialization.to_state_dict(params))
  got = _flatten(raw)
  sources = {}  # model path -> checkpoint path
  for key in got:
    target = key
    for pattern, replacement in rules.rename:
      if pattern.search(key):
        target = pattern.sub(replacement, key)
        break
    if target in sources:
      raise RunnerError(f'{flag}: init_from.rename maps both {sources[target]}'
                        f' and {key} to {target}.')
    sources[target] = key
  loaded, initial, faults = {}, [], []
  for key, leaf in want.items():
    chosen = (any(p.search(key) for p in rules.include) and
              not any(p.search(key) for p in rules.exclude))
    if not chosen:
      initial.append(key)
    elif key not in sources:
      faults.append(f'{key}: missing from the checkpoint (exclude it with'
                    ' init_from.exclude, or map a checkpoint leaf onto it'
                    ' with init_from.rename)')
    else:
      g = got[sources[key]]
      if not (hasattr(g, 'shape') and hasattr(g, 'dtype')) or (
          np.shape(g) != np.shape(leaf) or
          np.dtype(g.dtype) != np.dtype(leaf.dtype)):
        what = _describe(g) if hasattr(g, 'dtype') else type(g).__name__
        faults.append(f'{key}: {what} in the checkpoint'
                      f'{" (as " + sources[key] + ")" if sources[key] != key else ""},'
                      f' {_describe(leaf)} expected (exclude it with'
                      ' init_from.exclude to start it afresh)')
      else:
        loaded[key] = sources[key]
  if faults:
    shown = '; '.join(faults[:6])
    more = f'; and {len(faults) - 6} more' if len(faults) > 6 else ''
    raise RunnerError(f'{flag} does not match the model: {shown}{more}.')
  used = set(loaded.values())
  unused = [key for key in got if key not in used]
  flat = {key: (got[loaded[key]] if key in loaded else leaf)
          for key, leaf in want.items()}
  report = InitReport(path, loaded, initial, unused)
  return serialization.from_state_dict(params, _unflatten(flat)), report


def _unflatten(flat: dict) -> dict:
  out = {}
  for key, leaf in flat.items():
    node = out
    parts = key.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = leaf
  return out


def load_params(init_from: 'str | InitFrom', params: Any) -> Any:
  """The parameters stored at ``init_from``, restored into ``params``.

  ``init_from`` is a path (every leaf is loaded; the checkpoint must match
  the model exactly) or an :class:`InitFrom` (its rules choose the leaves;
  the others keep their value in ``params``; what was loaded, left and
  unused is logged on process 0). The path is a checkpoint file, a
  directory whose latest ``checkpoint_*`` is used, or a run's workdir (its
  ``checkpoints/``). The checkpoint may be a runner checkpoint
  (``state/params``), a ``TrainState`` (``params``) or a bare params tree.

  Raises:
    RunnerError: nothing at the path, or parameters that do not fit.
  """
  if isinstance(init_from, InitFrom):
    path, raw = _checkpoint_params(init_from.path, '--init_from')
    out, report = select_params(init_from, params, raw, path)
    if distributed.is_main_process():
      for line in report.lines():
        logging.info('%s', line)
    return out
  _, raw = _checkpoint_params(init_from, '--init_from')
  check_tree(serialization.to_state_dict(params), raw,
             f'--init_from={init_from}')
  return serialization.from_state_dict(params, raw)


def read_runner_checkpoint(path: str) -> dict:
  """The raw tree of the runner checkpoint file ``path``.

  Raises:
    RunnerError: unreadable, or not a runner checkpoint.
  """
  raw = _read(path)
  if not isinstance(raw, dict) or not isinstance(raw.get('state'), dict):
    raise RunnerError(f'{path} is not a runner checkpoint (no "state"'
                      ' entry).')
  return raw


class Checkpointer:
  """Saves and reads a run's checkpoints as ``policy`` says.

  All processes call every method in the same order (multi-process saves
  synchronise); only process 0 writes files. What a checkpoint holds is the
  caller's tree (see the module doc); this class owns where and when.
  """

  def __init__(self, workdir: str, policy: CheckpointPolicy):
    self.policy = policy
    self.dir = os.path.join(workdir, CHECKPOINT_DIR)
    self.best_dir = os.path.join(workdir, BEST_DIR)
    self._saved_steps: set = set()
    self.saves = 0  # files written (or started, when async) so far
    self._async = checkpoints.AsyncManager() if policy.async_save else None
    self._multiprocess = _process_count() > 1
    self._gda = None  # jax's GlobalAsyncCheckpointManager, when needed
    self._checked = False  # latest_step has validated the resume point
    self._validated = None  # (step, raw tree) read by latest_step

  # -- resume -------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The step to resume from, the same on every process.

    The first call (the resume) reads the candidates in ``checkpoints/``,
    newest first, and takes the newest that reads back: each one that does
    not (truncated, garbage, not a regular file) is skipped with a warning
    naming it and, once all processes agreed, moved by process 0 to
    ``<workdir>/corrupt_checkpoints/`` (kept, not deleted; out of the way
    of retention and of the next saves). The tree read is kept for
    :meth:`read`, so the file is read once. Later calls name the newest
    checkpoint without reading it.

    Raises:
      RunnerError: a directory (e.g. an Orbax checkpoint) or a name whose
        step is not an integer among the checkpoints, or a readable file
        that is not a runner checkpoint.
      DistributedConfigError: the processes disagree on the step.
    """
    if self._checked:
      return distributed.agree_on_step('resume_step', self._newest_named())
    step, skipped = self._newest_readable()
    step = distributed.agree_on_step('resume_step', step)
    self._checked = True
    if skipped and distributed.is_main_process():
      self._move_aside(skipped)
    return step

  def _step_of(self, path: str) -> int:
    name = os.path.basename(path)[len(self.policy.prefix):]
    try:
      step = int(name)
    except ValueError:
      raise RunnerError(
          f'{path}: not a runner checkpoint (the step {name!r} is not an'
          ' integer); move it out of the checkpoint directory.') from None
    if os.path.isdir(path):
      kind = (' (an Orbax checkpoint)'
              if orbax_delegation.is_orbax_checkpoint(path) else '')
      raise RunnerError(
          f'{path}: a directory{kind} among the runner\'s checkpoints, which'
          ' are msgpack files; move it out of the checkpoint directory.')
    return step

  def _newest_named(self) -> int | None:
    paths = checkpoint_naming.all_checkpoints(self.dir, self.policy.prefix)
    return self._step_of(paths[-1]) if paths else None

  def _newest_readable(self) -> tuple[int | None, list[str]]:
    """``(newest step that reads back, [unreadable newer paths])``."""
    skipped = []
    paths = checkpoint_naming.all_checkpoints(self.dir, self.policy.prefix)
    for path in reversed(paths):
      step = self._step_of(path)
      try:
        raw = checkpoint_io.read_checkpoint_file(path)
        _check_array_dir(path, raw)
      except (OSError, ValueError) as e:
        if distributed.is_main_process():
          logging.warning(
              'Skipping checkpoint %s: it does not read back (%s). It is'
              ' moved to %s/; the run resumes from an older checkpoint, if'
              ' any.',
              path, ' '.join(str(e).split()), CORRUPT_DIR)
        skipped.append(path)
        continue
      if not isinstance(raw, dict) or not isinstance(raw.get('state'), dict):
        raise RunnerError(f'{path} is not a runner checkpoint (no "state"'
                          ' entry); move it out of the checkpoint'
                          ' directory.')
      self._validated = (step, raw)
      return step, skipped
    return None, skipped

  def _move_aside(self, paths) -> None:
    """Moves unreadable checkpoints to ``<workdir>/corrupt_checkpoints/``."""
    target = os.path.join(os.path.dirname(self.dir), CORRUPT_DIR)
    url = storage.is_url(self.dir)  # object stores: a copy, then a delete
    exists = storage.exists if url else os.path.lexists
    for path in paths:
      for source in (path, path + '_gda'):
        if not exists(source):
          continue
        dest = os.path.join(target, os.path.basename(source))
        n = 1
        while exists(dest):
          dest = os.path.join(target, f'{os.path.basename(source)}.{n}')
          n += 1
        try:
          if url:
            storage.move(source, dest)
            continue
          os.makedirs(target, exist_ok=True)
          os.rename(source, dest)
        except OSError as e:
          raise RunnerError(
              f'cannot move the unreadable checkpoint {source} to {dest}:'
              f' {e.strerror or e}; move or delete it yourself.') from e

  def path(self, step: int) -> str:
    return os.path.join(self.dir, f'{self.policy.prefix}{step}')

  def read(self, step: int) -> dict:
    """The raw tree saved at ``step`` (state dicts of numpy arrays).

    Raises:
      RunnerError: unreadable, or not a runner checkpoint.
    """
    if self._validated is not None and self._validated[0] == step:
      raw, self._validated = self._validated[1], None
    else:
      raw = read_runner_checkpoint(self.path(step))
    self._saved_steps.add(step)
    return raw

  def read_arrays(self, step: int, tree: Any, shardings: Any) -> Any:
    """:func:`read_arrays` of the checkpoint at ``step``."""
    return read_arrays(self.path(step), tree, shardings, step)

  def restore_state(self, step: int, raw: dict, state: Any) -> Any:
    """``raw['state']`` restored into the structure of ``state``.

    Raises:
      RunnerError: the checkpoint does not fit the model (naming leaves).
    """
    check_tree(serialization.to_state_dict(state), raw['state'],
               f'checkpoint {self.path(step)}',
               against='the model and optimizer',
               hint='To start a different model or optimizer, use a new'
               ' --workdir (with --init_from to reuse matching weights).')
    return serialization.from_state_dict(state, raw['state'])

  def prune_best_after(self, step: int, kept) -> None:
    """Drops best checkpoints newer than the resume point that are not in
    ``kept`` (they will be recomputed, identically)."""
    if distributed.is_main_process() and os.path.isdir(self.best_dir):
      for name in os.listdir(self.best_dir):
        if not name.startswith(self.policy.prefix):
          continue
        try:
          s = int(name[len(self.policy.prefix):])
        except ValueError:
          continue
        if s > step and s not in kept:
          _remove(os.path.join(self.best_dir, name))

  # -- save ---------------------------------------------------------------

  def _save(self, directory, tree, step, keep, overwrite):
    kwargs = dict(target=tree, step=step, prefix=self.policy.prefix,
                  keep=keep, overwrite=overwrite,
                  keep_every_n_steps=(self.policy.keep_every_n_steps
                                      if directory == self.dir else None),
                  async_manager=self._async)
    self.saves += 1
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', DeprecationWarning)
      if self._multiprocess:
        checkpoints.save_checkpoint_multiprocess(
            directory, gda_manager=self._gda_manager(tree), **kwargs)
      else:
        checkpoints.save_checkpoint(directory, **kwargs)

  def _gda_manager(self, tree):
    """jax's array checkpoint manager, if ``tree`` holds arrays split over
    processes (each process writes its own shards into ``<ckpt>_gda``)."""
    if self._gda is None:
      import jax  # pylint: disable=g-import-not-at-top
      leaves = jax.tree_util.tree_leaves(tree)
      if any(multiprocess_arrays.is_multiprocess_array(x) for x in leaves):
        from jax.experimental.array_serialization import serialization  # pylint: disable=g-import-not-at-top
        self._gda = serialization.GlobalAsyncCheckpointManager(
            timeout_secs=_BARRIER_TIMEOUT_S)
    return self._gda

  def due(self, step: int) -> bool:
    """Whether the policy saves at ``step`` (before the final one)."""
    every = self.policy.every_steps
    return bool(every) and step % every == 0

  def save(self, step: int, tree: Callable[[], Any]) -> bool:
    """Saves ``tree()`` at ``step`` unless that step is already saved."""
    if step in self._saved_steps:
      return False
    self._save(self.dir, tree(), step, keep=self.policy.keep,
               overwrite=False)
    self._saved_steps.add(step)
    return True

  def save_best(self, step: int, tree: Any, evicted=()) -> None:
    """Saves ``tree`` into ``best_checkpoints/`` and removes ``evicted``."""
    self._save(self.best_dir, tree, step, keep=0, overwrite=True)
    if distributed.is_main_process():
      for s in evicted:
        _remove(os.path.join(self.best_dir, f'{self.policy.prefix}{s}'))

  def wait(self) -> None:
    """Blocks until a background save is done (re-raising its error)."""
    if self._async is not None:
      if self._async.save_future is not None:
        concurrent.futures.wait([self._async.save_future])  # no warning
      self._async.wait_previous_save()
    if self._gda is not None:
      self._gda.wait_until_finished()  # every process's shards committed

  def close(self) -> None:
    """Waits for the last save and stops the background thread."""
    if self._async is not None:
      try:
        self.wait()
      finally:
        self._async.executor.shutdown(wait=True)


def _has_placeholder(tree) -> bool:
  if isinstance(tree, str):
    return tree.startswith(multiprocess_arrays.MP_ARRAY_PH)
  if isinstance(tree, dict):
    return any(_has_placeholder(v) for v in tree.values())
  return False


def _check_array_dir(path: str, raw) -> None:
  """Raises ValueError if ``raw`` names sharded arrays whose directory is
  missing (a checkpoint that cannot be restored)."""
  folder = multiprocess_arrays.array_dir(path)
  if (_has_placeholder(raw) and not multiprocess_arrays.is_remote_path(path)
      and not os.path.isdir(folder)):
    raise ValueError(f'its sharded arrays ({folder}) are missing')


def _remove(path):
  """Removes checkpoint ``path`` and its sharded arrays (``<path>_gda``)."""
  if storage.is_url(path):  # and its integrity sidecar
    for item in (path, multiprocess_arrays.array_dir(path),
                 checkpoint_naming.sidecar_path(path)):
      storage.rmtree(item)
    return
  for item in (path, multiprocess_arrays.array_dir(path)):
    if os.path.isdir(item):
      shutil.rmtree(item, ignore_errors=True)
    elif os.path.exists(item):
      os.remove(item)


def _process_count():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()
