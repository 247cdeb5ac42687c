"""A grain pipeline as a DataSource, resumable mid-epoch from its state.

``GrainSource(train, eval)`` takes two random-access datasets of examples
(``grain.MapDataset``s, or anything with ``__len__`` and ``__getitem__``,
each example a dict of numpy arrays) and builds the pipeline::

    train examples -> shuffle(seed) -> repeat (reshuffled each epoch)
      -> global batch g = examples [g*B, (g+1)*B)
      -> this process's rows of it [g*B + p*B/P, g*B + (p+1)*B/P)  (read lazily)
      -> collate -> (optional worker processes: mp_prefetch)

Each process reads only its share, yet the global batch at a step is the
same whatever the process count, so a checkpoint resumes on another number
of processes. The position is the grain iterator's own ``get_state()``
(its next global batch index), saved in every checkpoint as JSON text;
``set_state`` continues with exactly the next batch, mid-epoch included.
Eval batches cover the eval examples once, in order, padded and masked.

A ``train`` with ``endless = True`` (``runner.data.packing.Rows``,
``runner.data.mixture.Mixture``) indexes past its first epoch itself (with
its own per-epoch order) and is taken as it is: no shuffle, no repeat; its
``rows_per_epoch`` is the epoch. ``wait_seconds`` adds up the time
``next_batch`` waited for data; ``take_wait_fraction()`` is that time over
the wall time since the last call (``data_wait_fraction`` of a record).

    >>> import numpy as np
    >>> from gintrain.runner.data import base
    >>> examples = [{'x': np.full((2,), i, np.float32)} for i in range(10)]
    >>> source = GrainSource(examples, examples[:3])
    >>> source.bind(base.Spec(batch_size=4, eval_batch_size=2, seed=0))
    >>> a = source.next_batch()['x'][:, 0]
    >>> state = source.get_state()
    >>> b = source.next_batch()['x'][:, 0]
    >>> source.set_state(state)
    >>> bool((source.next_batch()['x'][:, 0] == b).all())
    True
    >>> [m.tolist() for m in (e['mask'] for e in source.eval_batches())]
    [[1.0, 1.0], [1.0, 0.0]]
"""

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gintrain.runner import validation
from gintrain.runner.data import base

__all__ = ['GrainSource', 'collate', 'PREFETCH_BATCHES', 'READ_THREADS']

# Global batches a run can take: the index space of the batch dataset.
_MAX_BATCHES = 2 ** 40
# Read-ahead of a GrainSource (in batches) and its reading threads.
PREFETCH_BATCHES = 16
READ_THREADS = 4


def collate(examples: Sequence[dict]) -> dict:
  """Stacks a list of example dicts into one batch dict."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _Rows:
  """Global batch index -> this process's rows, read from ``examples``
  (a picklable callable, for grain's worker processes)."""

  def __init__(self, examples, batch_size, first, count):
    self.examples, self.batch_size = examples, batch_size
    self.first, self.count = first, count

  def __call__(self, g):
    start = int(g) * self.batch_size + self.first
    return collate([self.examples[i] for i in range(start,
                                                    start + self.count)])


class GrainSource(base.DataSource):
  """A :class:`~.base.DataSource` over grain (see the module doc).

  Args:
    train: random-access train examples (dicts of arrays).
    eval: random-access eval examples, or None.
    shuffle: shuffle the train examples (reshuffled every epoch).
    worker_count: grain worker processes reading ahead (0: threads of
      this process read ahead).
    info: what tasks check the model against.
    name: for logs.
    prefetch: batches read ahead in this process (each by one of at most
      ``READ_THREADS`` threads); grain's default, 500 elements of 1-10 KiB,
      would be 500 whole batches here (gigabytes for a large LM batch).
  """

  def __init__(self, train: Any, eval: Any = None, shuffle: bool = True,  # pylint: disable=redefined-builtin
               worker_count: int = 0, info: dict | None = None,
               name: str = 'grain', prefetch: int | None = None):
    if len(train) < 1:
      raise ValueError(f'{name}: the train split is empty.')
    prefetch = validation.check_int(
        f'{name}: prefetch',
        PREFETCH_BATCHES if prefetch is None else prefetch, 1)
    self._train, self._eval = train, eval
    self.shuffle, self.worker_count = shuffle, worker_count
    self.prefetch = prefetch
    self._info, self._name = dict(info or {}), name
    self._dataset = None
    self._iterator = None
    self.wait_seconds = 0.0
    self._wait_mark = None

  @property
  def name(self) -> str:
    return self._name

  @property
  def info(self):
    return self._info

  @property
  def num_train(self) -> int:
    if getattr(self._train, 'endless', False):
      return self._train.rows_per_epoch
    return len(self._train)

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train // self.spec.batch_size)

  @property
  def num_eval_examples(self) -> int | None:
    return None if self._eval is None else len(self._eval)

  def bind(self, spec: base.Spec) -> None:
    # grain (and the orbax it imports) is imported here, when a run uses it:
    # about 0.5 s of every process start otherwise.
    import grain  # pylint: disable=g-import-not-at-top
    super().bind(spec)
    if getattr(self._train, 'endless', False):
      examples = self._train  # its own epochs and order
    else:
      examples = grain.MapDataset.source(self._train)
      if self.shuffle:
        examples = examples.shuffle(seed=spec.seed)
      examples = examples.repeat(None)
    share = spec.local_batch_size
    rows = _Rows(examples, spec.batch_size, spec.process_index * share,
                 share)
    self._dataset = grain.MapDataset.range(_MAX_BATCHES).map(rows)
    self._iterator = None
    self._start = self._taken = 0

  def _iter(self):
    if self._iterator is None:
      import grain  # pylint: disable=g-import-not-at-top
      dataset = self._dataset[self._start:].to_iter_dataset(
          grain.ReadOptions(num_threads=min(READ_THREADS, self.prefetch),
                            prefetch_buffer_size=self.prefetch))
      if self.worker_count:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self.worker_count))
      self._iterator = iter(dataset)
    return self._iterator

  def sample(self) -> dict:
    return collate([self._train[0]])

  def next_batch(self) -> dict:
    start = time.perf_counter()
    if self._wait_mark is None:
      self._wait_mark = (start, self.wait_seconds)
    batch = next(self._iter())
    self._taken += 1
    self.wait_seconds += time.perf_counter() - start
    return batch

  def take_wait_fraction(self) -> float | None:
    """Time ``next_batch`` waited over the wall time since the previous
    call (the first call: since the first batch); None before any batch."""
    if self._wait_mark is None:
      return None
    now = time.perf_counter()
    since, waited = self._wait_mark
    self._wait_mark = (now, self.wait_seconds)
    return (self.wait_seconds - waited) / max(now - since, 1e-9)

  def eval_batches(self) -> Iterator[dict]:
    if self._eval is None:
      return
    spec, n = self.spec, len(self._eval)
    share = spec.local_eval_batch_size
    for start in range(0, n, spec.eval_batch_size):
      first = start + spec.process_index * share
      idx = np.arange(first, first + share)
      mask = (idx < n).astype(np.float32)
      rows = [self._eval[int(i) if i < n else 0] for i in idx]
      yield {**collate(rows), 'mask': mask}

  def get_state(self) -> dict:
    # The global batches taken, in the plain iterator's format, whatever
    # the worker count (worker processes' own state would not restore
    # without them): a run resumes with any worker or process count.
    taken = int(self._start + self._taken)  # restored counts may be numpy
    return {'grain': json.dumps({'next_index': taken}, sort_keys=True),
            'step': taken}  # batches taken = the train step

  def set_state(self, state) -> None:
    """Restores the position of :meth:`get_state`.

    Raises:
      ValueError: no grain state, or one that does not fit (a
        ``next_index`` out of range, or differing from the recorded step),
        in one line.
    """
    if not isinstance(state, dict) or 'grain' not in state:
      raise ValueError('the checkpoint holds no grain iterator state (key'
                       ' "grain"): the data position is lost.')
    try:
      grain_state = json.loads(state['grain'])
    except (TypeError, ValueError) as e:
      raise ValueError(f'the grain iterator state is not JSON ({e}).') from None
    index = (grain_state.get('next_index', 0)
             if isinstance(grain_state, dict) else None)
    if (not isinstance(grain_state, dict) or isinstance(index, bool) or
        not isinstance(index, int) or not 0 <= index < _MAX_BATCHES):
      raise ValueError(f'grain next_index={index!r} is out of range (0 to'
                       f' {_MAX_BATCHES - 1}, the batches taken so far).')
    step = state.get('step')
    if 'next_index' in grain_state and step is not None and step != index:
      raise ValueError(f'grain next_index={index} differs from the recorded'
                       f' data step {step}.')
    if 'next_index' in grain_state:
      self.close()
      self._start, self._taken = index, 0  # batch g is a function of g
      return
    try:  # an older checkpoint's worker-process state
      self._iter().set_state(grain_state)
    except (IndexError, KeyError, TypeError) as e:
      raise ValueError(f'grain cannot restore its iterator state: {e}'
                       ) from None

  def close(self) -> None:
    """Stops the worker processes, if any."""
    it, self._iterator = self._iterator, None
    if it is not None and hasattr(it, 'close'):
      it.close()
