"""Records taken at a log step and written a few steps later.

At a log step the loop has just waited for the step's metrics: the device
is idle until the next step is dispatched, so host work done then (encoding
and writing records, a log line) adds to the run's time. A
:class:`DeferredRecord` takes its record at the log step (cheap) and writes
it ``delay`` steps later, while the device computes the steps dispatched in
between; or at the next record, the end of the run or the close, whichever
comes first. When the log steps are ``delay`` or fewer steps apart there
is no step to hide behind: the record is written at once.

    >>> class Print(DeferredRecord):
    ...   def take(self, step, metrics):
    ...     return metrics['train']['loss']
    ...   def emit(self, step, record):
    ...     print(f'step {step}: {record} (written after step {self.now})')
    >>> action = Print(delay=2)
    >>> action.log_every = 5
    >>> for step in range(1, 11):
    ...   action.now = step
    ...   metrics = {'train': {'loss': step / 10}} if step % 5 == 0 else {}
    ...   if action.due(step, False):
    ...     action(step, None, metrics)
    step 5: 0.5 (written after step 7)
    >>> action.end(10, None, {'train': {'loss': 1.0}})
    step 10: 1.0 (written after step 10)
"""

import abc
from typing import Any

from gintrain.runner.actions import base

__all__ = ['DeferredRecord']


class DeferredRecord(base.Action):
  """Takes a record at each log step (``metrics['train']`` present) and
  emits it ``delay`` steps later (see the module doc).

  Subclasses implement :meth:`take` and :meth:`emit`.

  Args:
    delay: steps between taking a record and writing it.
  """

  def __init__(self, delay: int = 8):
    self.delay = delay
    self.pending = None   # (step, record) taken, not yet emitted
    self.write_at = None  # the step at which it is emitted
    self.seen = None      # the step of the last record taken
    self.log_every = 1    # from the run (bind): where records are

  def bind(self, run, workdir):
    self.log_every = run.config.log_every or 1

  @abc.abstractmethod
  def take(self, step: int, metrics: dict) -> Any:
    """The record of the log step ``step`` (called right after its fetch)."""

  @abc.abstractmethod
  def emit(self, step: int, record: Any) -> None:
    """Writes the record taken at ``step``."""

  def due(self, step, last):
    # At the log steps (to take the record) and `delay` steps after one (to
    # write it): skipped at the others, without a call.
    return (step % self.log_every == 0 or last or
            (self.write_at is not None and step >= self.write_at))

  def __call__(self, step, state, metrics):
    if 'train' in metrics and step != self.seen:
      self.seen = step
      self.write()
      self.pending = (step, self.take(step, metrics))
      self.write_at = step + self.delay
      if self.delay >= self.log_every:  # no step between records to use
        self.write()
    if self.pending is not None and step >= self.write_at:
      self.write()

  def write(self) -> None:
    """Emits the pending record, if any."""
    if self.pending is None:
      return
    step, record = self.pending
    self.pending = self.write_at = None
    self.emit(step, record)

  def end(self, step, state, metrics):
    self(step, state, metrics)
    self.write()

  def close(self):
    self.write()
