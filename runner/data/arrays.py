"""In-memory arrays as a DataSource: the batch at a step is f(seed, step).

Wraps a :class:`~.datasets.Dataset`. The global batch at step ``s`` is
``runner.data.batching.global_batch_indices(n, batch_size, seed, s)``; each
process takes its contiguous share. The position is ``{'seed', 'step'}``,
so a resumed run (on any number of processes) sees exactly the batches an
uninterrupted one would. Eval batches pad the test split to whole global
batches and mask the padding.
"""

from collections.abc import Iterator

import numpy as np

from gintrain.runner.data import base
from gintrain.runner.data import batching
from gintrain.runner.data.datasets import Dataset

__all__ = ['ArraySource']


class ArraySource(base.DataSource):
  """A :class:`~.base.DataSource` over a :class:`Dataset` held in memory.

    >>> from gintrain.runner.data import datasets
    >>> source = ArraySource(datasets.synthetic(num_train=8, num_test=3))
    >>> source.bind(base.Spec(batch_size=4, eval_batch_size=2, seed=0))
    >>> source.next_batch()['x'].shape, source.get_state()
    ((4, 16), {'seed': 0, 'step': 1})
    >>> [b['mask'].tolist() for b in source.eval_batches()]
    [[1.0, 1.0], [1.0, 0.0]]
  """

  def __init__(self, dataset: Dataset):
    self.dataset = dataset
    self.step = 0

  @property
  def name(self) -> str:
    return self.dataset.name

  @property
  def info(self):
    return self.dataset.info

  @property
  def steps_per_epoch(self) -> int:
    return batching.steps_per_epoch(self.dataset.num_train,
                                    self.spec.batch_size)

  def bind(self, spec: base.Spec) -> None:
    super().bind(spec)
    self.steps_per_epoch  # pylint: disable=pointless-statement  (checks)

  def sample(self) -> dict:
    return {'x': self.dataset.x_train[:1], 'y': self.dataset.y_train[:1]}

  def _rows(self, x, y, idx):
    return {'x': x[idx], 'y': y[idx]}

  def next_batch(self) -> dict:
    spec = self.spec
    idx = batching.global_batch_indices(self.dataset.num_train,
                                        spec.batch_size, spec.seed, self.step)
    if spec.process_count > 1:
      idx = batching.process_slice(idx, spec.process_index,
                                   spec.process_count)
    self.step += 1
    return self._rows(self.dataset.x_train, self.dataset.y_train, idx)

  def eval_batches(self) -> Iterator[dict]:
    spec, n = self.spec, self.dataset.num_test
    size = spec.eval_batch_size
    for start in range(0, n, size):
      idx = np.arange(start, start + size)
      mask = idx < n
      idx = np.where(mask, idx, 0)
      if spec.process_count > 1:
        idx, mask = (batching.process_slice(a, spec.process_index,
                                            spec.process_count)
                     for a in (idx, mask))
      yield {**self._rows(self.dataset.x_test, self.dataset.y_test, idx),
             'mask': mask.astype(np.float32)}

  def get_state(self) -> dict:
    return {'seed': self.spec.seed, 'step': self.step}

  def set_state(self, state) -> None:
    seed = int(state.get('seed', self.spec.seed))
    if seed != self.spec.seed:
      raise ValueError(f'the checkpoint\'s data order has seed {seed}, the'
                       f' run seed {self.spec.seed}; resume with'
                       f' train.seed={seed}.')
    self.step = int(state['step'])
