"""Keep-best: the checkpoints of the best eval values of one metric."""

from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from gintrain.runner.actions import base

__all__ = ['KeepBest']


class KeepBest(base.Action):
  """After each evaluation, saves a checkpoint into ``best_checkpoints/`` if
  the metric ranks among the ``keep`` best, and removes the one it evicts.

  Checkpointed under ``best`` as ``{'steps': int64[k], 'values':
  float64[k]}``, best first.

  Args:
    checkpointer: a ``runner.outputs.checkpoints.Checkpointer``.
    snapshot: ``step -> tree`` to save (called only when saving).
    metric: the eval metric.
    mode: ``'min'`` or ``'max'``.
    keep: how many to keep.
    log: whether to write log lines (process 0).
  """
  checkpoint_key = 'best'

  def __init__(self, checkpointer, snapshot: Callable[[int], Any],
               metric: str, mode: str = 'min', keep: int = 1,
               log: bool = True):
    self.checkpointer, self.snapshot = checkpointer, snapshot
    self.metric, self.mode, self.keep, self.log = metric, mode, keep, log
    self.best: list[tuple[int, float]] = []
    self.seen = None  # the step of the last evaluation taken
    self.restored = False

  name = 'keep_best'
  records_only = True

  def due(self, step, last):
    return True

  def on_start(self, step):
    """After a resume, drops best checkpoints newer than ``step`` that the
    restored record does not list (they will be recomputed, identically)."""
    if self.restored:
      self.checkpointer.prune_best_after(step, {s for s, _ in self.best})

  def end(self, step, state, metrics):
    """Takes a final evaluation; publishes ``metrics['best']``."""
    self(step, state, metrics)
    metrics['best'] = list(self.best)

  def __call__(self, step, state, metrics):
    if 'eval' not in metrics or step == self.seen:
      return
    self.seen = step
    value = float(metrics['eval'][self.metric])
    if not np.isfinite(value):
      return
    ranked = sorted(self.best + [(step, value)], key=lambda sv: sv[1],
                    reverse=self.mode == 'max')[:self.keep]
    if (step, value) not in ranked:
      return
    evicted = [s for s, v in self.best if (s, v) not in ranked]
    self.best = ranked
    self.checkpointer.save_best(step, self.snapshot(step), evicted)
    if self.log:
      logging.info('new best %s=%.4f at step %d', self.metric, value, step)

  def get_state(self):
    return {'steps': np.array([s for s, _ in self.best], np.int64),
            'values': np.array([v for _, v in self.best], np.float64)}

  def set_state(self, state):
    self.restored = True
    state = state or {}
    self.best = [(int(s), float(v)) for s, v in zip(
        np.asarray(state.get('steps', [])),
        np.asarray(state.get('values', [])))]
