"""Periodic and final checkpoints (the final one written and waited for
before the other end-of-run actions)."""

from collections.abc import Callable
from typing import Any

import numpy as np

from gintrain.lib import serialization
from gintrain.runner.actions import base

__all__ = ['SaveCheckpoint']


class SaveCheckpoint(base.PeriodicAction):
  """Saves ``snapshot(step)`` every ``every_steps`` steps and at the end
  (a step already saved is not saved again).

  Args:
    checkpointer: a ``runner.outputs.checkpoints.Checkpointer``.
    snapshot: ``step -> tree`` to save.
    every_steps: the period (0 or None: only the final checkpoint).
  """

  name = 'checkpoint'
  end_first = True  # the final checkpoint lands before the final eval

  def __init__(self, checkpointer, snapshot: Callable[[int], Any],
               every_steps: int | None):
    super().__init__(every_steps)
    self.checkpointer, self.snapshot = checkpointer, snapshot
    self.final = None  # (step, action states) of the final checkpoint

  def save(self, step: int, overwrite: bool = False) -> bool:
    return self.checkpointer.save(step, lambda: self.snapshot(step),
                                  overwrite)

  def __call__(self, step, state, metrics):
    self.save(step)

  def end(self, step, state, metrics):
    """The final checkpoint, waited for (also after a background save)."""
    self.save(step)
    self.checkpointer.wait()
    self.final = (step, _action_states(self.snapshot(step)))

  def after_end(self, step, state, metrics):
    """Saves the final checkpoint again if a final evaluation changed a
    checkpointed action's state (early stopping, keep-best): the final
    checkpoint holds the run's final state."""
    if self.final is None or self.final[0] != step:
      return
    if _action_states(self.snapshot(step)) != self.final[1]:
      self.save(step, overwrite=True)
      self.checkpointer.wait()


def _action_states(tree) -> list:
  """The checkpointed actions' states of a checkpoint tree, comparable
  with ``==`` (flat ``(key, leaf, repr)`` triples)."""
  out = []
  for key in sorted(k for k in tree if k not in ('state', 'data')):
    flat = serialization.to_state_dict(tree[key])
    leaves = flat.items() if isinstance(flat, dict) else [('', flat)]
    for name, value in sorted(leaves, key=lambda kv: str(kv[0])):
      out.append((key, str(name), repr(np.asarray(value).tolist())
                  if not isinstance(value, dict) else repr(value)))
  return out
