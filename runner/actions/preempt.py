"""Agreed preemption: all processes save at the same step, then stop."""

from collections.abc import Callable

import jax

from gintrain.runner.actions import base
from gintrain.runner.parallel import preemption

__all__ = ['Preempted', 'CheckPreemption']


class Preempted(Exception):
  """Raised after the preemption checkpoint is written; exit and requeue."""

  def __init__(self, step):
    self.step = step
    super().__init__(f'preempted at step {step}; checkpoint saved')


class CheckPreemption(base.Action):
  """Every ``--preemption_check_interval`` steps, asks all processes whether
  any received SIGTERM/SIGUSR1; if so saves (``save(step)``), waits for the
  write and raises :class:`Preempted` on every process.

  In one process only the local flag is read (a microsecond), so the check
  runs only once a signal arrived.
  """

  def __init__(self, save: Callable[[int], object],
               wait: Callable[[], None]):
    self.save, self.wait = save, wait
    self.interval = preemption.check_interval()
    self.agree = jax.process_count() > 1
    preemption.install()

  def due(self, step, last):
    return (self.agree or preemption.requested()) and (
        step % self.interval == 0)

  def __call__(self, step, state, metrics):
    if preemption.should_stop(step, self.interval):
      self.save(step)
      self.wait()
      raise Preempted(step)

  def close(self):
    preemption.uninstall()
