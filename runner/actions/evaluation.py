"""Evaluation on the held-out batches, every N steps and at the end."""

import time
from collections.abc import Callable

from absl import logging

from gintrain.runner.actions import base
from gintrain.runner.actions import report

__all__ = ['Evaluate']


class Evaluate(base.PeriodicAction):
  """Runs ``evaluate(state)`` and records its metrics as ``metrics['eval']``.

  Args:
    evaluate: ``state -> {name: mean}`` over the eval batches.
    writer: receives the ``eval`` record.
    every_steps: the period.
    log: whether to write log lines (process 0).
  """

  name = 'eval'

  def __init__(self, evaluate: Callable, writer, every_steps: int,
               log: bool = True):
    super().__init__(every_steps)
    self.evaluate, self.writer, self.log = evaluate, writer, log
    self.last: dict = {}
    self.last_step: int | None = None
    self.seconds = 0.0  # spent evaluating (kept out of the train rates)

  def __call__(self, step, state, metrics):
    start = time.perf_counter()
    result = self.evaluate(state)
    self.seconds += time.perf_counter() - start
    if not result:  # the source has no eval data
      return
    self.last, self.last_step = result, step
    metrics['eval'] = result
    self.writer.write_scalars(step, result, split='eval')
    if self.log:
      logging.info('eval at step %d: %s', step, report.format_metrics(result))
