"""Train records and log lines, written shortly after their metric fetch.

At a log step the loop fetches the metric sums (which waits for that step)
into ``metrics['train']``: the means since the previous record, the
learning rate, ``data_wait_fraction`` (the share of the time the loop waited
for input, when the source tells it) and the rates ``steps_per_sec``,
``examples_per_sec`` and ``tokens_per_sec`` (and the ETA of the log line).
The rates leave out evaluation time and, in the first record of a launch,
the first step (compilation): they are measured from the end of the first
step. The first record also carries ``packing_efficiency`` when the source's
``info`` has it. Writing the record and the log line (about a
millisecond of host work) waits until ``delay`` more steps are dispatched,
so the device computes meanwhile instead of idling
(``runner.actions.deferred``).
"""

import math

from absl import logging

from gintrain.runner.actions import deferred

__all__ = ['ReportTrain', 'format_metrics', 'format_eta']

_RATE_KEYS = ('steps_per_sec', 'examples_per_sec')


def format_metrics(metrics) -> str:
  return ' '.join(f'{k}={v:.4f}' for k, v in metrics.items())


def format_eta(seconds) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class ReportTrain(deferred.DeferredRecord):
  """Writes ``metrics['train']`` to ``writer`` and logs it (process 0),
  ``delay`` steps after the log step (``runner.actions.deferred``).

  Args:
    writer: a ``runner.outputs.writers.MetricWriter``.
    total: the run's last step (for the ETA).
    log: whether to write log lines (process 0).
    delay: steps between the fetch and the write.
  """

  name = 'report'

  def __init__(self, writer, total: int, log: bool = True, delay: int = 8):
    super().__init__(delay)
    self.writer, self.total, self.log = writer, total, log
    self.last: dict = {}

  def take(self, step, metrics):
    self.last = dict(metrics['train'])
    return self.last

  def emit(self, step, record):
    self.writer.write_scalars(step, record)
    if self.log and logging.level_info():  # no formatting for nothing
      shown = {k: v for k, v in record.items()
               if k not in _RATE_KEYS and k != 'learning_rate'}
      rate = record.get('steps_per_sec', float('nan'))
      logging.info('step %d/%d: %s | %.1f steps/s | ETA %s', step, self.total,
                   format_metrics(shown), rate,
                   format_eta((self.total - step) / rate if rate else
                              float('nan')))
