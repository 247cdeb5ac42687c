"""Preemption: a signal on any process stops all of them at the same step.

The training loop calls :func:`install` once, then :func:`should_stop` before
every step. SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) on *any* process only sets a
local flag (the handler does nothing else, so it is safe at any point); at the
next check all processes exchange their flags and return the same answer, so
they all stop at the same step, write one synchronized checkpoint and exit
with :data:`PREEMPTED_EXIT_CODE`, or :data:`INTERRUPTED_EXIT_CODE` (130, as a
shell reports Ctrl-C) when the only signals were SIGINTs
(:func:`stop_signal`). A second Ctrl-C aborts at once, without a checkpoint
(see :mod:`.signals`). A launcher that sees that status requeues the job
(launch/slurm.sbatch does), and the next launch resumes from the checkpoint.

Why these signals: SLURM sends SIGTERM on preemption or ``scancel`` (and
SIGKILL ``KillWait`` seconds later) and, with ``--signal=B:USR1@120``, SIGUSR1
to the batch script two minutes before the time limit, which
launch/slurm.sbatch forwards to the tasks. Kubernetes and most schedulers send
SIGTERM, then SIGKILL after a grace period.

:data:`PREEMPTED_EXIT_CODE` is 75, ``EX_TEMPFAIL`` of ``sysexits.h``
("temporary failure; the user is invited to retry later"): distinct from
success (0), from Python's own errors (1, 2) and from death by a signal
(128+N, or a negative status from subprocess).

The agreement uses the key-value store of ``jax.distributed``'s
coordination service, host-side only, and costs nothing per step while no
signal arrived: each process's watcher thread long-polls one notice key
(one request per process every few seconds, not per step; no barrier, so
hosts are not forced into lockstep). The first check after a signal posts
the notice; then every watcher publishes its loop's last check step and all
stop at the same step, ``max + interval`` (one request per process per
preemption). Checks happen at steps that are multiples of
``--preemption_check_interval``, which must be the same on all processes.
In a single process no communication happens::

    >>> import os, signal
    >>> install()
    >>> should_stop(0)
    False
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> requested(), should_stop(1)
    (True, True)
    >>> uninstall(); reset()

``runner.parallel.distributed.initialize`` already installs the handler
(:mod:`.signals`) when it starts a multi-process run (JAX's own SIGTERM
notifier would swallow the signal otherwise), so a signal during start-up is
acted on at the first check.
"""

import atexit
import logging
import signal
import threading
import time
from typing import Optional, Sequence

from absl import flags

from gintrain.runner import validation
from gintrain.runner.parallel import distributed
from gintrain.runner.parallel import signals

__all__ = ['PREEMPTED_EXIT_CODE', 'INTERRUPTED_EXIT_CODE', 'SIGNALS',
           'install', 'uninstall', 'requested', 'request', 'should_stop',
           'stop_signal', 'exit_code', 'reset', 'check_interval',
           'close_agreement']

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL: "preempted, requeue me"
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: stopped by Ctrl-C
SIGNALS = signals.SIGNALS

_CHECK_INTERVAL = flags.DEFINE_integer(
    'preemption_check_interval', 1,
    'Steps between two agreements on a pending preemption signal (every'
    ' process must use the same value). 1 stops at the very next step.',
    lower_bound=1)

install = signals.install
uninstall = signals.uninstall
request = signals.request
requested = signals.requested
reset = signals.reset


def _interval_flag() -> int:
  flag = flags.FLAGS['preemption_check_interval']
  return flag.value if flags.FLAGS.is_parsed() else flag.default


def check_interval() -> int:
  """``--preemption_check_interval`` (its default if flags are not parsed)."""
  return _interval_flag()


# Coordination-service keys of the agreement (one run = one service).
_NOTICE_KEY = 'gintrain/preempt/notice'
_STEP_KEY = 'gintrain/preempt/step/'
_DECISION_KEY = 'gintrain/preempt/stop_at'
# Long-poll length of the watcher's wait for a notice (it re-asks after).
_POLL_MS = 60_000
_CLOSED = 'closed'  # what close() posts to wake this process's watcher


class _Agreement:
  """The multi-process agreement on the step to stop at (see the module doc).

  A watcher thread waits on the coordination service for the notice key
  (a long poll: no request per step). Once it exists, the watcher holds
  the loop at its next check and publishes the last check step the loop
  passed; process 0's watcher reads every process's and publishes
  ``stop_at = max + interval`` (O(processes) requests per preemption):
  a check step every process can reach, since each is held at most one
  interval after the step it published (the signalled process holds
  itself at once, so it has not passed the check that posted the notice). The watchers, not the loops,
  exchange the steps, so a process whose loop waits on a collective for a
  held peer still answers.
  """

  def __init__(self, interval: int, step: int):
    self.interval = interval
    self.lock = threading.Lock()
    self.current = step        # the last check step the loop passed
    self.held = False
    self.decided = threading.Event()
    self.stop_at = None
    self.notice = None
    self.error = None
    self.notice_posted = False
    self.closed = False
    self.thread = threading.Thread(target=self._watch, daemon=True,
                                   name='gintrain-preemption')
    self.thread.start()

  def post_notice(self) -> None:
    """Tells every process's watcher that a signal arrived here (one key
    per process, once per preemption)."""
    if not self.notice_posted:
      import jax  # pylint: disable=g-import-not-at-top
      client = distributed._client()  # pylint: disable=protected-access
      for i in range(jax.process_count()):
        client.key_value_set(f'{_NOTICE_KEY}/{i}', str(jax.process_index()),
                             allow_overwrite=True)
      self.notice_posted = True

  def close(self) -> None:
    """Wakes this process's watcher so that it exits (before
    ``jax.distributed`` shuts down: a pending request would abort it)."""
    if self.closed:
      return
    self.closed = True
    if self.decided.is_set() or not self.thread.is_alive():
      return
    import jax  # pylint: disable=g-import-not-at-top
    try:
      distributed._client().key_value_set(  # pylint: disable=protected-access
          f'{_NOTICE_KEY}/{jax.process_index()}', _CLOSED,
          allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      return  # the service is already gone
    self.thread.join(timeout=10)

  def _watch(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    client = distributed._client()  # pylint: disable=protected-access
    try:
      notice = None
      key = f'{_NOTICE_KEY}/{jax.process_index()}'
      while notice is None:
        try:
          notice = client.blocking_key_value_get(key, _POLL_MS)
        except Exception as e:  # pylint: disable=broad-except
          if self.closed:
            return
          if 'DEADLINE' not in str(e).upper():  # not the long poll's end
            time.sleep(1.0)
      if notice == _CLOSED:
        return
      with self.lock:
        self.held = True
        mine = self.current
      client.key_value_set(f'{_STEP_KEY}{jax.process_index()}', str(mine),
                           allow_overwrite=True)
      timeout_ms = int(1000 * distributed.barrier_timeout())
      if jax.process_index() == 0:  # decides; the others read the decision
        steps = [int(client.blocking_key_value_get(f'{_STEP_KEY}{i}',
                                                   timeout_ms))
                 for i in range(jax.process_count())]
        client.key_value_set(_DECISION_KEY, str(max(steps) + self.interval),
                             allow_overwrite=True)
      self.stop_at = int(client.blocking_key_value_get(_DECISION_KEY,
                                                       timeout_ms))
      self.notice = notice
      logging.info('Preemption notice from process %s: every process stops'
                   ' at step %d.', notice, self.stop_at)
    except Exception as e:  # pylint: disable=broad-except
      self.error = e
    finally:
      self.decided.set()

  def check(self, step: int) -> bool:
    """The loop at check step ``step``: whether to stop now."""
    with self.lock:
      if self.notice_posted:
        self.held = True  # the signalled process stops as soon as it can
      held = self.held
      if not held:
        self.current = step  # passed: this process may go one interval on
    if not held:
      return False
    if not self.decided.wait(distributed.barrier_timeout()):
      raise RuntimeError(
          f'Preemption agreement: no decision within'
          f' {distributed.barrier_timeout():.0f} s (--barrier_timeout) at step'
          f' {step}: a process died or hangs.')
    if self.error is not None:
      raise RuntimeError(f'Preemption agreement failed at step {step}:'
                         f' {self.error}') from self.error
    if step > self.stop_at:
      raise AssertionError(f'preemption agreement: step {step} is past the'
                           f' agreed stop {self.stop_at}')
    if step == self.stop_at:
      logging.warning('Preemption agreed before step %d (signal on'
                      ' process(es) %s).', step, self.notice)
      return True
    return False


_agreement: Optional[_Agreement] = None


def should_stop(step: int, check_interval: Optional[int] = None) -> bool:
  """Whether all processes stop before ``step``; the same on every process.

  At a step that is not a multiple of ``check_interval`` (default
  ``--preemption_check_interval``) it returns False. At a check step it
  costs a lock and a flag read, whatever the process count: a watcher
  thread per process waits (long poll) on the coordination service for a
  notice, which the first check after a signal posts. Once a notice
  exists, all processes agree on one check step at most two intervals
  ahead and return True there, together (see :class:`_Agreement`). Every
  process must call it at every check step and use the same interval.
  """
  global _agreement
  interval = _interval_flag() if check_interval is None else check_interval
  validation.check_int('check_interval', interval, 1)
  if step % interval:
    return False
  local = signals.requested()
  if not distributed.is_initialized():
    return local
  if _agreement is None:
    _agreement = _Agreement(interval, step)
    atexit.register(_agreement.close)  # runs before jax's own shutdown
  if local:
    _agreement.post_notice()
  return _agreement.check(step)


def close_agreement() -> None:
  """Stops the watcher (the run ends); the next check starts a new one."""
  global _agreement
  if _agreement is not None:
    _agreement.close()
    _agreement = None


def stop_signal() -> Optional[int]:
  """The signal the processes stopped for; the same on every process.

  SIGTERM or SIGUSR1 if any process received one (a scheduler's
  preemption: requeue), else SIGINT if any received Ctrl-C, else None
  (:func:`request` only). Call it on every process after
  :func:`should_stop` returned True (it exchanges the local signals once).
  """
  local = signals.received()
  if not distributed.is_initialized():
    return local
  seen = [int(s) for s in distributed.all_gather(
      'preempt_signal', str(0 if local is None else int(local)))]
  others = [s for s in seen if s and s != signal.SIGINT]
  if others:
    return others[0]
  return signal.SIGINT if signal.SIGINT in seen else None


def exit_code(signum: Optional[int]) -> int:
  """The exit status after the checkpoint of a stop for ``signum``:
  :data:`INTERRUPTED_EXIT_CODE` for SIGINT, else
  :data:`PREEMPTED_EXIT_CODE`.

    >>> exit_code(signal.SIGINT), exit_code(signal.SIGTERM), exit_code(None)
    (130, 75, 75)
  """
  return (INTERRUPTED_EXIT_CODE if signum == signal.SIGINT
          else PREEMPTED_EXIT_CODE)
