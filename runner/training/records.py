"""The train record of a log step: metric means, rates, input figures.

At a log step the loop fetches the metric sums into a record (see
``runner.actions.report`` for its keys). :class:`Rates` measures steps/s,
examples/s and tokens/s from the end of the first step of a launch (its
compilation kept out) with the evaluation time kept out.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from gintrain.runner.training import flops as flops_lib

__all__ = ['Rates', 'train_record', 'TrainResult']


@dataclasses.dataclass
class TrainResult:
  """What a run ends with (host values), from what the loop and the
  actions' end-of-run calls put into the last step's metrics.

  Attributes:
    state: the final train state (numpy leaves).
    step: the number of steps done (resumed ones included).
    train_metrics: the last train record.
    eval_metrics: the last eval metrics (``metrics['eval']``).
    stopped_early: whether early stopping ended the run
      (``metrics['stop_reason'] == 'early_stopping'``).
    best: ``[(step, value)]`` of the kept-best checkpoints, best first
      (``metrics['best']``).
  """
  state: Any
  step: int
  train_metrics: dict
  eval_metrics: dict
  stopped_early: bool = False
  best: list = dataclasses.field(default_factory=list)


class Rates:
  """Steps/s, examples/s and tokens/s between fetches. The clock starts at
  the end of the first step of a launch (compilation kept out) and the
  time spent in ``excluded()`` (evaluation) is kept out."""

  def __init__(self, start: int, batch_size: int,
               excluded: Callable[[], float], tokens_per_example=None):
    self.batch_size, self.excluded = batch_size, excluded
    self.tokens_per_example = tokens_per_example
    self.tick, self.tick_step = time.perf_counter(), start
    self.tick_excluded = excluded()
    self.started = False

  def after_first_step(self, step, sums):
    """Waits for the first (compiling) step and restarts the clock."""
    jax.block_until_ready(sums)
    self.tick, self.tick_step = time.perf_counter(), step
    self.tick_excluded = self.excluded()
    self.started = True

  def means(self, step, host_sums, since):
    now, excluded = time.perf_counter(), self.excluded()
    out = {k: float(v) / max(step - since, 1) for k, v in host_sums.items()}
    steps_done = step - self.tick_step
    seconds = now - self.tick - (excluded - self.tick_excluded)
    self.tick_excluded = excluded
    if steps_done > 0:
      rate = steps_done / max(seconds, 1e-9)
      out['steps_per_sec'] = rate
      out['examples_per_sec'] = rate * self.batch_size
      if self.tokens_per_example:
        out['tokens_per_sec'] = (rate * self.batch_size *
                                 self.tokens_per_example)
    self.tick, self.tick_step = now, step
    return out


def train_record(run, record: dict, norms: dict, step: int,
                 first: bool) -> dict:
  """``record`` (the means and rates) with the norms, the learning rate,
  the source's ``data_wait_fraction`` (``take_wait_fraction()``, when it has
  one and it is not None) and, in the ``first`` record of a launch, the
  source's ``packing_efficiency`` (from ``info``); ``model_flops_per_sec``
  and ``mfu`` where known (``runner.training.flops``)."""
  record.update({k: float(v) for k, v in norms.items()})
  if run.learning_rate is not None:
    record['learning_rate'] = float(run.learning_rate(step - 1))
  wait = getattr(run.source, 'take_wait_fraction', None)
  wait = wait() if callable(wait) else None
  if wait is not None:
    record['data_wait_fraction'] = float(wait)
  if first and 'packing_efficiency' in run.source.info:
    record['packing_efficiency'] = float(
        run.source.info['packing_efficiency'])
  _add_flops(run, record)
  return record


_SAID_NO_PEAK: set = set()  # where the peak was looked up, said once


def _add_flops(run, record: dict) -> None:
  """``model_flops_per_sec`` (the model's FLOPs per token x tokens/s) and
  ``mfu`` (over the peak of all devices) when known; see
  ``runner.training.flops``."""
  per_token = flops_lib.flops_per_token(
      run.model, run.source.info.get('tokens_per_example'))
  if per_token is None or 'tokens_per_sec' not in record:
    return
  record['model_flops_per_sec'] = per_token * record['tokens_per_sec']
  peak, where = flops_lib.device_peak(
      getattr(run.config, 'peak_flops_per_device', None))
  if peak:
    record['mfu'] = record['model_flops_per_sec'] / (
        peak * jax.device_count())
  elif where not in _SAID_NO_PEAK:
    _SAID_NO_PEAK.add(where)
    if jax.process_index() == 0:
      logging.info('No mfu in the train records: the peak FLOP/s of %s is'
                   ' not known; set train.peak_flops_per_device.', where)
