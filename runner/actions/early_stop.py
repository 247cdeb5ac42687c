"""Early stopping on an eval metric (``lib.early_stopping`` semantics)."""

from absl import logging

from gintrain.lib import serialization
from gintrain.runner.actions import base

__all__ = ['EarlyStop']


class EarlyStop(base.Action):
  """Updates the stopper after each evaluation; stops when it says so.

  Checkpointed under ``early_stopping``.

  Args:
    stopper: a ``runner.training.state.EarlyStopper``.
    log: whether to write log lines (process 0).
  """
  checkpoint_key = 'early_stopping'
  name = 'early_stopping'
  records_only = True

  def __init__(self, stopper, log: bool = True):
    self.stopper, self.log = stopper, log
    self.seen = None  # the step of the last evaluation taken

  def on_start(self, step):
    return self.should_stop  # restored as stopped: the run ends at once

  @property
  def should_stop(self) -> bool:
    return bool(self.stopper.state.should_stop)

  def due(self, step, last):
    return True

  def __call__(self, step, state, metrics):
    if 'eval' not in metrics or step == self.seen:
      return self.should_stop if step == self.seen else None
    self.seen = step
    self.stopper = self.stopper.update(metrics['eval'])
    if self.should_stop and self.log:
      s = self.stopper
      logging.info('Early stopping at step %d: %s has not improved for %d'
                   ' evaluations (best %.4f).', step, s.metric,
                   s.state.patience_count, s.state.best_metric)
    return self.should_stop

  def end(self, step, state, metrics):
    """Takes a final evaluation; publishes ``metrics['stop_reason']``."""
    if self(step, state, metrics):
      metrics['stop_reason'] = 'early_stopping'

  def get_state(self):
    return self.stopper.state

  def set_state(self, state):
    if not state:
      return
    current = self.stopper.state
    restored = serialization.from_state_dict(current, state)
    self.stopper = self.stopper._replace(state=restored.replace(
        min_delta=current.min_delta, patience=current.patience))
