"""Agreed preemption: all processes save at the same step, then stop."""

import signal
from collections.abc import Callable

import jax

from gintrain.runner.actions import base
from gintrain.runner.parallel import preemption

__all__ = ['Preempted', 'CheckPreemption']


class Preempted(Exception):
  """Raised after the preemption checkpoint is written; exit and requeue.

  Attributes:
    step: the step of the checkpoint.
    signum: the signal all processes stopped for
      (``preemption.stop_signal()``; None without one).
    exit_code: the process's exit status: 130 for SIGINT (Ctrl-C), else
      ``preemption.PREEMPTED_EXIT_CODE`` (75).
  """

  def __init__(self, step, signum=None):
    self.step, self.signum = step, signum
    self.exit_code = preemption.exit_code(signum)
    what = 'interrupted (Ctrl-C)' if signum == signal.SIGINT else 'preempted'
    super().__init__(f'{what} at step {step}; checkpoint saved')


class CheckPreemption(base.Action):
  """Every ``--preemption_check_interval`` steps, asks all processes whether
  any received SIGTERM/SIGUSR1/SIGINT; if so saves (``save(step)``), waits
  for the write and raises :class:`Preempted` (with the agreed signal) on
  every process.

  In one process only the local flag is read (a microsecond), so the check
  runs only once a signal arrived.
  """

  name = 'preemption'

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
      signum = preemption.stop_signal()
      self.save(step)
      self.wait()
      raise Preempted(step, signum)

  def end(self, step, state, metrics):
    """Nothing: the final checkpoint is written already."""

  def close(self):
    preemption.close_agreement()
    preemption.uninstall()
