"""Stand-ins for the built-in actions and two data sources, for
tests/test_actions_replace.py, bound only through gin (``import
replacements``)."""

import json

import gin
import numpy as np

from gintrain.runner.actions import base as actions
from gintrain.runner.data import arrays
from gintrain.runner.data import base as data
from gintrain.runner.data import datasets


@gin.configurable
class Recording(actions.Action):
  """Replaces ``built_in`` (``train.replace_actions = {name: @Recording}``):
  appends ``{"name": ..., "step": ..., "end": ...}`` lines to ``path``."""

  def __init__(self, built_in, path=gin.REQUIRED):
    self.replaced, self.path = built_in.name, path

  def _write(self, step, end):
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'name': self.replaced, 'step': step, 'end': end})
              + '\n')

  def __call__(self, step, state, metrics):
    self._write(step, False)

  def end(self, step, state, metrics):
    self._write(step, True)


def _synthetic():
  return datasets.synthetic(num_train=512, num_test=128, num_features=16,
                            num_classes=4)


@gin.configurable
class WaitingSynthetic(arrays.ArraySource):
  """The synthetic data, telling a wait fraction and a packing efficiency."""

  def __init__(self):
    super().__init__(_synthetic())
    self.asked = 0

  @property
  def info(self):
    return {**super().info, 'packing_efficiency': 0.875}

  def take_wait_fraction(self):
    self.asked += 1
    return 0.25


@gin.configurable
class Unsized(data.DataSource):
  """Synthetic-shaped batches from a source that does not know the size of
  its eval set (so ``train.eval_batch_size`` is not capped)."""

  def __init__(self):
    self.step = 0

  def sample(self):
    return {'x': np.zeros((1, 16), np.float32), 'y': np.zeros((1,), np.int32)}

  def next_batch(self):
    n = self.spec.local_batch_size
    self.step += 1
    return {'x': np.full((n, 16), self.step % 3, np.float32),
            'y': np.full((n,), self.step % 4, np.int32)}

  def eval_batches(self):
    yield {**self.sample(), 'mask': np.ones((1,), np.float32)}

  def get_state(self):
    return {'step': self.step}

  def set_state(self, state):
    self.step = int(state.get('step', 0))
