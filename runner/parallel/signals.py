"""The preemption signal flag: SIGTERM/SIGUSR1 only set a local flag.

Kept apart from :mod:`.preemption` (which agrees on the flag across
processes through :mod:`.distributed`) so that ``distributed.initialize``
can take the signals over as soon as JAX's own notifier is installed,
without an import cycle.
"""

import signal
import threading
from typing import Sequence

__all__ = ['SIGNALS', 'install', 'uninstall', 'request', 'requested', 'reset']

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_flag = threading.Event()
_received: list = []
_previous: dict = {}


def _handler(signum, frame):  # pylint: disable=unused-argument
  # Only set a flag: anything more (I/O, locks, JAX) is unsafe in a handler.
  _received.append(signum)
  _flag.set()


def install(signals: Sequence[int] = SIGNALS) -> None:
  """Installs the flag-setting handler for ``signals`` (main thread only).

  Idempotent; :func:`uninstall` restores the handlers found here. Call it
  after ``jax.distributed`` is initialized (JAX installs its own SIGTERM
  notifier there, which this replaces).
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


def reset() -> None:
  """Clears the local flag (tests, or after a handled preemption)."""
  _flag.clear()
  _received.clear()


