"""An action that runs once, after the first step of a launch.

For work that needs one step done (e.g. gin's operative config, which
lists what the first step's tracing called) but no per-step call after it:
once it has run, :meth:`Once.due` is false, so the loop skips it without a
call or a goodput span.

    >>> seen = []
    >>> action = Once(seen.append)
    >>> for step in (1, 2, 3):
    ...   if action.due(step, False):
    ...     action(step, None, {})
    >>> seen
    [1]
"""

from collections.abc import Callable
from typing import Any

from gintrain.runner.actions import base

__all__ = ['Once']


class Once(base.Action):
  """Calls ``fn(step)`` after the first step of a launch (or at the end,
  if no step ran), then never again.

  Args:
    fn: called as ``fn(step)``.
  """

  def __init__(self, fn: Callable[[int], Any]):
    self.fn = fn
    self.done = False

  def due(self, step, last):
    return not self.done

  def __call__(self, step, state, metrics):
    self.fn(step)
    self.done = True
