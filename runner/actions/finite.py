"""Divergence check: the run stops on a non-finite train metric."""

import jax
import jax.numpy as jnp
import numpy as np

from gintrain.runner.actions import base
from gintrain.runner.errors import RunnerError

__all__ = ['CheckFinite', 'diverged', 'all_finite']


@jax.jit
def all_finite(tree):
  """Whether every leaf of ``tree`` is finite (one device scalar)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

WATCHED = ('loss', 'grad_norm')


def diverged(step: int, name: str, value, checkpointer) -> None:
  """Raises the one-line divergence error, naming the kept checkpoint."""
  latest = checkpointer.latest_step()
  kept = (f'the last finite checkpoint, step {latest}, is kept' if latest
          is not None else 'no checkpoint was written')
  raise RunnerError(
      f'training diverged at step {step}: {name}={value}; {kept}. Lower the'
      ' learning rate (or clip gradients) and resume.')


class CheckFinite(base.Action):
  """Stops the run (``RunnerError``) when ``loss`` or ``grad_norm`` of
  ``metrics['train']`` is not finite. In the default list when the spike
  guard is off (the guard rolls such steps back instead).

  Args:
    checkpointer: the run's ``runner.outputs.checkpoints.Checkpointer``
      (named in the error).
  """

  name = 'finite_check'
  records_only = True
  end_first = True  # a diverged final state is not saved

  def __init__(self, checkpointer):
    self.checkpointer = checkpointer

  def __call__(self, step, state, metrics):
    record = metrics.get('train') or {}
    for name in WATCHED:
      if name in record and not np.isfinite(record[name]):
        diverged(step, name, record[name], self.checkpointer)
