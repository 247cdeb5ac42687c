"""Faults for the reliability tests, as a user's action would cause them
(bound only through gin: ``import faults`` then
``train.actions = [@faults.HangAt()]``)."""

import threading

import gin
import jax

from gintrain.runner.actions import base as actions


@gin.configurable
class HangAt(actions.Action):
  """Blocks forever after ``step`` on process ``process`` (a hung step as
  the watchdog sees it: the loop makes no more progress there, and the
  other processes wait for it in the next step's collectives)."""

  def __init__(self, step=gin.REQUIRED, process=1):
    self.step, self.process = step, process

  def due(self, step, last):
    return step == self.step and jax.process_index() == self.process

  def __call__(self, step, state, metrics):
    print(f'HANGING at step {step} on process {jax.process_index()}',
          flush=True)
    threading.Event().wait()  # forever, GIL released
