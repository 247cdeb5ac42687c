"""A data source that writes down what each process trained on (tests only).

``recorded_data.recorded(source, record_dir, delay)`` wraps any
:class:`~runner.data.base.DataSource` (bound in gin, e.g.
``recorded.source = @data.jsonl()``) and, for every train batch it hands
out, appends one JSON line ``{"step": s, "ids": [...]}`` to
``record_dir/p<index>of<count>.<pid>.jsonl`` (default: the environment's
``GINTRAIN_RECORD_DIR``, so that launches resuming one workdir can record
apart under unchanged gin bindings): the step the batch is for
(counted from the resumed position, ``state['step']``) and the example id of
each of this process's rows (the text before the first space of the row's
first document, byte tokenizer). ``delay`` seconds of sleep per batch let a
test kill the run mid-way. Everything else is the wrapped source's.
Registered with gin as ``recorded_data.recorded`` (``import recorded_data``
with this directory on ``PYTHONPATH``).
"""

import json
import os
import time

import gin
import numpy as np

from gintrain.runner.data import base


def row_id(tokens) -> str:
  text = bytes(np.asarray(tokens, np.uint8).tolist()).decode('latin-1')
  return text.split(' ', 1)[0]


class Recorded(base.DataSource):
  """See the module doc."""

  def __init__(self, source, record_dir, delay=0.0):
    self.inner, self.record_dir, self.delay = source, record_dir, delay
    self.step = 0
    self._path = None

  def __getattr__(self, name):  # wait_seconds, take_wait_fraction, ...
    if name == 'inner':
      raise AttributeError(name)
    return getattr(self.inner, name)

  @property
  def name(self):
    return f'recorded {self.inner.name}'

  @property
  def info(self):
    return self.inner.info

  @property
  def steps_per_epoch(self):
    return self.inner.steps_per_epoch

  def bind(self, spec):
    super().bind(spec)
    self.inner.bind(spec)
    os.makedirs(self.record_dir, exist_ok=True)
    self._path = os.path.join(
        self.record_dir,
        f'p{spec.process_index}of{spec.process_count}.{os.getpid()}.jsonl')

  def sample(self):
    return self.inner.sample()

  def next_batch(self):
    if self.delay:
      time.sleep(self.delay)
    batch = self.inner.next_batch()
    ids = [row_id(row) for row in batch['tokens']]
    with open(self._path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': self.step, 'ids': ids}) + '\n')
    self.step += 1
    return batch

  def eval_batches(self):
    return self.inner.eval_batches()

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)
    self.step = int(state['step'])

  def close(self):
    self.inner.close()


@gin.configurable(module='recorded_data')
def recorded(source=gin.REQUIRED, record_dir=None, delay=0.0):
  return Recorded(source, record_dir or os.environ['GINTRAIN_RECORD_DIR'],
                  delay)
