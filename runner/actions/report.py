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
so the device computes meanwhile instead of idling.
"""

import math

from absl import logging

from gintrain.runner.actions import base

__all__ = ['ReportTrain', 'format_metrics', 'format_eta']

_RATE_KEYS = ('steps_per_sec', 'examples_per_sec')


def format_metrics(metrics) -> str:
  return ' '.join(f'{k}={v:.4f}' for k, v in metrics.items())


def format_eta(seconds) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class ReportTrain(base.Action):
  """Writes ``metrics['train']`` to ``writer`` and logs it (process 0).

  Args:
    writer: a ``runner.outputs.writers.MetricWriter``.
    total: the run's last step (for the ETA).
    log: whether to write log lines (process 0).
    delay: steps between the fetch and the write.
  """

  name = 'report'

  def __init__(self, writer, total: int, log: bool = True, delay: int = 8):
    self.writer, self.total, self.log, self.delay = writer, total, log, delay
    self.pending = None
    self.last: dict = {}
    self.seen = None  # the step of the last record taken
    self.log_every = 1  # from the run (bind): where records are
    self.write_at = None  # the step at which the pending record is written

  def bind(self, run, workdir):
    self.log_every = run.config.log_every or 1

  def due(self, step, last):
    # At the log steps (to take the record) and `delay` steps after one (to
    # write it): skipped at the others, without a call.
    return (step % self.log_every == 0 or last or
            (self.write_at is not None and step >= self.write_at))

  def __call__(self, step, state, metrics):
    if 'train' in metrics and step != self.seen:
      self.seen = step
      self.write()
      self.pending = (step, dict(metrics['train']))
      self.write_at = step + self.delay
      self.last = self.pending[1]
    if self.pending is not None and step >= self.pending[0] + self.delay:
      self.write()

  def write(self) -> None:
    """Writes the pending record, if any."""
    if self.pending is None:
      return
    step, record = self.pending
    self.pending = self.write_at = None
    self.writer.write_scalars(step, record)
    if self.log and logging.level_info():  # no formatting for nothing
      shown = {k: v for k, v in record.items()
               if k not in _RATE_KEYS and k != 'learning_rate'}
      rate = record.get('steps_per_sec', float('nan'))
      logging.info('step %d/%d: %s | %.1f steps/s | ETA %s', step, self.total,
                   format_metrics(shown), rate,
                   format_eta((self.total - step) / rate if rate else
                              float('nan')))

  def end(self, step, state, metrics):
    self(step, state, metrics)
    self.write()

  def close(self):
    self.write()
