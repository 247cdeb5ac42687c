"""Any iterable of batch dicts as a DataSource (resumed by replay).

For data the runner does not know: a gin-bound callable ``train(spec)``
returning an iterable of this process's batch dicts (numpy arrays), and
optionally ``eval(spec)`` returning the eval batches (a ``mask`` of ones is
added where missing)::

    @gin.configurable
    def my_batches(spec):
      for i in itertools.count():
        yield {'x': ..., 'y': ...}   # spec.local_batch_size rows

    train.dataset = @data.iterable_source()
    iterable_source.train = @my_batches
    iterable_source.eval = @my_eval_batches

Its position is the number of batches taken. Resuming rebuilds the
iterable and skips that many batches, with a warning: that is exact only if
the iterable yields the same batches every time it is built, and costs the
time to produce the skipped batches (a source with its own resumable state,
such as a grain pipeline, should implement ``get_state``/``set_state``).
"""

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from absl import logging

from gintrain.runner.data import base

__all__ = ['IterableSource', 'iterable_source']


class IterableSource(base.DataSource):
  """Batches from ``train(spec)``; eval batches from ``eval(spec)``.

    >>> def batches(spec):
    ...   for i in itertools.count():
    ...     yield {'x': np.full((spec.local_batch_size, 2), i, np.float32)}
    >>> source = IterableSource(batches)
    >>> source.bind(base.Spec(batch_size=3, eval_batch_size=3))
    >>> [float(source.next_batch()['x'][0, 0]) for _ in range(2)]
    [0.0, 1.0]
    >>> source.get_state()
    {'step': 2}
  """

  def __init__(self, train: Callable[[base.Spec], Iterable[dict]],
               eval: Callable[[base.Spec], Iterable[dict]] | None = None,  # pylint: disable=redefined-builtin
               info: dict | None = None, name: str | None = None):
    if not callable(train):
      raise TypeError(f'iterable_source.train must be a callable(spec), got'
                      f' {train!r}.')
    self._train, self._eval = train, eval
    self._info = dict(info or {})
    self._name = name or getattr(train, '__name__', 'iterable')
    self._it: Iterator[dict] | None = None
    self._first: dict | None = None
    self.step = 0

  @property
  def name(self) -> str:
    return self._name

  @property
  def info(self):
    return self._info

  def _iterator(self) -> Iterator[dict]:
    if self._it is None:
      self._it = iter(self._train(self.spec))
    return self._it

  def sample(self) -> dict:
    if self._first is None:
      self._first = next(iter(self._train(self.spec)))
    return self._first

  def next_batch(self) -> dict:
    try:
      batch = next(self._iterator())
    except StopIteration:
      raise ValueError(f'{self.name}: the train iterable ended after'
                       f' {self.step} batches; make it repeat (e.g.'
                       ' itertools.cycle) or lower train.num_steps.') from None
    self.step += 1
    return batch

  def eval_batches(self) -> Iterator[dict]:
    if self._eval is None:
      return
    for batch in self._eval(self.spec):
      if 'mask' not in batch:
        rows = len(next(iter(batch.values())))
        batch = {**batch, 'mask': np.ones((rows,), np.float32)}
      yield batch

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    target = int(state['step'])
    self._it = None
    self.step = 0
    if target:
      logging.warning('%s has no resumable state: replaying %d batches to'
                      ' reach the checkpoint\'s position.', self.name, target)
      it = self._iterator()
      skipped = sum(1 for _ in itertools.islice(it, target))
      if skipped < target:
        raise ValueError(f'{self.name}: the train iterable ended after'
                         f' {skipped} batches while replaying {target}.')
      self.step = target


def iterable_source(train: Callable[[base.Spec], Iterable[dict]],
                    eval: Callable[[base.Spec], Iterable[dict]] | None = None,  # pylint: disable=redefined-builtin
                    num_classes: int | None = None) -> IterableSource:
  """An :class:`IterableSource` (the gin factory); ``num_classes`` lets a
  classification task check the model's output width."""
  info = {} if num_classes is None else {'num_classes': num_classes}
  return IterableSource(train, eval, info)
