"""An iterator that reads ahead of its consumer in a background thread.

A drop-in for ``flax.training.prefetch_iterator`` (without its deprecation
warning): while the consumer works on one item, a daemon thread already
calls ``next()`` on the source for the following ones::

    >>> from gintrain.lib.prefetch_iterator import PrefetchIterator
    >>> it = PrefetchIterator(iter(range(3)), buffer_size=2)
    >>> list(it)
    [0, 1, 2]
    >>> it.close()
"""

import collections
import threading
from typing import Any, Iterable, Iterator

__all__ = ['PrefetchIterator']


class _Shared:
  """The state the thread and the iterator share.

  The thread holds no reference to the iterator, so an iterator dropped
  without ``close()`` is garbage-collected and its ``__del__`` stops the
  thread.
  """

  def __init__(self, buffer_size: int):
    self.buffer_size = buffer_size
    self.cond = threading.Condition()
    self.buffer = collections.deque()
    self.active = True  # False once closed, exhausted or failed
    self.error = None  # StopIteration, or what next(source) raised


def _prefetch(source: Iterator[Any], shared: _Shared):
  """The thread: keeps up to ``buffer_size`` items ahead, until stopped."""
  cond = shared.cond
  while True:
    with cond:
      cond.wait_for(
          lambda: len(shared.buffer) < shared.buffer_size or not shared.active)
      if not shared.active:
        return
    try:
      item = next(source)
    except BaseException as e:  # pylint: disable=broad-except
      with cond:
        if shared.active:
          shared.error = e
          shared.active = False
          cond.notify_all()
      return
    with cond:
      if not shared.active:  # closed while next() ran: drop the item
        return
      shared.buffer.append(item)
      cond.notify_all()


class PrefetchIterator:
  """Wraps an iterator; a background thread fetches up to ``buffer_size`` ahead.

  Items come out in the source's order. When the source is exhausted,
  ``next()`` raises ``StopIteration`` (every time); when the source's
  ``next()`` raises, the items fetched before are returned first, then that
  same exception is raised in the consumer (every time after, too), also when
  it was raised before the constructor returned (flax's loses that one).

  ``close()`` stops the thread: it ends at once if it is waiting for the
  consumer (the buffer is full), else as soon as its current call of
  ``next()`` on the source returns (that item is dropped); ``close()`` does
  not wait for it. Items already buffered can still be taken after
  ``close()``; then ``StopIteration`` (or the source's exception) is raised.
  An iterator that is garbage-collected is closed.

  Attributes:
    buffer_size: how many items are fetched ahead at most.
  """

  def __init__(self, data_iter: Iterable[Any], buffer_size: int = 1):
    """Starts the prefetching thread.

    Args:
      data_iter: the iterator (or iterable) to read ahead of the consumer.
        Its ``next()`` is called from the background thread only.
      buffer_size: how many items to fetch ahead (an int, at least 1).

    Raises:
      ValueError: ``buffer_size`` is not an int >= 1.
      TypeError: ``data_iter`` is not iterable.
    """
    if (isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or
        buffer_size < 1):
      raise ValueError(
          f'PrefetchIterator buffer_size must be an int >= 1, got'
          f' {buffer_size!r}.')
    source = iter(data_iter)
    self._shared = _Shared(buffer_size)
    self._thread = threading.Thread(
        target=_prefetch, args=(source, self._shared), daemon=True,
        name='PrefetchIterator')
    self._thread.start()

  @property
  def buffer_size(self) -> int:
    return self._shared.buffer_size

  def __iter__(self) -> 'PrefetchIterator':
    return self

  def __next__(self) -> Any:
    shared = self._shared
    with shared.cond:
      shared.cond.wait_for(lambda: shared.buffer or not shared.active)
      if shared.buffer:
        item = shared.buffer.popleft()
        shared.cond.notify_all()
        return item
      if shared.error is not None:
        raise shared.error
      raise StopIteration

  def close(self) -> None:
    """Stops the prefetching thread (without waiting for it); idempotent."""
    shared = self._shared
    with shared.cond:
      shared.active = False
      shared.cond.notify_all()

  def __del__(self):
    if getattr(self, '_shared', None) is not None:
      self.close()
