"""One runner per workdir: a lock on ``<workdir>/.gintrain.lock``.

Two runs writing one workdir (a job launched twice) would interleave their
checkpoints and metrics. The first run takes the lock; a second one fails
with one line naming the holder. In a multi-process run only process 0
takes it.

**Local workdirs**: an exclusive ``fcntl`` lock on the lock file, which
holds the holder's pid and host. The operating system drops the lock when
its process dies, however it dies, so a crashed run's lock is simply taken
over by the next.

**Object stores** (``s3://``): a *lease* object, since a store has no lock
that its holder's death releases. The lease (JSON: owner id, host, boot
id, pid, ``expires`` as Unix time, the lease length) is

* taken with a conditional write, ``PUT`` with ``If-None-Match: *``: of two
  runners starting together exactly one creates it;
* renewed by a heartbeat thread every quarter of ``--workdir_lease_s``
  (default 60 s) with ``If-Match: <its ETag>``, so a holder whose lease was
  taken over notices at its next renewal and exits at once (status 1, one
  line) instead of writing beside the new holder;
* deleted on release (``If-Match`` again: never someone else's lease).

A runner that finds a lease held waits for it: if the lease changes (its
holder renewed it: alive) the runner is refused with one line, nothing
written; if it does not change until it expires (its ``expires``, at most
one lease length, plus a few seconds for clock skew), the holder is dead
and the lease is taken over with ``If-Match`` on the ETag it saw (of two
waiters, one wins). A holder on this very machine (same host name and boot
id) whose pid is gone is known dead at once: a relaunch after a SIGKILL on
the same host does not wait. ``--force_unlock`` takes the lease at once
whoever holds it (when its holder is known dead and you cannot wait).

S3 (and moto's server) implement both conditions; other stores
(``gs://``, ``memory://``) are not locked: ``acquire`` logs one info line
saying so.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with WorkdirLock(d):
    ...   pass
"""

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from absl import flags

from gintrain.lib import storage
from gintrain.runner import errors
from gintrain.runner.errors import RunnerError

__all__ = ['WorkdirLock', 'LOCK_FILE', 'DEFAULT_LEASE_S', 'LOST_EXIT_CODE']

LOCK_FILE = '.gintrain.lock'
DEFAULT_LEASE_S = 60
LOST_EXIT_CODE = 1
_LEASED = ('s3',)  # schemes with conditional writes (If-None-Match/If-Match)

_FORCE_UNLOCK = flags.DEFINE_bool(
    'force_unlock', False,
    'Object-store workdirs (s3://): take the workdir lease at once, even if'
    ' another run holds it (use only when that run is dead and you cannot'
    ' wait --workdir_lease_s for its lease to expire).')
_LEASE_S = flags.DEFINE_integer(
    'workdir_lease_s', DEFAULT_LEASE_S,
    'Object-store workdirs (s3://): the length of the workdir lease in'
    ' seconds, renewed every quarter of it; a run that dies without'
    ' releasing it blocks a relaunch from another host for at most this'
    ' long.', lower_bound=4)


def _flag(flag, default):
  try:
    return flag.value
  except flags.UnparsedFlagAccessError:
    return default


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      return f.read().strip()
  except OSError:
    return ''


def _precondition_failed(error: BaseException) -> bool:
  """Whether an S3 call failed on its If-None-Match / If-Match."""
  if isinstance(error, FileExistsError):
    return True
  text = f'{error!r} {error.__cause__!r}'
  return 'PreconditionFailed' in text or 'pre-conditions' in text


def _describe(lease: dict) -> str:
  return (f'pid {lease.get("pid", "?")} on {lease.get("host", "?")}'
          if isinstance(lease, dict) else 'holder unknown')


class WorkdirLock:
  """Holds the workdir's lock from ``acquire()`` (or ``with``) to
  ``release()``.

  Args:
    workdir: a local folder or a URL.
    lease_s: object stores: the lease length (default ``--workdir_lease_s``).
    force: object stores: take the lease whoever holds it (default
      ``--force_unlock``).

  Raises (from acquire):
    RunnerError: another live run holds the lock.
  """

  def __init__(self, workdir: str, lease_s: float | None = None,
               force: bool | None = None):
    self.path = storage.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self._fd = None
    self.lease_s = float(lease_s if lease_s is not None else
                         _flag(_LEASE_S, DEFAULT_LEASE_S))
    self.force = force if force is not None else _flag(_FORCE_UNLOCK, False)
    self._etag = None
    self._stop = threading.Event()
    self._thread = None
    self.owner = uuid.uuid4().hex

  # -- local: fcntl -------------------------------------------------------

  @errors.activity('locking the workdir')
  def acquire(self) -> 'WorkdirLock':
    if storage.local_file(self.path) is None:
      return self._acquire_lease()
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

  @errors.activity('locking the workdir')
  def release(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)  # drops the lock
    if self._etag is not None:
      self._release_lease()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()

  # -- object stores: a lease ---------------------------------------------

  def _s3(self, method, **kwargs):
    return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key,
                            **kwargs)

  def _body(self) -> bytes:
    return json.dumps({
        'owner': self.owner, 'host': socket.gethostname(),
        'boot_id': _boot_id(), 'pid': os.getpid(),
        'expires': time.time() + self.lease_s, 'lease_s': self.lease_s,
    }).encode()

  def _read(self):
    """``(etag, lease dict)`` of the lease now, ``(None, None)`` if none."""
    for _ in range(5):
      try:
        etag = self._s3('head_object')['ETag']
        data = self._fs.cat_file(self._fs_path)
        if self._s3('head_object')['ETag'] != etag:
          continue  # renewed between the reads
      except FileNotFoundError:
        return None, None
      try:
        lease = json.loads(data)
      except ValueError:
        lease = {}
      return etag, lease if isinstance(lease, dict) else {}
    return etag, {}

  def _etag_now(self):
    try:
      return self._s3('head_object')['ETag']
    except FileNotFoundError:
      return None

  def _put(self, **condition) -> bool:
    """A conditional write of this run's lease; False if the condition
    failed (someone else's lease is there)."""
    try:
      self._etag = self._s3('put_object', Body=self._body(),
                            **condition)['ETag']
      return True
    except (OSError, ValueError) as e:
      if _precondition_failed(e):
        return False
      raise

  def _refuse(self, lease, why):
    raise RunnerError(
        f'--workdir={self.workdir} is in use by another run'
        f' ({_describe(lease)}; lease {self.path} {why}); wait for it to'
        ' end or use another --workdir (if that run is dead: relaunch with'
        ' --force_unlock, or wait for its lease to expire, at most'
        f' {lease.get("lease_s", self.lease_s):g} s).')

  def _dead_here(self, lease) -> bool:
    """Whether the holder was a process of this machine that is gone."""
    if (lease.get('host') != socket.gethostname() or
        lease.get('boot_id') != _boot_id() or not _boot_id()):
      return False
    pid = lease.get('pid')
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
      return False
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    except OSError:
      return False
    return False

  def _acquire_lease(self) -> 'WorkdirLock':
    scheme = self.path.split(':', 1)[0].lower()
    if scheme not in _LEASED:
      logging.info('--workdir=%s is on an object store without conditional'
                   ' writes: not locked; run one job per workdir.',
                   self.workdir)
      return self
    self._fs, self._fs_path = storage.filesystem(self.path)
    self._bucket, self._key, _ = self._fs.split_path(self._fs_path)
    for _ in range(20):  # a lease deleted while we look: try again
      if self._put(IfNoneMatch='*'):
        break
      etag, lease = self._read()
      if etag is None:
        continue
      if self.force:
        self._put()  # unconditional
        logging.warning('--force_unlock: took the workdir lease %s over from'
                        ' %s.', self.path, _describe(lease))
        break
      if self._dead_here(lease):
        if self._put(IfMatch=etag):
          logging.info('Took over the lease %s of %s (that process is'
                       ' gone).', self.path, _describe(lease))
          break
        continue
      if self._wait_expiry(etag, lease):
        break
    else:
      raise RunnerError(f'--workdir={self.workdir}: cannot take the lease'
                        f' {self.path} (it keeps changing hands).')
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name='gintrain-workdir-lease')
    self._thread.start()
    logging.info('Workdir lease %s taken (renewed every %g s).', self.path,
                 self.lease_s / 4)
    return self

  def _wait_expiry(self, etag, lease) -> bool:
    """Waits for ``lease`` (ETag ``etag``) to expire and takes it (True);
    False if it vanished (try again); refuses if it is renewed."""
    length = lease.get('lease_s')
    length = (float(length) if isinstance(length, (int, float)) and
              0 < length < 86400 else self.lease_s)
    expires = lease.get('expires')
    left = (min(max(float(expires) - time.time(), 0.0), length)
            if isinstance(expires, (int, float)) else length)
    skew = min(5.0, length / 4)
    logging.warning('--workdir=%s: its lease is held by %s; waiting up to'
                    ' %.0f s for it to be renewed (the run is alive) or to'
                    ' expire (the run is dead).', self.workdir,
                    _describe(lease), left + skew)
    deadline = time.monotonic() + left + skew
    while True:
      now = self._etag_now()
      if now is None:
        return False
      if now != etag:
        self._refuse(lease, 'was renewed')
      if time.monotonic() >= deadline:
        break
      time.sleep(min(1.0, length / 8, max(deadline - time.monotonic(), 0)))
    if self._put(IfMatch=etag):
      logging.warning('Took over the expired lease %s of %s.', self.path,
                      _describe(lease))
      return True
    self._refuse(lease, 'was taken by another run')

  def _heartbeat(self):
    failing = False
    while not self._stop.wait(self.lease_s / 4):
      etag = self._etag
      try:
        if self._put(IfMatch=etag):
          if failing:
            logging.info('Workdir lease %s renewed again.', self.path)
          failing = False
          continue
      except Exception as e:  # pylint: disable=broad-except
        if not failing:
          logging.warning('Cannot renew the workdir lease %s (%s); retrying'
                          ' every %g s.', self.path, e, self.lease_s / 4)
        failing = True
        continue
      if self._stop.is_set():
        return
      # Someone took the lease over (we were taken for dead): stop before
      # writing beside the new holder.
      _, lease = self._read()
      sys.stderr.write(
          f'gintrain: error: --workdir={self.workdir}: the workdir lease'
          f' {self.path} was taken over by {_describe(lease)} (this run did'
          ' not renew it in time, or --force_unlock); exiting so that two'
          ' runs do not write one workdir.\n')
      sys.stderr.flush()
      os._exit(LOST_EXIT_CODE)  # pylint: disable=protected-access

  def _release_lease(self):
    self._stop.set()
    if self._thread is not None and (
        self._thread is not threading.current_thread()):
      self._thread.join(timeout=30)
    etag, self._etag = self._etag, None
    try:
      self._s3('delete_object', IfMatch=etag)
    except Exception as e:  # pylint: disable=broad-except
      if not _precondition_failed(e):
        logging.warning('Cannot remove the workdir lease %s: %s', self.path,
                        e)
