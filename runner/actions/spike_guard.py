"""Loss-spike guard: roll back to the last good checkpoint and go on.

At each log step the guard looks at the train record's ``loss`` (and
``grad_norm``). A spike is a value that is not finite, or a loss above
``factor`` x the median of the losses of the last ``window`` good log
steps (once ``min_history`` of them are known). On a spike the guard

1. restores the train state of the newest checkpoint taken at or before
   the last good log step (one whose following steps logged a good loss);
   checkpoints written after that step are moved to
   ``<workdir>/spiked_checkpoints/`` (kept, not deleted), so neither a
   restart nor retention goes back to them;
2. keeps the data position where it is and sets the restored state's step
   to the current step: the batches since the checkpoint are skipped (the
   step counter, the data position and the learning-rate schedule go on
   together; the run ends at the same step, with fewer updates);
3. writes a ``spike_guard`` record and a warning, and puts the run on
   probation: no checkpoint is saved until a log step is good again (so
   retention never deletes the checkpoint the run rolled back to). A spike
   during probation marks that checkpoint bad: the next rollback goes to an
   older one;
4. after ``max_rollbacks`` rollbacks (over the whole run, restarts
   included: the guard's state is in every checkpoint) the next spike stops
   the run with one ``gintrain: error:`` line (exit status 1).

The decisions depend only on the logged losses, so a rerun of the same
command makes the same ones. Settings: ``train.spike_guard =
@runner.spike_guard()`` with ``spike_guard.factor`` etc.; ``train.
spike_guard = False`` turns it off. It is on by default (factor 10 over a
window of 20 log steps, 3 rollbacks): a loss ten times the recent median
is far outside ordinary noise.
"""

import dataclasses
import json
import math
import statistics
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from gintrain.lib import checkpoint_naming
from gintrain.lib import storage
from gintrain.runner.actions import base
from gintrain.runner.actions import checkpoint as checkpoint_action
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints as checkpoints_lib
from gintrain.runner.outputs import workdir as workdir_lib

__all__ = ['SpikeGuardPolicy', 'spike_guard', 'policy_of', 'SpikeGuard',
           'GuardedSave', 'SPIKED_DIR']

SPIKED_DIR = 'spiked_checkpoints'


@dataclasses.dataclass(frozen=True)
class SpikeGuardPolicy:
  """When the guard rolls back (see the module doc).

  Attributes:
    factor: a loss above ``factor`` x the running median is a spike.
    window: how many recent good log steps the median covers.
    min_history: good log steps needed before the factor applies
      (non-finite values are spikes from the start).
    max_rollbacks: rollbacks allowed over the whole run; the next spike
      stops it (exit 1).
    metric: the train metric watched.
  """
  factor: float = 10.0
  window: int = 20
  min_history: int = 3
  max_rollbacks: int = 3
  metric: str = 'loss'

  def __post_init__(self):
    validation.check_number('spike_guard.factor', self.factor, 1,
                            low_open=True)
    validation.check_int('spike_guard.window', self.window, 1)
    validation.check_int('spike_guard.min_history', self.min_history, 1)
    validation.check_int('spike_guard.max_rollbacks', self.max_rollbacks, 0)
    validation.check_name('spike_guard.metric', self.metric,
                          'a train metric name')


def spike_guard(factor=10.0, window=20, min_history=3, max_rollbacks=3,
                metric='loss', enabled=True):
  """``train.spike_guard``'s value (gin: ``@runner.spike_guard()``);
  ``enabled=False``: off."""
  if not enabled:
    return False
  return SpikeGuardPolicy(factor, window, min_history, max_rollbacks, metric)


def policy_of(value) -> SpikeGuardPolicy | None:
  """The policy ``train.spike_guard`` names (True/None: the default
  one; False: off).

  Raises:
    RunnerError: another value.
  """
  if value is None or value is True:
    return SpikeGuardPolicy()
  if value is False:
    return None
  if isinstance(value, SpikeGuardPolicy):
    return value
  raise RunnerError('train.spike_guard must be True, False or'
                    f' @runner.spike_guard(), got {value!r}.')


class SpikeGuard(base.Action):
  """The guard (see the module doc); first among the actions after the
  report, so nothing later sees a spiked state.

  Args:
    policy: the :class:`SpikeGuardPolicy`.
    checkpointer: the run's ``runner.outputs.checkpoints.Checkpointer``.
    shapes: returns the fresh train state's shapes (``jax.eval_shape``).
    install: puts a placed train state into the loop.
    writer: the run's metric writer (``spike_guard`` records).
    main: whether this is process 0 (writes files, logs).
  """

  checkpoint_key = 'spike_guard'
  name = 'spike_guard'
  records_only = True
  end_first = True  # a spiked final state is rolled back, not saved

  def __init__(self, policy: SpikeGuardPolicy, checkpointer,
               shapes: Callable[[], Any], install: Callable[[Any], None], writer, main: bool = True):
    self.policy, self.ckpt, self.install = policy, checkpointer, install
    self.writer, self.main = writer, main
    self.history: list[float] = []
    self.rollbacks = 0
    self.last_good = 0       # the last step whose log record was good
    self.probation = None    # the checkpoint step rolled back to, until good
    self.bad: set[int] = set()
    self._shapes, self.shapes, self.partitioner = shapes, None, None
    self.workdir = None

  def bind(self, run, workdir):
    self.partitioner, self.workdir = run.partitioner, workdir

  def on_start(self, step):
    if step and self.workdir is not None:
      self.history = self._agreed(
          self._logged_losses(step) if self.main else [])
    if not self.history:  # a fresh run, or one checkpointed without it
      self.last_good = step

  def _agreed(self, history: list[float]) -> list[float]:
    """Process 0's ``history`` on every process (a workdir need not be on
    a shared filesystem; every process must decide alike)."""
    if jax.process_count() == 1:
      return history
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    padded = np.full(self.policy.window + 1, np.nan, np.float64)
    padded[0] = len(history)
    padded[1:1 + len(history)] = history
    padded = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return [float(x) for x in padded[1:1 + int(padded[0])]]

  def _logged_losses(self, step) -> list[float]:
    """The last ``window`` good train losses logged at or before ``step``
    (the step resumed from), from the workdir's records.

    The history is not in the checkpoint: after a preemption mid-window the
    next record averages fewer steps than the uninterrupted run's does, so a
    checkpointed history would differ from the uninterrupted run's and
    break bitwise-identical resumes. The records of steps after ``step``
    (a crashed attempt's) are ignored; a step logged twice keeps its last
    record.
    """
    path = workdir_lib.path(self.workdir, workdir_lib.METRICS_FILE)
    try:
      text = storage.read_text(path)
    except (OSError, ValueError):
      return []
    losses, spiked = {}, set()
    for line in text.splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a torn last line
      at = record.get('step') if isinstance(record, dict) else None
      if not isinstance(at, int) or at > step:
        continue
      if record.get('split') == 'spike_guard':
        spiked.add(at)
      value = record.get(self.policy.metric)
      if (record.get('split') == 'train' and
          isinstance(value, (int, float)) and math.isfinite(value)):
        losses[at] = float(value)
    good = [losses[k] for k in sorted(losses) if k not in spiked]
    return good[-self.policy.window:]

  # -- checkpointed state -------------------------------------------------

  def get_state(self):
    return {'rollbacks': np.int64(self.rollbacks),
            'last_good': np.int64(self.last_good),
            'probation': np.int64(-1 if self.probation is None
                                  else self.probation),
            'bad': np.asarray(sorted(self.bad), np.int64)}

  def set_state(self, state):
    if not state:
      return
    self.rollbacks = int(state['rollbacks'])
    self.last_good = int(state['last_good'])
    probation = int(state['probation'])
    self.probation = None if probation < 0 else probation
    self.bad = {int(x) for x in np.asarray(state['bad']).ravel()}

  # -- the check ----------------------------------------------------------

  def spike(self, record: dict) -> str | None:
    """Why ``record`` is a spike, or None."""
    name = self.policy.metric
    for key in (name, 'grad_norm'):
      if key in record and not math.isfinite(record[key]):
        return f'{key}={record[key]}'
    value = record.get(name)
    if value is None or len(self.history) < self.policy.min_history:
      return None
    median = statistics.median(self.history[-self.policy.window:])
    if value > self.policy.factor * median:
      return (f'{name}={value:.6g} > {self.policy.factor:g} x the median'
              f' {median:.6g} of the last {min(len(self.history), self.policy.window)}'
              ' log steps')
    return None

  def __call__(self, step, state, metrics):
    record = metrics.get('train')
    if not record:
      return None
    why = self.spike(record)
    if why is None:
      self.history.append(float(record[self.policy.metric]))
      del self.history[:-self.policy.window]
      self.last_good, self.probation = step, None
      return None
    if self.probation is not None:  # the rolled-back state spiked again
      self.bad.add(self.probation)
    if self.rollbacks >= self.policy.max_rollbacks:
      raise RunnerError(
          f'loss spike at step {step} ({why}) after'
          f' {self.rollbacks} rollback(s) (spike_guard.max_rollbacks='
          f'{self.policy.max_rollbacks}); the checkpoints up to step'
          f' {self.last_good} are kept. Lower the learning rate, clip'
          ' gradients or check the data, and resume.')
    self.ckpt.wait()  # a background save of the last good step lands first
    target = self._target()
    if target is None:
      raise RunnerError(
          f'loss spike at step {step} ({why}) and no checkpoint at or before'
          f' the last good step {self.last_good} to roll back to.')
    self.rollbacks += 1
    self._move_spiked()
    self.install(self._restore(target, step, state))
    self.probation = target
    info = {'loss': float(record.get(self.policy.metric, float('nan'))),
            'rolled_back_to': target, 'skipped_steps': step - target,
            'rollbacks': self.rollbacks}
    metrics['spike_guard'] = info
    if self.main:
      logging.warning(
          'Loss spike at step %d (%s): rolled back to the checkpoint of step'
          ' %d, skipping the %d batches since; rollback %d of %d.', step, why,
          target, step - target, self.rollbacks, self.policy.max_rollbacks)
      self.writer.write_scalars(
          step, {k: (v if math.isfinite(v) else 1e308) if isinstance(v, float)
                 else v for k, v in info.items()}, split='spike_guard')
    return None

  # -- rollback -----------------------------------------------------------

  def _steps(self) -> list[int]:
    out = []
    for path in checkpoint_naming.all_checkpoints(self.ckpt.dir,
                                                  self.ckpt.policy.prefix):
      try:
        out.append(int(path.rsplit('/', 1)[-1][len(self.ckpt.policy.prefix):]))
      except ValueError:
        continue
    return sorted(out)

  def _target(self) -> int | None:
    good = [s for s in self._steps() if s <= self.last_good
            and s not in self.bad]
    return good[-1] if good else None

  def _move_spiked(self) -> None:
    """Checkpoints newer than the last good step go to spiked_checkpoints/."""
    if not self.main:
      return
    newer = [s for s in self._steps() if s > self.last_good]
    target_dir = workdir_lib.path(self.workdir, SPIKED_DIR)
    for s in newer:
      path = self.ckpt.path(s)
      for source in (path, path + '_gda'):
        if storage.exists(source, follow_symlinks=False):
          name = source.rstrip('/').rsplit('/', 1)[-1]
          storage.move(source, storage.join(target_dir, name))
      logging.warning('Checkpoint %s was written after the loss spiked: moved'
                      ' to %s/.', path, SPIKED_DIR)

  def _restore(self, target: int, step: int, live=None):
    path = self.ckpt.path(target)
    if self.shapes is None:
      self.shapes = self._shapes()
    # Frozen parameters (train.trainable: a state with a base_hash) are not
    # in the checkpoint: the live state's, unchanged since the start, fill in.
    frozen = getattr(live, 'base_hash', None) is not None
    state, _ = checkpoints_lib.restore_state(
        path, live if frozen else self.shapes,
        self.partitioner,
        checkpoints_lib.read_runner_checkpoint(path), target)
    old = state.step
    dtype = np.asarray(jax.device_get(old)).dtype
    new = np.asarray(step, dtype)
    sharding = getattr(old, 'sharding', None)
    return state.replace(step=jax.device_put(new, sharding)
                         if sharding is not None else new)


class GuardedSave(checkpoint_action.SaveCheckpoint):
  """``SaveCheckpoint`` that saves nothing while ``guard`` is on probation
  (after a rollback, until a log step is good again)."""

  def __init__(self, guard: SpikeGuard, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.guard = guard

  def save(self, step: int, overwrite: bool = False) -> bool:
    if self.guard.probation is not None:
      if self.guard.main:
        logging.warning('Not saving step %d: the loss has not been good'
                        ' since the rollback to step %d.', step,
                        self.guard.probation)
      return False
    return super().save(step, overwrite)
