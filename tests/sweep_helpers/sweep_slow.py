"""A training step that takes a while (tests of `gintrain sweep` only).

``sweep_slow.Pause(seconds)`` sleeps after every step, so a test can kill a
sweep while a trial is mid-run (checkpoints written, not finished). It
changes no value: a paused run is bitwise the run without it. Imported by
the trials through ``--gin_bindings='import sweep_slow'`` with this folder
on ``PYTHONPATH``.
"""

import time

import gin

from gintrain.runner.actions import base


@gin.configurable(module='sweep_slow')
class Pause(base.Action):

  def __init__(self, seconds=0.05):
    self.seconds = seconds

  def __call__(self, step, state, metrics):
    time.sleep(self.seconds)
