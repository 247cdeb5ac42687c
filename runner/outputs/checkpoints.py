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

In several processes a checkpoint file is read lazily
(``lib.msgpack_slices``): every process parses its framing and small
leaves, and reads of each large array only the slices its devices hold;
with a block-hashed integrity sidecar every block read is checked first
(a mismatch is the usual ``cannot read checkpoint`` error, on every
process, and the resume falls back to the previous checkpoint). The
resume's choice of checkpoint then checks what the framing and the
sidecar say, and the slice reads check the rest. In one process files are
read whole, as before.
"""

import concurrent.futures
import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints
from gintrain.lib import msgpack_slices
from gintrain.lib import multiprocess_arrays
from gintrain.lib import serialization
from gintrain.lib import storage
from gintrain.runner import validation
from gintrain.runner import errors
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.parallel import distributed

__all__ = ['CheckpointPolicy', 'Checkpointer', 'check_tree', 'flatten',
           'describe_leaf', 'read_file', 'read_runner_checkpoint',
           'read_arrays', 'restore_state',
           'CHECKPOINT_DIR', 'BEST_DIR', 'CORRUPT_DIR']

CHECKPOINT_DIR = workdir_lib.CHECKPOINT_DIR
BEST_DIR = workdir_lib.BEST_DIR
CORRUPT_DIR = workdir_lib.CORRUPT_DIR
_MODES = ('min', 'max')
# How long a sharded save waits for the slowest process's shards.
_BARRIER_TIMEOUT_S = 600
# What a file error under the checkpoint I/O says the run was doing.
_CHECKPOINT_IO = errors.activity('writing or reading a checkpoint')


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
    name = 'checkpoint_policy.'
    validation.check_int(name + 'every_steps', self.every_steps, 0)
    validation.check_int(name + 'keep', self.keep, 0)
    validation.check_int(name + 'keep_every_n_steps',
                         self.keep_every_n_steps, 1, allow_none=True)
    validation.check_name(name + 'best_metric', self.best_metric,
                          'a metric name', allow_none=True)
    validation.check_choice(name + 'best_mode', self.best_mode, _MODES)
    validation.check_int(name + 'keep_best', self.keep_best, 1)
    validation.check_bool(name + 'async_save', self.async_save)
    validation.check_name(
        name + 'prefix', self.prefix,
        'a non-empty file name prefix not ending in a digit',
        test=lambda p: '/' not in p and not p[-1].isdigit())


def describe_leaf(leaf):
  """``float32[2, 3]``: a leaf's dtype and shape."""
  return f'{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}'


def flatten(tree, prefix=''):
  """``{'a/b': leaf}`` of a state dict (dicts only; leaves are the rest)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f'{prefix}{key}/'))
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
  want, got = flatten(expected), flatten(restored)
  faults = []
  for key in want:
    if key not in got:
      faults.append(f'{key}: missing from the checkpoint')
      continue
    w, g = want[key], got[key]
    if hasattr(w, 'dtype') and hasattr(w, 'shape'):
      if not (hasattr(g, 'dtype') and hasattr(g, 'shape')):
        faults.append(f'{key}: {type(g).__name__} in the checkpoint,'
                      f' {describe_leaf(w)} expected')
      elif np.shape(w) != np.shape(g) or np.dtype(w.dtype) != np.dtype(
          g.dtype):
        faults.append(f'{key}: {describe_leaf(g)} in the checkpoint,'
                      f' {describe_leaf(w)} expected')
  faults += [f'{key}: not in the model' for key in got if key not in want]
  if faults:
    shown = '; '.join(faults[:6])
    more = f'; and {len(faults) - 6} more' if len(faults) > 6 else ''
    raise RunnerError(f'{what} does not match {against}: {shown}{more}.'
                      + (f' {hint}' if hint else ''))


class CorruptCheckpointError(RunnerError):
  """The slice reads of a checkpoint failed (a block that does not match
  its integrity sidecar, a read error), agreed on every process: the
  resume moves it aside and falls back to an older one
  (:meth:`Checkpointer.reject`)."""


def read_file(path: str, lazy: bool = False):
  """The raw tree of the checkpoint file ``path``; arrays saved as sharded
  files (``<path>_gda``) are left as placeholders (see :func:`read_arrays`).
  ``lazy``: large arrays are left unread where the file allows
  (``msgpack_slices.StoredArray``; see :func:`place_stored`)."""
  try:
    return _read_tree(path, lazy)
  except (OSError, ValueError, ImportError) as e:
    raise RunnerError(f'cannot read checkpoint {path}: {e}') from e


def _read_tree(path: str, lazy: bool):
  """The checkpoint file's tree (``lazy``: large arrays unread, where the
  file allows: a local file without a sidecar or with a block-hashed one).

  Raises:
    gintrain.lib.errors.CheckpointReadError: unreadable (a ValueError).
  """
  tree = msgpack_slices.read_lazily(path) if lazy else None
  return checkpoint_io.read_checkpoint_file(path) if tree is None else tree


def _stored_pairs(tree, shardings, out: list) -> list:
  """``(StoredArray, sharding or None)`` of ``tree``'s unread arrays, the
  sharding from the same key path of ``shardings`` (a state dict)."""
  if isinstance(tree, msgpack_slices.StoredArray):
    import jax  # pylint: disable=g-import-not-at-top
    out.append((tree, shardings if isinstance(
        shardings, jax.sharding.Sharding) else None))
  elif isinstance(tree, dict):
    for k, v in tree.items():
      _stored_pairs(v, shardings.get(k) if isinstance(shardings, dict)
                    else None, out)
  elif isinstance(tree, list):
    for v in tree:
      _stored_pairs(v, None, out)
  return out


def _replace_stored(tree, new: dict):
  if isinstance(tree, msgpack_slices.StoredArray):
    return new[id(tree)]
  if isinstance(tree, dict):
    return {k: _replace_stored(v, new) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_replace_stored(v, new) for v in tree]
  return tree


def place_stored(path: str, tree: Any, shardings: Any = None) -> Any:
  """``tree`` with its unread arrays (from a lazy read) read: those with a
  sharding at their key path in ``shardings`` (a state dict of
  ``jax.sharding.Sharding``) placed with it, each process reading only
  its devices' slices; the rest read whole onto the host. Every process
  calls it (errors are agreed).

  Raises:
    RunnerError: a read failed (e.g. a block does not match its hash).
  """
  pairs = _stored_pairs(tree, shardings, [])
  if not pairs:
    return tree
  split = [(a, s) for a, s in pairs if s is not None]
  try:  # a failure on any process fails it on every one (agreed)
    new = dict(zip([id(a) for a, _ in split],
                   msgpack_slices.place(split) if split else []))
  except (OSError, ValueError) as e:
    raise CorruptCheckpointError(f'cannot read checkpoint {path}: {e}') from e
  try:
    for arr, sharding in pairs:
      if sharding is None:
        new[id(arr)] = arr.read()
  except (OSError, ValueError) as e:
    raise RunnerError(f'cannot read checkpoint {path}: {e}') from e
  return _replace_stored(tree, new)


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


def read_runner_checkpoint(path: str, lazy: bool = False) -> dict:
  """The raw tree of the runner checkpoint file ``path`` (``lazy``: see
  :func:`read_file`).

  Raises:
    RunnerError: unreadable, or not a runner checkpoint.
  """
  raw = read_file(path, lazy)
  if not isinstance(raw, dict) or not isinstance(raw.get('state'), dict):
    raise RunnerError(f'{path} is not a runner checkpoint (no "state"'
                      ' entry).')
  return raw


_RESUME_HINT = ('To start a different model or optimizer, use a new'
                ' --workdir (with --init_from to reuse matching weights).')


@_CHECKPOINT_IO
def restore_state(path: str, shapes: Any, partitioner, raw: dict | None = None,
                  step: int | None = None, hint: str = _RESUME_HINT,
                  select: Callable[[Any], Any] | None = None,
                  what: str | None = None) -> tuple[Any, dict]:
  """The state saved in the checkpoint ``path``, checked against
  ``shapes`` and placed by ``partitioner``; with the raw tree read.

  The one restore path of the runner: resume, ``gintrain eval``, the spike
  guard's rollback and ``--init_from`` (``runner.training.init_from``, with
  ``select``) all come here.

  Args:
    path: the checkpoint file.
    shapes: what to restore into: the fresh state's ``jax.eval_shape`` (or
      its arrays; for ``--init_from``, the fresh parameters).
    partitioner: places the state; each process reads only the slices of
      sharded arrays (``<path>_gda``) its devices hold. None: numpy arrays
      on the host (``--init_from``: the caller places the whole state once
      its parameters are in).
    raw: the checkpoint's raw tree, already read (None: read here).
    step: the checkpoint's step, for messages.
    hint: added to a mismatch error.
    select: None: restore the runner checkpoint's ``state`` entry. Else a
      function from the checkpoint's whole tree (any checkpoint; its arrays
      read onto the host) to the state dict to restore: ``--init_from``'s
      selection, rename and report.
    what: names the checkpoint in a mismatch error (default
      ``checkpoint <path>``).

  Returns:
    ``(placed state, raw tree)``.

  In several processes (``select`` None) the file is read lazily: each
  process reads of the large arrays only the slices its devices hold (see
  the module doc); ``raw`` may come from such a read too.

  Raises:
    RunnerError: unreadable, not a runner checkpoint, or a state that does
      not fit the model (naming the leaves).
  """
  if select is None:
    raw = (read_runner_checkpoint(path, lazy=_process_count() > 1)
           if raw is None else raw)
    shardings = None if partitioner is None else partitioner.shardings(shapes)
    raw['state'] = read_arrays(path, raw['state'], shardings, step)
    tree = raw['state']
  else:
    raw = read_arrays(path, read_file(path) if raw is None else raw,
                      step=step)
    tree = select(raw)
  check_tree(serialization.to_state_dict(shapes), tree,
             what or f'checkpoint {path}', against='the model and optimizer',
             hint=hint)
  if select is None:  # lazily read arrays: read once the shapes fit
    tree = raw['state'] = place_stored(
        path, tree, None if shardings is None else
        serialization.to_state_dict(shardings))
    raw = {k: (v if k == 'state' else place_stored(path, v))
           for k, v in raw.items()}
  state = serialization.from_state_dict(shapes, tree)
  return (state if partitioner is None else partitioner.put_state(state),
          raw)


def _skip(path: str, why: str, skipped: list) -> None:
  """Notes the checkpoint ``path`` as one the resume skips (``why``: the
  warning's reason); :meth:`Checkpointer.latest_step` moves it aside."""
  if distributed.is_main_process():
    logging.warning('Skipping checkpoint %s: %s. It is moved to %s/; the run'
                    ' resumes from an older checkpoint, if any.', path, why,
                    CORRUPT_DIR)
  skipped.append(path)


class Checkpointer:
  """Saves and reads a run's checkpoints as ``policy`` says.

  All processes call every method in the same order (multi-process saves
  synchronise); only process 0 writes files. What a checkpoint holds is the
  caller's tree (see the module doc); this class owns where and when.
  """

  def __init__(self, workdir: str, policy: CheckpointPolicy):
    self.policy = policy
    self.workdir = workdir
    self.dir = workdir_lib.path(workdir, CHECKPOINT_DIR)
    self.best_dir = workdir_lib.path(workdir, BEST_DIR)
    self._saved_steps: set = set()
    self.saves = 0  # files written (or started, when async) so far
    self._async = checkpoints.AsyncManager() if policy.async_save else None
    self._multiprocess = _process_count() > 1
    self._gda = None  # jax's GlobalAsyncCheckpointManager, when needed
    self._checked = False  # latest_step has validated the resume point
    self._validated = None  # (step, raw tree) read by latest_step
    self._rejected: dict = {}  # step -> why its restore failed (reject)

  # -- resume -------------------------------------------------------------

  @_CHECKPOINT_IO
  def latest_step(self) -> int | None:
    """The step to resume from, the same on every process.

    The first call (the resume) reads the candidates in ``checkpoints/``,
    newest first, and takes the newest that reads back: each one that does
    not (truncated, garbage, not a regular file) is skipped with a warning
    naming it and, once all processes agreed, moved by process 0 to
    ``<workdir>/corrupt_checkpoints/`` (kept, not deleted; out of the way
    of retention and of the next saves). The tree read is kept for
    :meth:`read`, so the file is read once. In several processes the
    large arrays are not read here (see the module doc): a block of them
    that does not match the sidecar fails the restore on every process
    instead, and the resume falls back through :meth:`reject`. Later calls
    name the newest checkpoint without reading it.

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

  @_CHECKPOINT_IO
  def reject(self, step: int, reason: str) -> int | None:
    """After the restore of ``step`` failed on every process with a
    :class:`CorruptCheckpointError` (``reason``): that checkpoint is moved
    aside as :meth:`latest_step` moves unreadable ones, and the next step
    to resume from (agreed, None if no older one reads back) is returned.
    """
    self._rejected[step] = reason
    self._saved_steps.discard(step)
    self._checked, self._validated = False, None
    return self.latest_step()

  def _step_of(self, path: str) -> int:
    name = os.path.basename(path)[len(self.policy.prefix):]
    try:
      step = int(name)
    except ValueError:
      raise RunnerError(
          f'{path}: not a runner checkpoint (the step {name!r} is not an'
          ' integer); move it out of the checkpoint directory.') from None
    if storage.isdir(path):
      kind = (' (an Orbax checkpoint)'
              if checkpoint_naming.is_orbax_dir(path) else '')
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
      if step in self._rejected:
        _skip(path, self._rejected[step], skipped)
        continue
      try:
        # Several processes: the framing (checked against a block-hashed
        # sidecar), not the large arrays; their slice reads check them.
        raw = _read_tree(path, lazy=self._multiprocess)
        _check_array_dir(path, raw)
      except storage.StoreError:
        raise  # the store failed, not this checkpoint: nothing is moved
      except (OSError, ValueError) as e:
        _skip(path, f'it does not read back ({" ".join(str(e).split())})',
              skipped)
        continue
      if not isinstance(raw, dict) or not isinstance(raw.get('state'), dict):
        raise RunnerError(f'{path} is not a runner checkpoint (no "state"'
                          ' entry); move it out of the checkpoint'
                          ' directory.')
      stored = _stored_step(raw)
      if stored is not None and stored != step:
        _skip(path, f'it holds step {stored}, not the step of its name',
              skipped)
        continue
      self._validated = (step, raw)
      return step, skipped
    return None, skipped

  def _move_aside(self, paths) -> None:
    """Moves unreadable checkpoints to ``<workdir>/corrupt_checkpoints/``
    (on object stores: a copy, then a delete)."""
    target = storage.join(self.workdir, CORRUPT_DIR)
    exists = lambda p: storage.exists(p, follow_symlinks=False)  # pylint: disable=unnecessary-lambda-assignment
    for path in paths:
      for source in (path, path + '_gda'):
        if not exists(source):
          continue
        name = source.rstrip('/').rsplit('/', 1)[-1]
        dest = storage.join(target, name)
        n = 1
        while exists(dest):
          dest = storage.join(target, f'{name}.{n}')
          n += 1
        try:
          storage.move(source, dest)
        except OSError as e:
          raise RunnerError(
              f'cannot move the unreadable checkpoint {source} to {dest}:'
              f' {e.strerror or e}; move or delete it yourself.') from e

  def path(self, step: int) -> str:
    return storage.join(self.dir, f'{self.policy.prefix}{step}')

  @_CHECKPOINT_IO
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

  @errors.activity('handling the checkpoints')
  def prune_best_after(self, step: int, kept) -> None:
    """Drops best checkpoints newer than the resume point that are not in
    ``kept`` (they will be recomputed, identically)."""
    if distributed.is_main_process():
      for name in storage.listdir(self.best_dir):
        if not name.startswith(self.policy.prefix):
          continue
        try:
          s = int(name[len(self.policy.prefix):])
        except ValueError:
          continue
        if s > step and s not in kept:
          _remove(storage.join(self.best_dir, name))

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
        # Packed: 2 files a process. The loop never donates a saved state
        # (the step after a save does not donate), so the background writer
        # reads the device arrays themselves: no copy before returning.
        checkpoints.save_checkpoint_multiprocess(
            directory, gda_manager=self._gda_manager(tree),
            array_format='packed', buffers_stay_valid=True, **kwargs)
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

  @_CHECKPOINT_IO
  def save(self, step: int, tree: Callable[[], Any],
           overwrite: bool = False) -> bool:
    """Saves ``tree()`` at ``step`` unless that step is already saved
    (``overwrite``: replaces it, after waiting for a background save)."""
    if step in self._saved_steps and not overwrite:
      return False
    if overwrite:
      self.wait()
    self._save(self.dir, tree(), step, keep=self.policy.keep,
               overwrite=overwrite)
    self._saved_steps.add(step)
    return True

  @_CHECKPOINT_IO
  def save_best(self, step: int, tree: Any, evicted=()) -> None:
    """Saves ``tree`` into ``best_checkpoints/`` and removes ``evicted``."""
    self._save(self.best_dir, tree, step, keep=0, overwrite=True)
    if distributed.is_main_process():
      for s in evicted:
        _remove(storage.join(self.best_dir, f'{self.policy.prefix}{s}'))

  @_CHECKPOINT_IO
  def wait(self) -> None:
    """Blocks until a background save is done (re-raising its error)."""
    if self._async is not None:
      if self._async.save_future is not None:
        concurrent.futures.wait([self._async.save_future])  # no warning
      self._async.wait_previous_save()
    if self._gda is not None:
      self._gda.wait_until_finished()  # every process's shards committed

  @_CHECKPOINT_IO
  def busy(self) -> bool:
    """Whether a background save is still running, without waiting; a
    finished one that failed raises its error here (once)."""
    future = self._async.save_future if self._async is not None else None
    if future is not None and future.done():
      self._async.wait_previous_save()
      future = None
    thread = getattr(self._gda, '_thread', None)  # jax's commit thread
    if self._gda is not None and (thread is None or not thread.is_alive()):
      self._gda.check_for_errors()
      thread = None
    return future is not None or thread is not None

  @_CHECKPOINT_IO
  def close(self) -> None:
    """Waits for the last save and stops the background thread."""
    if self._async is not None:
      try:
        self.wait()
      finally:
        self._async.executor.shutdown(wait=True)


def _stored_step(raw: dict) -> int | None:
  """The train state step stored in a checkpoint's raw tree (None when it
  is not a plain number, e.g. saved among the sharded arrays)."""
  value = raw['state'].get('step')
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if array.shape != () or array.dtype.kind not in 'iu':
    return None
  return int(array)


def _has_placeholder(tree) -> bool:
  if isinstance(tree, str):
    return tree.startswith(multiprocess_arrays.MP_ARRAY_PH)
  if isinstance(tree, dict):
    return any(_has_placeholder(v) for v in tree.values())
  return False


def _check_array_dir(path: str, raw) -> None:
  """Raises ValueError if ``raw`` names sharded arrays that are missing or
  fail their integrity check (a checkpoint that cannot be restored); every
  process must call it (they agree)."""
  multiprocess_arrays.verify_arrays(path, raw)


def _remove(path):
  """Removes checkpoint ``path``, its sharded arrays (``<path>_gda``) and
  its integrity sidecar."""
  for item in (path, multiprocess_arrays.array_dir(path),
               checkpoint_naming.sidecar_path(path)):
    storage.rmtree(item)


def _process_count():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()
