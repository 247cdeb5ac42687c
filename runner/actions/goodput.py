"""Goodput records: where the run's wall time went, at each log step.

``runner.training.goodput`` keeps the accounts; this action writes its
record (``split='goodput'`` in ``metrics.jsonl``: seconds and fractions of
startup, compile, step, input, checkpoint, eval, agreement and idle, the
process's start and the first step of this launch) at each log step and
once more when the run ends (also after an error). ``gintrain goodput
WORKDIR`` reads them back over all the launches of a run.
"""

from collections.abc import Callable

from absl import logging

from gintrain.runner.actions import base

__all__ = ['GoodputReport']


class GoodputReport(base.Action):
  """Writes ``record()`` as a ``goodput`` record at log steps and at the end.

  Args:
    writer: the run's metric writer.
    record: returns the record (``runner.training.goodput.Clock.record``).
    main: whether this is process 0 (the only one writing).
  """

  goodput_part = 'idle'
  name = 'goodput'
  records_only = True  # the end call (Action.end) still sees the last step

  def __init__(self, writer, record: Callable[[], dict], main: bool = True):
    self.writer, self.record, self.main = writer, record, main
    self.step = None     # the last step seen
    self.written = None  # the last step written

  def __call__(self, step, state, metrics):
    self.step = step
    if 'train' in metrics:
      self.write(step)

  def write(self, step: int) -> None:
    if self.main:
      self.writer.write_scalars(step, self.record(), split='goodput')
      self.written = step

  def close(self):
    if self.step is None or not self.main:
      return
    try:
      self.write(self.step)
    except (RuntimeError, ValueError, OSError) as e:  # a closed writer
      logging.warning('Cannot write the last goodput record: %s', e)
