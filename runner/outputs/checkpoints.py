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
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from gintrain.lib import checkpoints
from gintrain.lib import serialization
from gintrain.runner.parallel import distributed
from gintrain.runner.errors import RunnerError

__all__ = ['CheckpointPolicy', 'Checkpointer', 'check_tree', 'load_params',
           'read_runner_checkpoint',
           'CHECKPOINT_DIR', 'BEST_DIR']

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best_checkpoints'
_MODES = ('min', 'max')


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
  try:
    return checkpoints.restore_checkpoint(path, target=None)
  except (OSError, ValueError) as e:
    raise RunnerError(f'cannot read checkpoint {path}: {e}') from e


def load_params(path: str, params: Any) -> Any:
  """The parameters stored at ``path``, restored into the shape of ``params``.

  ``path`` is a checkpoint file, a directory whose latest ``checkpoint_*``
  is used, or a run's workdir (its ``checkpoints/``). The checkpoint may be
  a runner checkpoint (``state/params``), a ``TrainState`` (``params``) or
  a bare params tree.

  Raises:
    RunnerError: nothing at ``path``, or parameters that do not fit.
  """
  if not os.path.exists(path):
    raise RunnerError(f'--init_from={path}: no such file or directory.')
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    path = os.path.join(path, CHECKPOINT_DIR)  # a run's workdir
  raw = _read(path)
  if raw is None:
    raise RunnerError(f'--init_from={path}: the directory holds no'
                      ' checkpoint_* file.')
  if isinstance(raw, dict) and isinstance(raw.get('state'), dict):
    raw = raw['state']
  if isinstance(raw, dict) and 'params' in raw and 'opt_state' in raw:
    raw = raw['params']
  check_tree(serialization.to_state_dict(params), raw,
             f'--init_from={path}')
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
    self._async = checkpoints.AsyncManager() if policy.async_save else None
    self._multiprocess = _process_count() > 1

  # -- resume -------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest step in ``checkpoints/``, the same on every process."""
    path = checkpoints.latest_checkpoint(self.dir, self.policy.prefix)
    step = None
    if path is not None:
      name = os.path.basename(path)[len(self.policy.prefix):]
      try:
        step = int(name)
      except ValueError:
        raise RunnerError(
            f'{path}: not a runner checkpoint (the step {name!r} is not an'
            ' integer); move it out of the checkpoint directory.') from None
    return distributed.agree_on_step('resume_step', step)

  def path(self, step: int) -> str:
    return os.path.join(self.dir, f'{self.policy.prefix}{step}')

  def read(self, step: int) -> dict:
    """The raw tree saved at ``step`` (state dicts of numpy arrays).

    Raises:
      RunnerError: unreadable, or not a runner checkpoint.
    """
    raw = read_runner_checkpoint(self.path(step))
    self._saved_steps.add(step)
    return raw

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
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', DeprecationWarning)
      if self._multiprocess:
        checkpoints.save_checkpoint_multiprocess(directory, **kwargs)
      else:
        checkpoints.save_checkpoint(directory, **kwargs)

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

  def close(self) -> None:
    """Waits for the last save and stops the background thread."""
    if self._async is not None:
      try:
        self.wait()
      finally:
        self._async.executor.shutdown(wait=True)


def _remove(path):
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def _process_count():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()
