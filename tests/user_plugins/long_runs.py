"""Data sources and faults for the long-run tests (tests/test_long_runs.py),
bound only through gin (``import long_runs``): a digits source with one
planted bad batch or a slow ``next_batch``, and an action that SIGKILLs its
own process once at a step."""

import os
import signal
import time

import gin

from gintrain.runner.actions import base as actions
from gintrain.runner.data import arrays
from gintrain.runner.data import datasets


@gin.configurable
class SpikyDigits(arrays.ArraySource):
  """The digits data; the batch of train step ``bad_step`` (1-based; 0:
  none) has its inputs times ``scale``; each batch waits ``delay_s``."""

  def __init__(self, bad_step=0, scale=1e4, delay_s=0.0):
    super().__init__(datasets.digits())
    self.bad_step, self.scale, self.delay_s = bad_step, scale, delay_s

  def next_batch(self):
    batch = super().next_batch()
    if self.delay_s:
      time.sleep(self.delay_s)
    if self.bad_step and self.step == self.bad_step:
      batch = {**batch, 'x': batch['x'] * self.scale}
    return batch


@gin.configurable
class KillAt(actions.Action):
  """SIGKILLs this process after ``step`` unless ``marker`` exists (it is
  created first: one kill per marker)."""

  def __init__(self, step=gin.REQUIRED, marker=gin.REQUIRED):
    self.step, self.marker = step, marker

  def due(self, step, last):
    return step == self.step and not os.path.exists(self.marker)

  def __call__(self, step, state, metrics):
    with open(self.marker, 'w', encoding='utf-8') as f:
      f.write(str(step))
    os.kill(os.getpid(), signal.SIGKILL)
