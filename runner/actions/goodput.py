"""Goodput records: where the run's wall time went, at each log step.

``runner.training.goodput`` keeps the accounts; this action writes its
record (``split='goodput'`` in ``metrics.jsonl``: seconds and fractions of
startup, compile, step, input, checkpoint, eval, agreement and idle, the
process's start and the first step of this launch) taken at each log step
(written a few steps later, while the device computes:
``runner.actions.deferred``) and once more when the run ends (also after
an error). ``gintrain goodput WORKDIR`` reads them back over all the
launches of a run.
"""

from collections.abc import Callable

from absl import logging

from gintrain.runner.actions import deferred

__all__ = ['GoodputReport']


class GoodputReport(deferred.DeferredRecord):
  """Takes ``record()`` at each log step and writes it as a ``goodput``
  record ``delay`` steps later (``runner.actions.deferred``: while the
  device computes), and a last one when the run ends.

  Args:
    writer: the run's metric writer.
    record: returns the record (``runner.training.goodput.Clock.record``).
    main: whether this is process 0 (the only one writing).
    delay: steps between taking a record and writing it.
  """

  goodput_part = 'idle'
  name = 'goodput'

  def __init__(self, writer, record: Callable[[], dict], main: bool = True,
               delay: int = 8):
    super().__init__(delay)
    self.writer, self.record, self.main = writer, record, main
    self.step = None  # the last step seen

  def __call__(self, step, state, metrics):
    self.step = step
    super().__call__(step, state, metrics)

  def take(self, step, metrics):
    return self.record() if self.main else None

  def emit(self, step, record):
    if self.main:
      self.writer.write_scalars(step, record, split='goodput')

  def close(self):
    if self.step is None or not self.main:
      return
    try:
      self.write()  # the pending record, then one as the run ends
      self.emit(self.step, self.record())
    except (RuntimeError, ValueError, OSError) as e:  # a closed writer
      logging.warning('Cannot write the last goodput record: %s', e)
