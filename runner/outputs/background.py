"""A metric writer that writes on a thread of its own.

:class:`BackgroundWriter` wraps a writer whose writes stay buffered in the
process until its flush anyway (``MetricWriter.durable_writes`` false:
TensorBoard's event file), so a crash loses nothing more
(``runner.training.start`` wraps those of a run). The caller's thread only
checks the input (:class:`~.writers.MetricWriter`'s checks, so bad input
still raises at the call) and queues it; one thread encodes and writes, in
call order, while the training loop's thread dispatches the next steps.
This is CLU's ``AsyncWriter`` idea: a log step costs the loop a check and
a queue put instead of the encoding and the write.

* A write that fails on the thread (a full disk, a lost object store) is
  raised, the same exception, by the next call on the caller's thread:
  ``write_scalars``, ``flush`` or ``close``. Nothing written before it is
  lost; the calls queued after it are dropped (the run is failing).
* ``open``, ``write_hparams`` and ``flush`` wait for the thread (so
  ``flush()`` means everything before it is written and flushed);
  ``close()`` drains the queue, closes the writers and ends the thread.
* The queue holds at most ``max_pending`` calls: a caller that outruns a
  slow destination waits instead of growing memory.

    >>> from gintrain.runner.outputs import writers
    >>> import json, os, tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> with BackgroundWriter(writers.JsonlWriter(workdir)) as w:
    ...   w.write_scalars(1, {'loss': 0.5})
    ...   w.write_scalars(2, {'loss': 0.25})
    >>> lines = open(os.path.join(workdir, 'metrics.jsonl')).readlines()
    >>> [json.loads(line)['loss'] for line in lines]
    [0.5, 0.25]
"""

import queue
import threading
from collections.abc import Callable
from typing import Any

from gintrain.runner.outputs import writers

__all__ = ['BackgroundWriter']

_STOP = object()


class BackgroundWriter(writers.MetricWriter):
  """Writes through ``writer`` on a thread (see the module doc).

  Args:
    writer: the destination; only the thread calls it once the first call
      was queued. Anything with ``open()`` (``writers.OpenLater``) is
      opened on the thread too.
    max_pending: the queue's bound, in calls.
  """

  def __init__(self, writer: writers.MetricWriter, max_pending: int = 1024):
    self.writer = writer
    self._queue: queue.Queue = queue.Queue(max_pending)
    self._error: BaseException | None = None
    self._thread: threading.Thread | None = None

  def __repr__(self):
    return f'BackgroundWriter({self.writer!r})'

  # -- the caller's side ----------------------------------------------------

  def open(self) -> Any:
    """``writer.open()`` (where it has one), on the thread; waits."""
    opener = getattr(self.writer, 'open', None)
    return None if opener is None else self._wait(opener)

  def _write_scalars(self, step, scalars, split):
    self._raise_failure()
    # pylint: disable-next=protected-access
    self._put(self.writer._write_checked, (step, scalars, split), None)

  def _write_hparams(self, hparams, metrics):
    self._wait(self.writer.write_hparams, hparams, metrics)

  def _flush(self):
    self._wait(self.writer.flush)

  def _close(self):
    if self._thread is None:
      self.writer.close()
      return
    try:  # closed even after a failure, which is then raised
      self._wait(self.writer.close, always=True)
    finally:
      self._stop()

  def _put(self, fn: Callable, args: tuple, done: threading.Event | None,
           always: bool = False):
    if self._thread is None:
      self._thread = threading.Thread(target=self._serve, daemon=True,
                                      name='gintrain-metric-writer')
      self._thread.start()
    self._queue.put((fn, args, done, always))

  def _wait(self, fn: Callable, *args, always: bool = False) -> Any:
    """Runs ``fn(*args)`` on the thread after everything queued; its
    result, or the first failure of the thread (raised here). ``always``:
    also after a failure (``close``)."""
    if not always:
      self._raise_failure()
    done = threading.Event()
    box = [fn, args, None]
    self._put(self._call_into, (box,), done, always)
    done.wait()
    self._raise_failure()
    return box[2]

  @staticmethod
  def _call_into(box):
    box[2] = box[0](*box[1])

  def _raise_failure(self):
    error, self._error = self._error, None
    if error is not None:
      raise error

  def _stop(self):
    if self._thread is not None:
      self._queue.put((_STOP, (), None, True))
      self._thread.join()
      self._thread = None
    self._raise_failure()

  # -- the thread -------------------------------------------------------------

  def _serve(self):
    while True:
      fn, args, done, always = self._queue.get()
      if fn is _STOP:
        return
      try:
        if always or self._error is None:  # after a failure: dropped
          fn(*args)
      except BaseException as e:  # pylint: disable=broad-except
        if self._error is None:  # the first failure is the one raised
          self._error = e  # on the caller's thread (module doc)
      finally:
        if done is not None:
          done.set()
