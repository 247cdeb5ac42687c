"""Every process learns whether any process failed its part of a save.

In a multi-process save each process writes its own slices in a background
thread (``lib.multiprocess_arrays``, packed layout), then meets the others
at jax's commit barrier. When one process fails (a full disk), it never
reaches that barrier, and the others would wait there until its timeout
(minutes) while the failed process stops: the run would stop on one
process only. Here each process publishes the outcome of its part in
jax's distributed key-value store (the coordinator that
``jax.distributed.initialize`` started), and its background thread then
waits for every other process's outcome: a failure anywhere fails the save
on every process at once, with the failing process's reason (errno kept),
so every process raises it at its next check (the runner: the step after
the failed save) with one line.

A failed process's thread ends only once every other process has seen its
failure (``gintrain/save_ack/<n>/<process>``, or failed itself): the
runner checks after each step whether the save failed, and a process that
raised at a step where another did not know yet would leave that one in
the next step's collectives until jax's timeouts.

Keys: ``gintrain/save_status/<n>/<process>``, ``n`` counting this
module's saves (every process saves in the same order: SPMD). A process
deletes its key of save ``n - 1`` when it publishes save ``n`` (by then
every process has read it: a save begins only after the previous one's
commit, which follows every process's wait), and its acknowledgement of
save ``n - 2``.

In one process, or without ``jax.distributed``, :func:`start` returns None
and nothing is exchanged.

:func:`allgather` is the small exchange with which the checkpoint code's
processes agree (on errors, on a temporary name): a few integers per
process through the same store, in about a millisecond, where jax's
``process_allgather`` first compiles a program (a second or more, once per
process: the whole cost of a resume's restore agreement). Its keys
``gintrain/allgather/<n>/<process>`` are deleted two exchanges later (by
then every process has read them).
"""

import errno as errno_codes
import itertools
import logging
import time

import jax
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ['SaveStatus', 'start', 'allgather']

_ROOT = 'gintrain/save_status'
_ACK_ROOT = 'gintrain/save_ack'
_COUNT = itertools.count()
_GATHER_ROOT = 'gintrain/allgather'
_GATHERS = itertools.count()
_GATHER_TIMEOUT_MS = 600_000
# Polling of the other processes' outcomes: from 1 ms up to this.
_MAX_POLL_S = 0.05


def _client():
  if jax.process_count() == 1:
    return None
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(distributed.global_state, 'client', None)


def start(path: str, timeout_s: float):
  """The status exchange of one save of checkpoint ``path`` (all processes
  call it, in the same order); None in one process."""
  client = _client()
  number = next(_COUNT)
  if client is None:
    return None
  return SaveStatus(client, number, path, timeout_s)


class SaveStatus:
  """One save's outcomes, per process (see the module doc)."""

  def __init__(self, client, number: int, path: str, timeout_s: float):
    self.client, self.number, self.path = client, number, path
    self.timeout_s = timeout_s
    self.me, self.count = jax.process_index(), jax.process_count()

  def _key(self, number: int, process: int) -> str:
    return f'{_ROOT}/{number}/{process}'

  def publish(self, error: BaseException | None) -> None:
    """Tells the other processes this process's outcome (``error``: its
    failure, None: its part is written)."""
    if error is None:
      value = 'ok'
    else:
      code = getattr(error, 'errno', None) or 0
      reason = getattr(getattr(error, 'cause', None), 'strerror', None) or (
          getattr(error, 'strerror', None) or str(error))
      value = f'error {int(code)} {" ".join(str(reason).split())[:300]}'
    self.client.key_value_set(self._key(self.number, self.me), value)
    (logger.debug if error is None else logger.info)(
        'Save %d of %s: this process\'s part: %s', self.number, self.path,
        value)
    for key in ([self._key(self.number - 1, self.me)] if self.number else []
                ) + ([f'{_ACK_ROOT}/{self.number - 2}/{self.me}']
                     if self.number >= 2 else []):
      try:
        self.client.key_value_delete(key)
      except Exception:  # pylint: disable=broad-except
        pass  # (a leftover key costs a few bytes of the coordinator)
    if error is not None:
      self._wait_acks()

  def _wait_acks(self) -> None:
    """After a failure: waits (at most the timeout) until every other
    process has seen it (acknowledged, or failed itself), so that no
    process raises at a step where another does not yet know and would go
    on into that step's collectives."""
    others = {p for p in range(self.count) if p != self.me}
    deadline = time.monotonic() + self.timeout_s
    pause = 0.001
    while others and time.monotonic() < deadline:
      for prefix in (f'{_ACK_ROOT}/{self.number}/', f'{_ROOT}/{self.number}/'):
        for key, value in self.client.key_value_dir_get(prefix):
          tail = key.rsplit('/', 1)[-1]
          if tail.isdigit() and (prefix.startswith(_ACK_ROOT) or
                                 value.startswith('error')):
            others.discard(int(tail))
      if others:
        time.sleep(pause)
        pause = min(2 * pause, _MAX_POLL_S)

  def run_and_publish(self, fn):
    """``fn()``, its outcome published (its error re-raised)."""
    try:
      result = fn()
    except BaseException as e:
      self.publish(e)
      raise
    self.publish(None)
    return result

  def wait_others(self, processes=None) -> None:
    """Returns once every process of ``processes`` (None: all but this
    one) published success; raises ``checkpoint_io.CheckpointWriteError``
    naming the first failed process as soon as one published a failure.
    Past the timeout, returns (jax's barrier then times out with its own
    error)."""
    if processes is None:
      processes = [p for p in range(self.count) if p != self.me]
    prefix = f'{_ROOT}/{self.number}/'
    deadline = time.monotonic() + self.timeout_s
    pause = 0.001
    while True:
      found = {}
      for key, value in self.client.key_value_dir_get(prefix):
        tail = key.rsplit('/', 1)[-1]
        if tail.isdigit() and int(tail) in processes:
          found[int(tail)] = value
      failed = sorted(p for p, v in found.items() if v.startswith('error'))
      if failed:  # acknowledged, then raised (see _wait_acks)
        logger.info('Save %d: process %d failed: %s', self.number, failed[0],
                    found[failed[0]])
        self.client.key_value_set(f'{_ACK_ROOT}/{self.number}/{self.me}',
                                  'seen')
        raise self._error(failed[0], found[failed[0]])
      if len(found) >= len(processes) or time.monotonic() > deadline:
        return
      time.sleep(pause)
      pause = min(2 * pause, _MAX_POLL_S)

  def _error(self, process: int, value: str):
    from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top
    _, code, reason = (value.split(' ', 2) + ['', ''])[:3]
    code = int(code) if code.isdigit() and int(code) else errno_codes.EIO
    cause = OSError(code, f'{reason or "its save failed"} on process'
                    f' {process}')
    return checkpoint_io.CheckpointWriteError(self.path, cause)


def allgather(values) -> np.ndarray:
  """Every process's ``values`` (a few integers, the same count on every
  process), as an ``int32`` array with a row per process; every process
  must call it, in the same order (as ``process_allgather``)."""
  values = np.asarray(values).astype(np.int64).reshape(-1)
  client = _client()
  if client is None:
    if jax.process_count() == 1:
      return values.astype(np.int32)[None]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(
        values.astype(np.int32)))
  number, me = next(_GATHERS), jax.process_index()
  client.key_value_set(f'{_GATHER_ROOT}/{number}/{me}',
                       ','.join(str(v) for v in values.tolist()))
  if number >= 2:
    try:
      client.key_value_delete(f'{_GATHER_ROOT}/{number - 2}/{me}')
    except Exception:  # pylint: disable=broad-except
      pass
  rows = []
  for process in range(jax.process_count()):
    text = client.blocking_key_value_get(f'{_GATHER_ROOT}/{number}/{process}',
                                         _GATHER_TIMEOUT_MS)
    rows.append([int(v) for v in text.split(',')] if text else [])
  return np.array(rows, np.int32)
