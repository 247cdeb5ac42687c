"""The preemption signal flag: SIGTERM/SIGUSR1/SIGINT only set a local flag.

Kept apart from :mod:`.preemption` (which agrees on the flag across
processes through :mod:`.distributed`) so that ``distributed.initialize``
can take the signals over as soon as JAX's own notifier is installed,
without an import cycle.

SIGINT (Ctrl-C) is a preemption too, with one difference: a second SIGINT
aborts at once (the handler restores the default and raises
``KeyboardInterrupt``), for a run that does not reach its checkpoint.
SIGINTs within :data:`SIGINT_REPEAT_S` seconds of the first count as the
same Ctrl-C: a terminal's Ctrl-C reaches a trainer both directly (it is in
the terminal's foreground process group) and forwarded by
``launch/local.sh``.
"""

import signal
import threading
import time
from typing import Optional, Sequence

__all__ = ['SIGNALS', 'SIGINT_REPEAT_S', 'install', 'uninstall', 'request',
           'requested', 'received', 'reset']

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A SIGINT this soon after the first is the same Ctrl-C (see the module doc).
SIGINT_REPEAT_S = 1.0

_flag = threading.Event()
_received: list = []
_previous: dict = {}
_first_sigint: list = []  # time.monotonic() of the first SIGINT


def _handler(signum, frame):  # pylint: disable=unused-argument
  # Only set a flag: anything more (I/O, locks, JAX) is unsafe in a handler.
  if signum == signal.SIGINT:
    now = time.monotonic()
    if _first_sigint:
      if now - _first_sigint[0] < SIGINT_REPEAT_S:
        return  # the same Ctrl-C, delivered twice
      # A second Ctrl-C: abort now (a third one, while this process is
      # busy outside Python, kills it: the default handler is back).
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      raise KeyboardInterrupt('second Ctrl-C: aborted without checkpoint')
    _first_sigint.append(now)
  _received.append(signum)
  _flag.set()


def install(signals: Sequence[int] = SIGNALS) -> None:
  """Installs the flag-setting handler for ``signals`` (main thread only).

  Idempotent; :func:`uninstall` restores the handlers found here. Call it
  after ``jax.distributed`` is initialized (JAX installs its own SIGTERM
  notifier there, which this replaces). A SIGINT that the process
  inherited as ignored (e.g. a background job of a non-interactive shell)
  is handled too.
  """
  for signum in signals:
    previous = signal.signal(signum, _handler)
    if previous is not _handler:
      _previous[signum] = previous


def uninstall() -> None:
  """Restores the signal handlers :func:`install` replaced."""
  while _previous:
    signum, previous = _previous.popitem()
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


def request() -> None:
  """Marks this process as preempted, as a signal would."""
  _flag.set()


def requested() -> bool:
  """Whether *this* process received a preemption signal (no agreement)."""
  return _flag.is_set()


def received() -> Optional[int]:
  """The signal that preempted this process: SIGTERM or SIGUSR1 if one
  arrived (they mean "requeue"), else SIGINT if Ctrl-C arrived, else None
  (no signal, or only :func:`request`)."""
  others = [s for s in _received if s != signal.SIGINT]
  if others:
    return others[0]
  return signal.SIGINT if _received else None


def reset() -> None:
  """Clears the local flag (tests, or after a handled preemption)."""
  _flag.clear()
  _received.clear()
  _first_sigint.clear()
