"""lib.prefetch_iterator, with flax.training.prefetch_iterator as an oracle.

Synchronisation is by events and waits with generous deadlines, never by
timing thresholds.
"""

import doctest
import gc
import threading
import time

from flax.training import prefetch_iterator as fpi
import pytest

from gintrain.lib import prefetch_iterator as lpi

DEADLINE = 30.0  # seconds; only reached if something is broken


def flax_iterator(*args, **kwargs):
  with pytest.warns(DeprecationWarning):
    return fpi.PrefetchIterator(*args, **kwargs)


IMPLS = {'lib': lpi.PrefetchIterator, 'flax': flax_iterator}


class Source:
  """An iterator that counts the items taken from it; may fail or block."""

  def __init__(self, n=None, fail_at=None, error=None, gate=None):
    self.n, self.fail_at, self.gate = n, fail_at, gate
    self.error = error or ValueError('source broke')
    self.pulled = 0
    self.cond = threading.Condition()
    self.threads = set()

  def __iter__(self):
    return self

  def __next__(self):
    self.threads.add(threading.current_thread())
    if self.gate is not None:
      assert self.gate.wait(DEADLINE)
    with self.cond:
      if self.fail_at is not None and self.pulled == self.fail_at:
        raise self.error
      if self.n is not None and self.pulled >= self.n:
        raise StopIteration
      self.pulled += 1
      self.cond.notify_all()
      return self.pulled - 1

  def wait_pulled(self, count):
    with self.cond:
      assert self.cond.wait_for(lambda: self.pulled >= count, DEADLINE)


def wait_until(predicate):
  end = time.monotonic() + DEADLINE
  while not predicate():
    assert time.monotonic() < end, 'timed out'
    time.sleep(0.01)


def drain(it):
  """Items until the end, and what ended it (None: StopIteration)."""
  items = []
  while True:
    try:
      items.append(next(it))
    except StopIteration:
      return items, None
    except Exception as e:  # pylint: disable=broad-except
      return items, e


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('buffer_size', [1, 2, 5])
@pytest.mark.parametrize('n', [0, 1, 7])
def test_items_in_order_then_stop_iteration(impl, buffer_size, n):
  it = IMPLS[impl](Source(n), buffer_size=buffer_size)
  assert iter(it) is it and it.buffer_size == buffer_size
  assert list(it) == list(range(n))
  for _ in range(2):  # stays exhausted
    with pytest.raises(StopIteration):
      next(it)
  it.close()


@pytest.mark.parametrize('buffer_size', [1, 3])
def test_reads_ahead_as_far_as_flax(buffer_size):
  """After k items are taken, k + buffer_size have been pulled (both)."""
  pulled = {}
  for name, impl in IMPLS.items():
    source = Source()
    it = impl(source, buffer_size=buffer_size)
    counts = []
    for k in range(4):
      source.wait_pulled(k + buffer_size)
      counts.append(source.pulled)
      assert next(it) == k
    it.close()
    pulled[name] = counts
    assert source.threads and threading.main_thread() not in source.threads
  assert pulled['lib'] == pulled['flax'] == [
      k + buffer_size for k in range(4)]


@pytest.mark.parametrize('buffer_size', [1, 4])
def test_source_error_is_reraised_like_flax(buffer_size):
  outcomes = {}
  for name, impl in IMPLS.items():
    error, gate = KeyError('bad record'), threading.Event()
    # The gate holds the source until the constructor returns: flax's loses
    # an error raised before that (it sets self._error after starting).
    it = impl(Source(fail_at=3, error=error, gate=gate),
              buffer_size=buffer_size)
    gate.set()
    items, raised = drain(it)
    assert raised is error, name
    with pytest.raises(KeyError) as again:  # every later next() too
      next(it)
    assert again.value is error
    outcomes[name] = items
  assert outcomes['lib'] == outcomes['flax'] == [0, 1, 2]


@pytest.mark.parametrize('buffer_size', [1, 4])
def test_immediate_error_is_not_lost(buffer_size):
  error = KeyError('bad record')
  it = lpi.PrefetchIterator(Source(fail_at=0, error=error), buffer_size)
  it._thread.join(DEADLINE)  # pylint: disable=protected-access
  with pytest.raises(KeyError) as raised:
    next(it)
  assert raised.value is error


def test_base_exception_from_source_reaches_consumer():
  class Stop(BaseException):
    pass

  it = lpi.PrefetchIterator(Source(fail_at=1, error=Stop()))
  assert next(it) == 0
  with pytest.raises(Stop):
    next(it)


@pytest.mark.parametrize('impl', IMPLS)
def test_close_early_stops_thread_and_keeps_buffered_items(impl):
  source = Source()  # endless
  it = IMPLS[impl](source, buffer_size=3)
  assert next(it) == 0
  source.wait_pulled(4)  # 1 taken + 3 buffered: the thread waits for room
  it.close()
  it._thread.join(DEADLINE)  # pylint: disable=protected-access
  assert not it._thread.is_alive()  # pylint: disable=protected-access
  assert source.pulled == 4
  assert drain(it) == ([1, 2, 3], None)  # what was buffered, then the end
  it.close()  # idempotent


def test_close_while_source_blocks():
  """The item the source returns after close() is dropped."""
  release, entered = threading.Event(), threading.Event()

  def blocking():
    yield 'a'
    entered.set()
    release.wait(DEADLINE)
    yield 'b'

  it = lpi.PrefetchIterator(blocking())
  assert next(it) == 'a'
  assert entered.wait(DEADLINE)
  it.close()
  release.set()
  it._thread.join(DEADLINE)  # pylint: disable=protected-access
  assert not it._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(it)


def test_dropped_iterator_stops_its_thread():
  source = Source()
  it = lpi.PrefetchIterator(source, buffer_size=2)
  assert next(it) == 0
  thread = it._thread  # pylint: disable=protected-access
  del it
  gc.collect()
  thread.join(DEADLINE)
  assert not thread.is_alive()


def test_consumer_blocks_until_item_arrives():
  release = threading.Event()

  def slow():
    release.wait(DEADLINE)
    yield 42

  it = lpi.PrefetchIterator(slow())
  got = []
  consumer = threading.Thread(target=lambda: got.append(next(it)))
  consumer.start()
  release.set()
  consumer.join(DEADLINE)
  assert got == [42]


def test_accepts_iterables():
  assert list(lpi.PrefetchIterator([3, 1, 2], buffer_size=2)) == [3, 1, 2]


@pytest.mark.parametrize('size', [0, -1, 1.5, True, '2', None])
def test_bad_buffer_size(size):
  with pytest.raises(ValueError, match=r'buffer_size must be an int >= 1'):
    lpi.PrefetchIterator(iter([]), buffer_size=size)


def test_not_iterable():
  with pytest.raises(TypeError):
    lpi.PrefetchIterator(5)


def test_no_deprecation_warning(recwarn):
  lpi.PrefetchIterator(iter([])).close()
  assert not [w for w in recwarn if w.category is DeprecationWarning]


def test_doctests():
  result = doctest.testmod(lpi)
  assert result.attempted and not result.failed
