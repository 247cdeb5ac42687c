"""A dataset whose training batches take a fixed time to load (tests only).

``slow_synthetic(delay, ...)`` is ``runner.datasets.synthetic(...)`` whose
``x_train`` sleeps ``delay`` seconds on every indexing, as a slow input
pipeline would: the runner then takes at least ``delay`` per step, so a test
can signal or kill processes mid-run without racing the end of training.
The values are identical to ``synthetic``'s. Registered with gin as
``slow_data.slow_synthetic`` (``import slow_data`` in a gin file, with this
directory on ``PYTHONPATH``).
"""

import dataclasses
import time

import gin
import numpy as np

from gintrain.runner.data import datasets

_delay = [0.0]


class _SlowArray(np.ndarray):
  """An ndarray whose ``[...]`` sleeps first and returns a plain ndarray."""

  def __getitem__(self, index):
    time.sleep(_delay[0])
    return np.asarray(self)[index]


@gin.configurable(module='slow_data')
def slow_synthetic(delay: float = 0.02, **kwargs) -> datasets.Dataset:
  if delay < 0:
    raise ValueError(f'slow_synthetic.delay must be >= 0, got {delay}')
  _delay[0] = delay
  data = datasets.synthetic(**kwargs)
  return dataclasses.replace(data, x_train=data.x_train.view(_SlowArray),
                             name=f'slow {data.name}')
