"""The DataSource interface: this process's batches, and a resumable position.

The trainer calls, in order:

1. ``bind(spec)`` once, with the :class:`Spec` of the run (global batch
   sizes, seed, this process's index and the process count);
2. ``set_state(state)`` when resuming, with what ``get_state()`` returned
   when the checkpoint was written;
3. ``next_batch()`` once per step: this process's share of the next global
   train batch, a dict of numpy arrays (leading axis ``spec.local_batch_size``);
4. ``eval_batches()`` at each evaluation: this process's shares of the
   held-out batches, each with a ``mask`` (1.0 real row, 0.0 padding), streamed
   one at a time (nothing needs the whole split in memory);
5. ``get_state()`` at every checkpoint: the position after the batches
   returned so far, made of numbers, strings and numpy arrays (msgpack-able).

A new source in a few lines (bound with ``train.dataset = @my_module.Counting()``)::

    import gin, numpy as np
    from gintrain.runner.data import base

    @gin.configurable
    class Counting(base.DataSource):
      def __init__(self):
        self.step = 0
      def sample(self):
        return {'x': np.zeros((1, 4), np.float32), 'y': np.zeros((1,), np.int32)}
      def next_batch(self):
        n = self.spec.local_batch_size
        self.step += 1
        return {'x': np.full((n, 4), self.step % 3, np.float32),
                'y': np.full((n,), self.step % 3, np.int32)}
      def eval_batches(self):
        yield {**self.sample(), 'mask': np.ones((1,), np.float32)}
      def get_state(self):
        return {'step': self.step}
      def set_state(self, state):
        self.step = int(state['step'])
"""

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ['DataSource', 'Spec']


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the run asks of its data.

  Attributes:
    batch_size: the global train batch size.
    eval_batch_size: the global eval batch size.
    seed: the run's seed (data order).
    process_index: this process, ``0 .. process_count - 1``.
    process_count: the number of processes.
  """
  batch_size: int
  eval_batch_size: int
  seed: int = 0
  process_index: int = 0
  process_count: int = 1

  @property
  def local_batch_size(self) -> int:
    """This process's rows of each global train batch."""
    return self.batch_size // self.process_count

  @property
  def local_eval_batch_size(self) -> int:
    """This process's rows of each global eval batch."""
    return self.eval_batch_size // self.process_count


class DataSource(abc.ABC):
  """Base class of data sources (see the module doc).

  Attributes:
    spec: the run's :class:`Spec`, set by :meth:`bind`.
  """
  spec: Spec

  @property
  def name(self) -> str:
    return type(self).__name__

  @property
  def info(self) -> Mapping[str, Any]:
    """What tasks check the model against, e.g. ``{'num_classes': 10}``."""
    return {}

  @property
  def steps_per_epoch(self) -> int | None:
    """Global steps in one pass over the training data (None: unknown)."""
    return None

  def bind(self, spec: Spec) -> None:
    """Receives the run's spec before any batch is asked for.

    Raises:
      ValueError: the spec does not fit the data (e.g. a batch larger
        than the dataset), naming the setting.
    """
    self.spec = spec

  @abc.abstractmethod
  def sample(self) -> dict:
    """A small batch with the layout of the train batches (for shapes)."""

  @abc.abstractmethod
  def next_batch(self) -> dict:
    """This process's share of the next global train batch."""

  @abc.abstractmethod
  def eval_batches(self) -> Iterable[dict]:
    """This process's shares of the eval batches, each with ``mask``."""

  def get_state(self) -> dict:
    """The position after the batches returned so far."""
    return {}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a position that :meth:`get_state` returned."""
    del state

  def close(self) -> None:
    """Releases what the source holds (e.g. worker processes)."""
