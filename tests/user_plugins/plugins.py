"""A task, a data source, an action and a metric writer, each in a few
lines, from outside the gintrain package (bound only through gin)."""

import json
import os

import gin
import jax.numpy as jnp
import numpy as np
import optax

from gintrain.runner.actions import base as actions
from gintrain.runner.data import base as data
from gintrain.runner.outputs import writers
from gintrain.runner.tasks import base as tasks


@gin.configurable
class HingeTask(tasks.Task):
  """Multi-class hinge loss; reports the margin violation rate."""

  def loss(self, params, mutable, batch, rng):
    out, new = self.apply_train(params, mutable, batch['x'], rng)
    loss = optax.losses.multiclass_hinge_loss(out, batch['y']).mean()
    return loss, {'violations': (loss > 0).astype(jnp.float32)}, new

  def eval(self, params, mutable, batch):
    out = self.apply_eval(params, mutable, batch['x'])
    per_example = optax.losses.multiclass_hinge_loss(out, batch['y'])
    return {'loss': (per_example * batch['mask']).sum(),
            'count': batch['mask'].sum()}


@gin.configurable
class Blobs(data.DataSource):
  """Endless Gaussian blobs, one class per blob; batch = f(seed, step)."""

  def __init__(self, classes=3, features=4):
    self.classes, self.features, self.step = classes, features, 0

  def _batch(self, key, rows):
    rng = np.random.default_rng(key)
    y = rng.integers(0, self.classes, rows).astype(np.int32)
    x = rng.normal(size=(rows, self.features)) + 3 * y[:, None]
    return {'x': x.astype(np.float32), 'y': y}

  def sample(self):
    return self._batch([0], 1)

  def next_batch(self):
    self.step += 1
    return self._batch([self.spec.seed, self.step, self.spec.process_index],
                       self.spec.local_batch_size)

  def eval_batches(self):
    batch = self._batch([99, self.spec.process_index], 64)
    yield {**batch, 'mask': np.ones(64, np.float32)}

  def get_state(self):
    return {'step': self.step}

  def set_state(self, state):
    self.step = int(state['step'])


@gin.configurable
class LogSteps(actions.PeriodicAction):
  """Appends the step and the train loss to ``path`` every N steps."""

  def __init__(self, path=gin.REQUIRED, every_steps=5):
    super().__init__(every_steps)
    self.path = path

  def __call__(self, step, state, metrics):
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': step, **metrics.get('train', {})}) + '\n')


@gin.configurable
class CsvWriter(writers.MetricWriter):
  """One ``split,step,name,value`` line per scalar in ``metrics.csv``."""

  def __init__(self, workdir):
    self.file = open(os.path.join(workdir, 'metrics.csv'), 'a',
                     encoding='utf-8')

  def _write_scalars(self, step, scalars, split):
    for name, value in scalars.items():
      self.file.write(f'{split},{step},{name},{value}\n')

  def _write_hparams(self, hparams, metrics):
    pass

  def _close(self):
    self.file.close()


@gin.configurable
class KillAt(actions.Action):
  """SIGKILLs this process after ``step`` (a crash, for resume tests), once
  the background checkpoint writes had a moment to finish."""

  def __init__(self, step=gin.REQUIRED):
    self.step = step

  def due(self, step, last):
    return step == self.step

  def __call__(self, step, state, metrics):
    import signal  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
