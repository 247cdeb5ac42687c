"""Goodput accounting: where each second of a run's wall time went.

One :class:`Clock` per training run (:data:`CLOCK`, reset by the trainer
when a run begins) splits the wall time since the process started into

* ``startup``: process start to the first train step's dispatch (imports,
  backend, config, data, state creation or resume);
* ``compile``: the first step, until its result is ready (tracing and XLA
  compilation, or reading it from the compilation cache);
* ``step``: the rest of the loop: dispatching steps and waiting for them;
* ``input``: waiting for the next batch (``source.next_batch``);
* ``checkpoint``: the loop blocked on saving (the save call and waits);
* ``eval``: evaluations;
* ``agreement``: multi-process agreement (preemption checks);
* ``idle``: other host work in the loop (reports, user actions, hooks) and
  everything after it.

The loop reports spans with ``with CLOCK.span('input'): ...`` (nested spans
count only for the innermost one); the parts add up to the wall time by
construction. :meth:`Clock.record` is the ``goodput`` record written at
each log step (seconds and fractions of each part, the process start and
the run's first step, for ``gintrain goodput`` to find restarts).

    >>> clock = Clock(start=0.0, now=lambda: 10.0)
    >>> clock.seconds()['startup']
    10.0
"""

import time
from collections.abc import Callable

from absl import logging

from gintrain.runner.training import warm_start

__all__ = ['PARTS', 'Clock', 'CLOCK', 'reset', 'part_of']

PARTS = ('startup', 'compile', 'step', 'input', 'checkpoint', 'eval',
         'agreement', 'idle')
_SPAN_PARTS = frozenset(PARTS) - {'startup', 'compile', 'step'}

# Built-in actions by class name -> the part their time counts as.
_ACTION_PARTS = {'SaveCheckpoint': 'checkpoint', 'Evaluate': 'eval',
                 'CheckPreemption': 'agreement', 'KeepBest': 'checkpoint'}


def part_of(action) -> str:
  """The part an action's time counts as (``idle`` for host work)."""
  for cls in type(action).__mro__:
    if cls.__name__ in _ACTION_PARTS:
      return _ACTION_PARTS[cls.__name__]
  return getattr(action, 'goodput_part', 'idle')


class _Span:
  """One :meth:`Clock.span`: pushes its frame on entry, books it on exit."""
  __slots__ = ('clock', 'frame')

  def __init__(self, clock: 'Clock', part: str):
    self.clock = clock
    self.frame = [part, 0.0, 0.0]

  def __enter__(self) -> None:
    self.frame[1] = self.clock.now()
    self.clock._stack.append(self.frame)  # pylint: disable=protected-access

  def __exit__(self, *exc) -> bool:
    self.clock._close(self.frame)  # pylint: disable=protected-access
    return False


class Clock:
  """Splits wall time into :data:`PARTS` (see the module doc).

  Args:
    start: the process's start, Unix time (default: the process table's).
    now: the clock (Unix seconds), for tests.
  """

  def __init__(self, start: float | None = None,
               now: Callable[[], float] = time.time):
    self.now = now
    self.process_start = (warm_start.process_start_time() if start is None
                          else start)
    self.parts = dict.fromkeys(PARTS, 0.0)  # spans, and compile
    self.loop_start = None      # the first step's dispatch
    self.first_step_done = None
    self.start_step = 0
    self.ended = None           # the loop's end
    # Span seconds that began before the loop, inside it, after its end.
    self._before = self._within = self._after = 0.0
    self._stack = []            # [part, started, nested seconds]

  # -- reports from the loop ----------------------------------------------

  def begin_loop(self, step: int) -> None:
    """The first train step is about to be dispatched (at ``step``)."""
    if self.loop_start is None:
      self.loop_start, self.start_step = self.now(), step

  def first_step(self) -> float:
    """The first step's result is ready; logs and returns the time to
    first step (seconds since the process started)."""
    if self.first_step_done is None:
      t = self.now()
      if self.loop_start is None:
        self.loop_start = t
      self.first_step_done = t
      self.parts['compile'] = t - self.loop_start - self._within
      logging.info('Time to first step: %.1f s (startup %.1f s, first step'
                   ' and its compile %.1f s).', t - self.process_start,
                   self.loop_start - self.process_start,
                   t - self.loop_start)
    return self.first_step_done - self.process_start

  def end_loop(self) -> None:
    """The loop is done (later time is ``idle`` unless in a span)."""
    if self.ended is None:
      self.ended = self.now()

  def span(self, part: str) -> '_Span':
    """Counts the time inside as ``part`` (minus nested spans); a context
    manager (a small class, not a generator: the loop opens several per
    step)."""
    if part not in _SPAN_PARTS:
      raise ValueError(f'not a span part: {part!r}.')
    return _Span(self, part)

  def _close(self, frame) -> None:
    """Books the span ``frame`` (``[part, started, nested seconds]``)."""
    self._stack.pop()
    part, started, nested = frame
    spent = self.now() - started
    own = spent - nested
    self.parts[part] += own
    if self._stack:
      self._stack[-1][2] += spent
    if self.loop_start is None or started < self.loop_start:
      self._before += own
    elif self.ended is not None and started >= self.ended:
      self._after += own
    else:
      self._within += own

  # -- reading ------------------------------------------------------------

  def seconds(self) -> dict:
    """``{part: seconds}`` up to now; they add up to the wall time."""
    t = self.now()
    out = dict(self.parts)
    before, within, after = self._before, self._within, self._after
    for part, started, nested in self._stack[-1:]:  # open: time so far
      own = t - started - nested
      out[part] += own
      if self.loop_start is None or started < self.loop_start:
        before += own
      elif self.ended is not None and started >= self.ended:
        after += own
      else:
        within += own
    if self.loop_start is None:
      out['startup'] = t - self.process_start - before
      return out
    out['startup'] = self.loop_start - self.process_start - before
    end = self.ended if self.ended is not None else t
    out['step'] = end - self.loop_start - out['compile'] - within
    out['idle'] += t - end - after
    return out

  def record(self) -> dict:
    """The ``goodput`` record: ``<part>_seconds`` and ``<part>_fraction``
    for each part, ``wall_seconds``, ``goodput`` (the step fraction),
    ``process_start`` (Unix time), ``start_step`` and, once known,
    ``time_to_first_step``."""
    sec = self.seconds()
    wall = max(sum(sec.values()), 1e-9)
    out = {'wall_seconds': wall, 'process_start': self.process_start,
           'start_step': self.start_step,
           'goodput': sec['step'] / wall}
    for part in PARTS:
      out[f'{part}_seconds'] = sec[part]
      out[f'{part}_fraction'] = sec[part] / wall
    if self.first_step_done is not None:
      out['time_to_first_step'] = self.first_step_done - self.process_start
    return out


def reset(start: float | None = None) -> Clock:
  """A fresh :data:`CLOCK` for a new run: from the process's start for its
  first run, from now for a later one in the same process (``start``:
  Unix time, overrides)."""
  global CLOCK, _RUNS
  if start is None and _RUNS:
    start = time.time()
  _RUNS += 1
  CLOCK = Clock(start)
  return CLOCK


_RUNS = 0


CLOCK = Clock()
