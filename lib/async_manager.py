"""``AsyncManager``: runs checkpoint writes in a background thread.

As in flax, one save runs at a time: a new save (and every
``wait_previous_save()``) first blocks until the previous one finished. Unlike
flax, a background save that failed is never silent: its exception is raised
by the next ``wait_previous_save()`` or ``save_async()`` (once).

  >>> am = AsyncManager()
  >>> am.save_async(lambda: 1 / 0)
  >>> try:
  ...   am.wait_previous_save()
  ... except ZeroDivisionError:
  ...   print('reported')
  reported
  >>> am.wait_previous_save()  # reported once only
"""

import concurrent.futures
import logging
from typing import Any, Callable

__all__ = ['AsyncManager']

logger = logging.getLogger(__name__)


class AsyncManager:
  """Tracks the background checkpoint save of ``save_checkpoint``.

  Usage::

    am = AsyncManager()
    save_checkpoint(ckpt_dir, state, step, async_manager=am)
    ...
    am.wait_previous_save()  # before exiting, or to see a failed save

  Attributes:
    executor: the ``ThreadPoolExecutor`` running saves (its threads are
      joined at interpreter exit, so a pending save still completes).
    save_future: the future of the last submitted save, or None.
  """

  def __init__(self, max_workers: int = 1):
    self.executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix='checkpoint-save')
    self.save_future: concurrent.futures.Future | None = None

  def wait_previous_save(self) -> None:
    """Blocks until the previous save finished; re-raises its exception.

    A failed save's exception is raised once; later calls return normally.
    """
    future = self.save_future
    if future is None:
      return
    if not future.done():
      logger.warning(
          'The previous async save_checkpoint has not finished yet. Waiting'
          ' for it to complete before the next save.')
    try:
      future.result()
    except BaseException:
      self.save_future = None  # report a failure once
      raise

  def save_async(self, task: Callable[[], Any]) -> None:
    """Waits for the previous save, then runs ``task`` in the background.

    The future is kept as ``self.save_future``.
    """
    self.wait_previous_save()
    self.save_future = self.executor.submit(task)
