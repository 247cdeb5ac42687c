"""One runner per workdir: an advisory lock on ``<workdir>/.gintrain.lock``.

Two runs writing one workdir (a job launched twice) would interleave their
checkpoints and metrics. The first takes an exclusive ``fcntl`` lock on the
lock file and writes its pid and host into it; a second one fails at once
with one line naming the holder. The operating system drops the lock when
its process dies, however it dies, so a crashed run's lock is simply taken
over by the next. In a multi-process run only process 0 takes it.

A workdir on an object store (``s3://...``) is not locked: a store has no
lock that its holder's death releases (a lease object would stay behind
after a SIGKILL and block the relaunch, or need a timeout that a slow run
outlives). ``acquire`` logs one info line saying so and returns; keeping
one job per URL workdir is then the scheduler's job.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with WorkdirLock(d):
    ...   pass
"""

import fcntl
import logging
import os
import socket

from gintrain.lib import storage
from gintrain.runner.errors import RunnerError

__all__ = ['WorkdirLock', 'LOCK_FILE']

LOCK_FILE = '.gintrain.lock'


class WorkdirLock:
  """Holds the workdir's lock from ``acquire()`` (or ``with``) to
  ``release()``.

  Raises (from acquire):
    RunnerError: another live process holds the lock.
  """

  def __init__(self, workdir: str):
    self.path = storage.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> 'WorkdirLock':
    if storage.is_url(self.path):
      logging.info('--workdir=%s is on an object store: not locked (no lock'
                   ' there is released when its holder dies); run one job'
                   ' per workdir.', os.path.dirname(self.path))
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 200, 0).decode('utf-8', 'replace').strip()
      os.close(fd)
      raise RunnerError(
          f'--workdir={os.path.dirname(self.path)} is in use by another run'
          f' ({holder or "holder unknown"}; lock {self.path}); wait for it'
          ' to end or use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(),
              0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)  # drops the lock

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()
