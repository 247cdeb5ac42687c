"""Periodic and final checkpoints (the final one written and waited for
before the other end-of-run actions), and what each save cost.

Each save the action starts gets a ``checkpoint`` record in
``metrics.jsonl`` once it is complete (checked after every step while a
background save runs, so a failed background save also stops the run at
the next step, with its one-line error):

* ``bytes``, ``files``: the checkpoint's size and file count on storage
  (the msgpack file, its sidecar, every process's sharded array files);
* ``blocking_s``: seconds the training loop waited in the save call;
* ``background_s``: seconds from then until the save was complete
  (committed by every process), seen at most one step late;
* ``gb_per_s``: ``bytes`` over the sum of the two (10^9 bytes a second);
* ``peak_extra_rss_bytes``: the process's peak resident memory during the
  save over its resident memory when the save began (``VmHWM``, reset at
  the start through ``/proc/self/clear_refs``; left out where that file
  cannot be written). It includes what training steps allocated meanwhile.
"""

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from gintrain.lib import checkpoints_multiprocess
from gintrain.lib import serialization
from gintrain.runner.actions import base

__all__ = ['SaveCheckpoint', 'SaveCost']


def _status_bytes(key: str) -> int | None:
  """A ``/proc/self/status`` memory line (``VmRSS:``, ``VmHWM:``) in bytes."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith(key):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets ``VmHWM`` to the current RSS; whether that was possible."""
  try:
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
      f.write('5\n')
    return True
  except OSError:
    return False


class SaveCost:
  """The cost of one save, measured from its creation (the save starts)
  to :meth:`record` (the save is complete)."""

  def __init__(self, step: int, path: str):
    self.step, self.path = step, path
    self.start = time.perf_counter()
    self.rss = _status_bytes('VmRSS:') if _reset_peak_rss() else None
    self.blocking_s = None

  def returned(self) -> None:
    """The save call returned (the loop goes on)."""
    self.blocking_s = time.perf_counter() - self.start

  def record(self) -> dict:
    """The ``checkpoint`` record, once the save is complete."""
    total = time.perf_counter() - self.start
    size, files = checkpoints_multiprocess.checkpoint_files(self.path)
    out = {'bytes': size, 'files': files, 'blocking_s': self.blocking_s,
           'background_s': max(0.0, total - self.blocking_s),
           'gb_per_s': size / max(total, 1e-9) / 1e9}
    peak = _status_bytes('VmHWM:') if self.rss is not None else None
    if peak is not None:
      out['peak_extra_rss_bytes'] = max(0, peak - self.rss)
    return out


class SaveCheckpoint(base.PeriodicAction):
  """Saves ``snapshot(step)`` every ``every_steps`` steps and at the end
  (a step already saved is not saved again).

  Args:
    checkpointer: a ``runner.outputs.checkpoints.Checkpointer``.
    snapshot: ``step -> tree`` to save.
    every_steps: the period (0 or None: only the final checkpoint).
    writer: the run's metric writer, for the ``checkpoint`` records (None:
      none written).
    main: whether this process writes the records (process 0).
  """

  name = 'checkpoint'
  end_first = True  # the final checkpoint lands before the final eval

  def __init__(self, checkpointer, snapshot: Callable[[int], Any],
               every_steps: int | None, writer=None, main: bool = True):
    super().__init__(every_steps)
    self.checkpointer, self.snapshot = checkpointer, snapshot
    self.writer, self.main = writer, main
    self.final = None  # (step, action states) of the final checkpoint
    self.pending: SaveCost | None = None  # the save in flight
    self.failed: Exception | None = None  # its error, for the next check

  def due(self, step, last):
    return (self.pending is not None or self.failed is not None or
            super().due(step, last))

  def save(self, step: int, overwrite: bool = False) -> bool:
    if self.pending is not None:  # the save below waits for it anyway
      self.checkpointer.wait()
      self.finish()
    cost = SaveCost(step, self.checkpointer.path(step))
    if not self.checkpointer.save(step, lambda: self.snapshot(step),
                                  overwrite):
      return False
    cost.returned()
    self.pending = cost
    try:
      self.finish()  # a synchronous save is complete already
    except Exception as e:  # pylint: disable=broad-except
      # A background save that failed already: raised at the next step's
      # check, where every process raises it (lib.save_status), not here,
      # where the others may not know yet.
      self.failed = e
    return True

  def finish(self) -> bool:
    """Writes the record of the save in flight if it is complete (a failed
    background save raises its error); whether none is in flight now."""
    if self.failed is not None:
      failed, self.failed = self.failed, None
      raise failed
    if self.pending is None:
      return True
    try:
      busy = self.checkpointer.busy()
    except BaseException:
      self.pending = None
      raise
    if busy:
      return False
    cost, self.pending = self.pending, None
    if self.main and self.writer is not None:
      self.writer.write_scalars(cost.step, cost.record(), split='checkpoint')
    return True

  def __call__(self, step, state, metrics):
    if super().due(step, False):
      self.save(step)
    else:
      self.finish()  # raises a failed background save's error

  def end(self, step, state, metrics):
    """The final checkpoint, waited for (also after a background save)."""
    self.save(step)
    self.checkpointer.wait()
    self.finish()
    self.final = (step, _action_states(self.snapshot(step)))

  def close(self):
    if self.pending is not None:
      try:
        self.finish()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('The last checkpoint\'s record is not written: %s', e)

  def after_end(self, step, state, metrics):
    """Saves the final checkpoint again if a final evaluation changed a
    checkpointed action's state (early stopping, keep-best): the final
    checkpoint holds the run's final state."""
    if self.final is None or self.final[0] != step:
      return
    if _action_states(self.snapshot(step)) != self.final[1]:
      self.save(step, overwrite=True)
      self.checkpointer.wait()
      self.finish()


def _action_states(tree) -> list:
  """The checkpointed actions' states of a checkpoint tree, comparable
  with ``==`` (flat ``(key, leaf, repr)`` triples)."""
  out = []
  for key in sorted(k for k in tree if k not in ('state', 'data')):
    flat = serialization.to_state_dict(tree[key])
    leaves = flat.items() if isinstance(flat, dict) else [('', flat)]
    for name, value in sorted(leaves, key=lambda kv: str(kv[0])):
      out.append((key, str(name), repr(np.asarray(value).tolist())
                  if not isinstance(value, dict) else repr(value)))
  return out
