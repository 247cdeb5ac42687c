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

The agreement uses the coordination service of ``jax.distributed``
(host-side barrier plus key-value store; no device synchronisation): checks
happen at steps that are multiples of ``--preemption_check_interval``, which
must be the same on all processes. In a single process no communication
happens::

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

import logging
import signal
import threading
from typing import Optional, Sequence

from absl import flags

from gintrain.runner.parallel import distributed
from gintrain.runner.parallel import signals

__all__ = ['PREEMPTED_EXIT_CODE', 'INTERRUPTED_EXIT_CODE', 'SIGNALS',
           'install', 'uninstall', 'requested', 'request', 'should_stop',
           'stop_signal', 'exit_code', 'reset', 'check_interval']

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


def should_stop(step: int, check_interval: Optional[int] = None) -> bool:
  """Whether all processes stop before ``step``; the same on every process.

  At a step that is not a multiple of ``check_interval`` (default
  ``--preemption_check_interval``) it returns False without communicating.
  At a check step every process must call it (it is a barrier bounded by
  ``--barrier_timeout``); it returns True on all processes if any of them
  received SIGTERM/SIGUSR1/SIGINT before the call.
  """
  interval = _interval_flag() if check_interval is None else check_interval
  if interval < 1:
    raise ValueError(f'check_interval must be >= 1, got {interval}')
  if step % interval:
    return False
  local = signals.requested()
  if not distributed.is_initialized():
    return local
  flagged = distributed.processes_with_flag('preempt', local)
  if flagged:
    logging.warning('Preemption agreed before step %d (signal on process(es)'
                    ' %s).', step, flagged)
  return bool(flagged)


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
