"""A step watchdog for multi-process runs: a hung step ends the process.

If the training loop makes no progress for ``--step_timeout`` seconds
(default 600; 0 turns it off), every process of a multi-process run prints
the Python stacks of all its threads (``faulthandler``) and one line::

    gintrain: error: no training step completed within --step_timeout=600 s
    after step 1234 (process 1 of 2): hung; thread stacks above. Exiting
    with status 3 so that the launcher relaunches (resume from the latest
    checkpoint).

and exits with :data:`HUNG_EXIT_CODE` (3) at once (``os._exit``: no
cleanup, no ``jax.distributed`` shutdown, which would wait on the hung
peers). The latest checkpoint is intact (files are written to a temporary
name and renamed), so launching the same command again resumes from it.

Why: a 2-process run on a loaded 2-core machine hung twice in 11 launches
(issue 12, item 9), both processes inside ``PjRtCpuLoadedExecutable::Execute``
of the compiled train step: the heartbeat never fired (the coordination
service's heartbeats run on their own threads and kept succeeding: the
processes were alive, only stuck) and SIGTERM had no effect (the runner's
handler only sets a flag that the loop checks between steps, and the loop
never got there). The likely cause is XLA:CPU's cross-process collectives
(gloo over TCP) inside the step: each process runs the partitions of its
local devices on a thread pool of one thread per core, and a partition that
blocks in a collective holds its thread until all peers arrive. With more
devices (virtual CPU devices) than cores, and other processes competing for
the same cores, a rendezvous can wait for a partition that has no thread to
run on: a deadlock that no timeout inside XLA breaks (gloo's collectives on
CPU wait without a deadline; jax-ml/jax#38503 shows the same for a peer
that is alive but stuck, on GPUs). ``runner.parallel.partitioners`` places
batches explicitly because of a related deadlock of the gradient
all-reduce when devices outnumber cores (see its ``put_batch``). It is
rare, load-dependent and not reproducible on demand, hence a watchdog
rather than a fix; this module's tests check that the watchdog ends a
process whose main thread is inside XLA's ``Execute`` (a long compiled
loop, and a 2-process run whose peer hangs).

How: a daemon thread polls the time of the last :func:`beat`, which the
trainer calls once per step, right after the step is dispatched. The step
runs asynchronously, so a beat is not a host sync; but dispatch blocks
where the loop already waits for the device (the metric fetch at log
steps, a checkpoint snapshot, XLA's bound on computations in flight), so a
hung step stops the beats within a few steps. The timeout therefore bounds
one iteration of the loop: the step plus the actions due after it (an
evaluation, a checkpoint, the preemption agreement); set it above your
longest evaluation. Compilation is not a hang: the clock starts at the
first step's beat (after its compilation), and while any thread is inside
JAX's tracing, lowering or compiling functions (a later step variant, the
first evaluation) the clock is held.

The exit works while XLA is inside ``Execute``: XLA releases the GIL there
(and in ``block_until_ready``), so this Python thread runs, dumps the
stacks and calls ``os._exit``, which needs no cooperation from the stuck
thread (unlike SIGTERM's flag). Should the GIL be held by a stuck thread
instead, a second, GIL-free backstop (``faulthandler.dump_traceback_later``,
armed at every beat for twice the timeout) dumps the stacks and exits with
status 1.

Single-process runs start it too (issue 18: a run whose object store froze
printed nothing for minutes): a stalled write, a hung read or an action
that never returns ends the run the same way, with status 3.

Progress reports: while no step completes, the watchdog thread logs one
line every ``--progress_report_s`` seconds (default 30; 0: off), from the
start of the run (before the first step too), naming what the main thread
is doing: its innermost frame in gintrain and its innermost frame overall,
e.g. ``no step completed for 60 s (after step 40): the main thread is in
gintrain/lib/storage.py:233 put, in ssl.py:1134 read``. A stalled upload
of a checkpoint or a config file to an object store is then visible within
30 s, whatever the store's client timeouts. Actions that take long on
purpose (sampling at the end) call :func:`touch`: progress without a step.
"""

import faulthandler
import os
import sys
import threading
import time
from typing import Optional

from absl import flags
from absl import logging

__all__ = ['HUNG_EXIT_CODE', 'DEFAULT_STEP_TIMEOUT_S',
           'DEFAULT_PROGRESS_REPORT_S', 'Watchdog', 'start',
           'start_from_flags', 'stop', 'beat', 'touch', 'active',
           'main_thread_place']

HUNG_EXIT_CODE = 3
DEFAULT_STEP_TIMEOUT_S = 600
DEFAULT_PROGRESS_REPORT_S = 30

_STEP_TIMEOUT = flags.DEFINE_integer(
    'step_timeout', DEFAULT_STEP_TIMEOUT_S,
    'If no training step completes within this many seconds (one step plus'
    ' the actions due after it, e.g. an evaluation; compilation excluded),'
    ' every process prints its thread stacks and exits with status'
    f' {HUNG_EXIT_CODE}, so that the launcher can relaunch (resume). 0: off.',
    lower_bound=0)
_PROGRESS_REPORT = flags.DEFINE_integer(
    'progress_report_s', DEFAULT_PROGRESS_REPORT_S,
    'While no training step completes (a stalled upload, a slow evaluation,'
    ' start-up), log every this many seconds what the main thread is doing.'
    ' 0: off.', lower_bound=0)

# Functions of jax/_src whose presence on a thread's stack means "tracing,
# lowering or compiling" (the clock is held meanwhile).
_COMPILING = frozenset({
    'compile_or_get_cached', 'backend_compile', 'backend_compile_and_load',
    'lower_sharding_computation', 'lower_mesh_computation',
    'lower_parallel_callable', 'trace_to_jaxpr_dynamic', 'trace_to_jaxpr',
    '_create_pjit_jaxpr', '_pjit_lower', 'compile',
})
_JAX_SRC = os.sep + os.path.join('jax', '_src') + os.sep


def _compiling() -> bool:
  """Whether a thread is inside JAX's tracing, lowering or compiling."""
  me = threading.get_ident()
  for ident, frame in sys._current_frames().items():  # pylint: disable=protected-access
    if ident == me:
      continue
    while frame is not None:
      code = frame.f_code
      if code.co_name in _COMPILING and _JAX_SRC in code.co_filename:
        return True
      frame = frame.f_back
  return False


_HERE = os.path.abspath(__file__)
# The package's root (the folder holding lib/ and runner/).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE))) + os.sep


def main_thread_place() -> str:
  """Where the main thread is, for the progress reports: ``"the main
  thread is in <our innermost frame>, in <its innermost frame>"``, each as
  ``file:line function`` (our files relative to the package root)."""
  frame = sys._current_frames().get(threading.main_thread().ident)  # pylint: disable=protected-access
  if frame is None:
    return 'the main thread has ended'
  inner = ours = None
  while frame is not None:
    name = os.path.abspath(frame.f_code.co_filename)
    mine = (name.startswith(_ROOT) and name != _HERE and
            'site-packages' not in name)
    short = name[len(_ROOT):] if mine else os.path.basename(name)
    where = f'{short}:{frame.f_lineno} {frame.f_code.co_name}'
    inner = inner or where
    if mine and ours is None:
      ours = where
    frame = frame.f_back
  if ours is None or ours == inner:
    return f'the main thread is in {inner}'
  return f'the main thread is in {ours}, in {inner}'


def _stderr():
  for stream in (sys.stderr, sys.__stderr__):
    try:
      stream.fileno()
      return stream
    except (AttributeError, OSError, ValueError):
      continue
  return None


class Watchdog:
  """Exits the process when :meth:`beat` is not called for ``timeout_s``.

  Disarmed until the first beat. ``process`` is ``(index, count)`` for the
  message. On a timeout it reports, waits ``exit_grace_s`` (default
  ``min(5, timeout_s / 2)``, twice that on process 0: the peers report
  and exit first) and exits.
  """

  def __init__(self, timeout_s: float, process: tuple[int, int] = (0, 1),
               poll_s: Optional[float] = None,
               exit_code: int = HUNG_EXIT_CODE,
               exit_grace_s: Optional[float] = None,
               report_s: float = 0.0):
    if timeout_s < 0 or (not timeout_s and not report_s):
      raise ValueError(f'timeout_s must be > 0 (or 0 with report_s > 0),'
                       f' got {timeout_s}')
    self.timeout_s = timeout_s  # 0: reports only, never exits
    self.report_s = report_s
    self.process = process
    self.exit_code = exit_code
    self.poll_s = poll_s or min(1.0, (timeout_s or report_s) / 10,
                                (report_s or timeout_s) / 10)
    self._started = time.monotonic()
    self._reported = self._started  # time of the last report (or beat)
    # Between the report and the exit: the peers, stuck since about the
    # same step, report too before this exit breaks their connections.
    # Process 0 hosts the coordination service, whose end makes JAX abort
    # the others (status 134): it waits twice as long, exiting last.
    if exit_grace_s is None:
      exit_grace_s = (0.0 if process[1] < 2 else  # no peers to wait for
                      min(5.0, timeout_s / 2) * (2 if process[0] == 0 else 1))
    self.exit_grace_s = exit_grace_s
    self._last: Optional[tuple[int, float]] = None  # (step, monotonic time)
    self._backstop_armed = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='gintrain-step-watchdog')
    self._thread.start()

  def beat(self, step: int) -> None:
    """A step completed (cheap: two assignments, and now and then a
    re-arm of the GIL-free backstop)."""
    now = time.monotonic()
    self._last = (step, now)
    self._reported = now
    if not self.timeout_s:
      return
    if now - self._backstop_armed > self.timeout_s / 4:
      self._backstop_armed = now
      stream = _stderr()
      if stream is not None:
        faulthandler.dump_traceback_later(2 * self.timeout_s + 5, exit=True,
                                          file=stream)

  def touch(self) -> None:
    """Progress without a new step (e.g. an action's long work done): the
    clock restarts at the last step's number; nothing before the first
    beat."""
    last = self._last
    if last is not None:
      self.beat(last[0])

  def stop(self) -> None:
    """Disarms and ends the thread (idempotent)."""
    self._stop.set()
    if self._backstop_armed:
      faulthandler.cancel_dump_traceback_later()
      self._backstop_armed = 0.0
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=5)

  def _report(self, last):
    """One progress line when no step completed for ``report_s``."""
    now = time.monotonic()
    if not self.report_s or now - self._reported < self.report_s:
      return
    self._reported = now
    if last is None:
      what = f'no step completed for {now - self._started:.0f} s (start-up)'
    else:
      what = (f'no step completed for {now - last[1]:.0f} s (after step'
              f' {last[0]})')
    try:
      logging.warning('%s: %s%s.', what, main_thread_place(),
                      ' (compiling)' if _compiling() else '')
    except Exception:  # pylint: disable=broad-except
      pass  # a report must never end the run

  def _watch(self):
    while not self._stop.wait(self.poll_s):
      last = self._last
      self._report(last)
      if last is None or not self.timeout_s:
        continue
      step, then = last
      if time.monotonic() - then < self.timeout_s:
        continue
      if _compiling():
        self._last = (step, time.monotonic())  # hold the clock
        continue
      if self._stop.is_set() or self._last is not last:
        continue  # a beat (or stop) raced this check
      self._fire(step)

  def message(self, step: int) -> str:
    index, count = self.process
    return (f'no training step completed within --step_timeout='
            f'{self.timeout_s:g} s after step {step} (process {index} of'
            f' {count}): hung; thread stacks above. Exiting with status'
            f' {self.exit_code} so that the launcher relaunches (resume from'
            ' the latest checkpoint).')

  def _fire(self, step: int):
    stream = _stderr()
    try:
      if stream is not None:
        stream.write(f'gintrain: watchdog: process {self.process[0]}: no'
                     f' progress for {self.timeout_s:g} s; stacks of all'
                     ' threads:\n')
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.write(f'gintrain: error: {self.message(step)}\n')
        stream.flush()
      time.sleep(self.exit_grace_s)
    finally:
      os._exit(self.exit_code)  # pylint: disable=protected-access


_current: list = []


def start(timeout_s: float, process: tuple[int, int] = (0, 1),
          report_s: float = 0.0) -> Optional[Watchdog]:
  """Starts the process's watchdog (replacing a running one); None if
  ``timeout_s`` and ``report_s`` are 0."""
  stop()
  if not timeout_s and not report_s:
    return None
  dog = Watchdog(timeout_s, process, report_s=report_s)
  _current.append(dog)
  return dog


def start_from_flags() -> Optional[Watchdog]:
  """:func:`start` with ``--step_timeout`` and ``--progress_report_s``
  (JAX initialized; every run, one process or several); None if both
  are 0."""
  import jax  # pylint: disable=g-import-not-at-top
  timeout = _STEP_TIMEOUT.value
  dog = start(timeout, (jax.process_index(), jax.process_count()),
              _PROGRESS_REPORT.value)
  if dog is not None and timeout and jax.process_index() == 0:
    logging.info('Step watchdog: a step that takes over %d s ends the run'
                 ' (status %d; --step_timeout).', timeout, HUNG_EXIT_CODE)
  return dog


def stop() -> None:
  """Stops the running watchdog, if any."""
  while _current:
    _current.pop().stop()


def active() -> Optional[Watchdog]:
  return _current[-1] if _current else None


def beat(step: int) -> None:
  """Tells the running watchdog (if any) that ``step`` completed."""
  if _current:
    _current[-1].beat(step)


def touch() -> None:
  """Tells the running watchdog (if any) that the run made progress
  without completing a step (see :meth:`Watchdog.touch`)."""
  if _current:
    _current[-1].touch()
