"""Periodic and final checkpoints (the final one written and waited for
before the other end-of-run actions)."""

from collections.abc import Callable
from typing import Any

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

  def save(self, step: int) -> bool:
    return self.checkpointer.save(step, lambda: self.snapshot(step))

  def __call__(self, step, state, metrics):
    self.save(step)

  def end(self, step, state, metrics):
    """The final checkpoint, waited for (also after a background save)."""
    self.save(step)
    self.checkpointer.wait()
