"""Trials: names, workdirs, records, and the process that runs one.

A sweep directory holds ``sweep.json`` (the base config and every trial it
has seen, in order: a trial's index is its place there) and one workdir
per trial, named ``<hash>-<label>``: ``hash`` is 8 hex digits of the
SHA-256 of the trial's parsed gin config (base files and bindings plus the
trial's, as ``gin.config_str()`` prints it) and of its extra runner flags,
so the same experiment always lands in the same workdir; ``label`` is the
swept bindings, short (``learning_rate=0.003,seed=1``).

Each trial runs the normal runner, ``python -m gintrain.runner.train
--workdir=<trial dir> <base flags> <swept bindings>``, as a subprocess, so
resuming from checkpoints, metrics and config files are the runner's own.
Around it the sweep keeps, in the trial's workdir:

* ``trial.json``: the trial's record: ``status`` (``running``, ``done``,
  ``failed``, ``pruned``, ``interrupted``), ``exit_status``, ``error`` (the
  runner's one ``gintrain: error:`` line), ``reason`` (pruned trials),
  ``attempts``, times, host and pid;
* ``trial.log``: the runner's output, appended attempt after attempt;
* ``trial.lock``: ``flock``-ed while a trial process runs, so a record that
  says ``running`` with a free lock was interrupted (its process died).

A trial is finished when its record says ``done`` or ``pruned``; a rerun of
the sweep skips those, resumes the others (the runner's ``--resume=auto``)
and starts the rest.
"""

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from gintrain.runner.errors import RunnerError

__all__ = ['Base', 'Trial', 'SweepDir', 'TrialProcess', 'resolve', 'base_digest',
           'read_record', 'trial_status', 'FINISHED', 'PRUNED_EXIT_CODE',
           'SWEEP_FILE', 'RECORD_FILE', 'LOG_FILE']

SWEEP_FILE = 'sweep.json'
RECORD_FILE = 'trial.json'
LOG_FILE = 'trial.log'
LOCK_FILE = 'trial.lock'
FINISHED = ('done', 'pruned')
# The exit status of `gintrain sweep trial` for a trial that the search
# stopped early (its record says why); the runner itself exits 75 then.
PRUNED_EXIT_CODE = 76
_PREEMPTED = 75  # runner.parallel.preemption.PREEMPTED_EXIT_CODE
_INTERRUPTED = 130
_ERROR_RE = re.compile(r'^gintrain(?: [a-z]+)?: error: .*$', re.M)
_UNSAFE = re.compile(r'[^A-Za-z0-9._,=+-]+')


@dataclasses.dataclass
class Base:
  """The config every trial starts from: the runner's gin flags, and any
  other runner flags (``--jax_*``, multi-process flags) as given."""
  gin_files: list
  gin_bindings: list
  search_paths: list
  flags: list

  def argv(self) -> list:
    return ([f'--gin_file={f}' for f in self.gin_files] +
            [f'--gin_search_paths={p}' for p in self.search_paths] +
            [f'--gin_bindings={b}' for b in self.gin_bindings] + self.flags)


@dataclasses.dataclass
class Trial:
  """One resolved trial; ``argv``: the runner's flags after ``--workdir``."""
  name: str
  label: str
  bindings: dict
  argv: list

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _binding_text(key, value) -> str:
  return f'{key} = {value}'


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]


def _dir_name(digest: str, label: str) -> str:
  label = _UNSAFE.sub('_', label).strip('_.')[:72]
  return f'{digest}-{label}' if label else digest


def base_digest(base: Base, parse) -> str:
  """The hash of the base config (the parsed gin text and extra flags).

  ``parse(base, bindings) -> gin.config_str()`` after parsing ``base`` and
  ``bindings`` (``runner.cli.sweep`` gives the runner's own).

  Raises:
    RunnerError: the base config does not parse (its own one-line error).
  """
  return _hash(parse(base, []) + '\n' + '\n'.join(base.flags))


def resolve(base: Base, specs, parse) -> list:
  """Parses each trial spec on top of ``base`` (with ``parse``, as in
  :func:`base_digest`) and names it.

  Every binding is checked by gin's parser before any trial starts: an
  unknown configurable or parameter fails here with a did-you-mean, naming
  the sweep file line it came from.

  Raises:
    RunnerError: a binding that does not parse.
  """
  trials = []
  for spec in specs:
    texts = [_binding_text(k, v) for k, v in spec.bindings.items()]
    try:
      text = parse(base, texts)
    except RunnerError as e:
      message = str(e)
      for key, binding in zip(spec.bindings, texts):
        if repr(binding) in message:
          where = spec.where.get(key, 'the sweep')
          reason = message.split(': ', 1)[1] if ': ' in message else message
          raise RunnerError(f'{where}: {key}: {reason}') from None
      raise
    digest = _hash(text + '\n' + '\n'.join(base.flags))
    argv = base.argv() + [f'--gin_bindings={t}' for t in texts]
    trials.append(Trial(_dir_name(digest, spec.label), spec.label,
                        dict(spec.bindings), argv))
  return trials


def _write_json(path: str, data) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def read_record(trial_dir: str) -> dict | None:
  """The trial's ``trial.json``, or None (not started, or unreadable)."""
  try:
    with open(os.path.join(trial_dir, RECORD_FILE), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _lock_free(trial_dir: str) -> bool:
  """Whether no live trial process holds ``trial.lock``."""
  path = os.path.join(trial_dir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return True
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return True
  except OSError:
    return False
  finally:
    os.close(fd)  # flock: only this descriptor's lock goes with it


def trial_status(trial_dir: str) -> tuple[str, dict]:
  """``(status, record)``: the record's status, ``interrupted`` for a
  ``running`` record whose process is gone, ``pending`` without one."""
  record = read_record(trial_dir)
  if record is None:
    return 'pending', {}
  status = record.get('status', 'pending')
  if status == 'running' and _lock_free(trial_dir):
    status = 'interrupted'
  return status, record


class SweepDir:
  """``sweep.json`` and the trial workdirs under ``path``.

  ``sweep.json``: ``{"base": {...}, "base_hash": str, "trials": [...]}``.
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.file = os.path.join(self.path, SWEEP_FILE)

  def exists(self) -> bool:
    return os.path.isfile(self.file)

  def load(self) -> dict:
    """Raises RunnerError: no sweep here, or an unreadable ``sweep.json``."""
    try:
      with open(self.file, encoding='utf-8') as f:
        data = json.load(f)
    except FileNotFoundError:
      raise RunnerError(f'{self.path}: not a sweep directory (no'
                        f' {SWEEP_FILE}).') from None
    except (OSError, ValueError) as e:
      raise RunnerError(f'{self.file}: unreadable: {e}.') from None
    if not isinstance(data, dict) or not isinstance(data.get('trials'), list):
      raise RunnerError(f'{self.file}: not a sweep record (no trial list).')
    return data

  def trials(self) -> list:
    return [Trial(**t) for t in self.load()['trials']]

  def trial_dir(self, trial: Trial) -> str:
    return os.path.join(self.path, trial.name)

  @contextlib.contextmanager
  def locked(self):
    """An exclusive lock on the sweep dir (``.sweep.lock``) while held
    (re-entrant within this object)."""
    if getattr(self, '_held', 0):
      self._held += 1
      try:
        yield
      finally:
        self._held -= 1
      return
    os.makedirs(self.path, exist_ok=True)
    fd = os.open(os.path.join(self.path, '.sweep.lock'),
                 os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      self._held = 1
      yield
    finally:
      self._held = 0
      os.close(fd)

  def register(self, base: Base, digest: str, trials, force=False) -> list:
    """Records ``trials`` (new ones appended) under ``base``; returns
    every trial's index in ``sweep.json``.

    Raises:
      RunnerError: the directory holds a sweep of another base config
        (unless ``force``: the new base is recorded, old trials kept).
    """
    with self.locked():
      data = self.load() if self.exists() else {'trials': []}
      old = data.get('base_hash')
      if old and old != digest and not force:
        raise RunnerError(
            f'--sweep_dir={self.path} holds a sweep of a different base'
            f' config (base {old}, now {digest}: {_base_diff(data["base"], base)});'
            ' use another --sweep_dir, or --force to add these trials'
            ' anyway.')
      data['base'], data['base_hash'] = dataclasses.asdict(base), digest
      names = [t['name'] for t in data['trials']]
      indices = []
      for trial in trials:
        if trial.name in names:
          i = names.index(trial.name)
          data['trials'][i] = trial.to_json()
        else:
          data['trials'].append(trial.to_json())
          names.append(trial.name)
          i = len(names) - 1
        indices.append(i)
      _write_json(self.file, data)
    return indices


def _base_diff(old: dict, new: Base) -> str:
  new = dataclasses.asdict(new)
  diffs = []
  for key in ('gin_files', 'gin_bindings', 'search_paths', 'flags'):
    before, after = old.get(key, []), new[key]
    if before != after:
      gone = [x for x in before if x not in after]
      added = [x for x in after if x not in before]
      diffs.append(f'{key}: ' + ', '.join([f'-{x}' for x in gone] +
                                          [f'+{x}' for x in added]))
  return '; '.join(diffs) or 'the gin files changed'


def _die_with_parent():
  """``preexec_fn``: SIGTERM when the sweep process dies (Linux), so a
  killed sweep does not leave trials running (they checkpoint and exit)."""
  with contextlib.suppress(Exception):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def last_error(text: str) -> str | None:
  """The last ``gintrain: error:`` line of ``text``."""
  found = _ERROR_RE.findall(text)
  return found[-1].strip() if found else None


class TrialProcess:
  """Runs one trial's runner subprocess and keeps its record.

  ``start()`` returns False (and does nothing) for a finished trial or one
  another live process runs; ``poll()`` returns the final status once the
  runner exited (and writes the record); ``prune(reason)`` stops it early.
  ``writer``: whether this process writes the record (False for the
  other tasks of a multi-process trial).
  """

  def __init__(self, sweep: SweepDir, trial: Trial, env=None, cpus=None,
               writer=True, python=None):
    self.sweep, self.trial = sweep, trial
    self.dir = sweep.trial_dir(trial)
    self.env = env
    self.cpus = cpus
    self.writer = writer
    self.python = python or sys.executable
    self.proc = None
    self.record = None
    self.pruned = None
    self.status = None
    self._lock_fd = None
    self._log = None
    self._log_start = 0

  def command(self) -> list:
    return [self.python, '-m', 'gintrain.runner.train',
            f'--workdir={self.dir}', *self.trial.argv]

  def _take_lock(self) -> bool:
    fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT,
                 0o644)
    for _ in range(3):  # a status reader may hold it for an instant
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd
        return True
      except OSError:
        time.sleep(0.1)
    os.close(fd)
    return False

  def start(self) -> bool:
    os.makedirs(self.dir, exist_ok=True)
    if self.writer:
      status, record = trial_status(self.dir)
      if status in FINISHED:
        self.status = status
        return False
      if not self._take_lock():
        self.status = 'running'
        return False
      self.record = dict(record)
      self.record.update(
          name=self.trial.name, label=self.trial.label,
          bindings=self.trial.bindings, status='running', exit_status=None,
          error=None, reason=None, host=socket.gethostname(),
          pid=os.getpid(), started=time.time(), ended=None,
          attempts=int(record.get('attempts', 0)) + 1,
          command=self.command())
      _write_json(os.path.join(self.dir, RECORD_FILE), self.record)
    log_path = os.path.join(self.dir, LOG_FILE)
    self._log = open(log_path, 'ab')
    self._log_start = self._log.tell()
    if self.writer:
      self._log.write(f'== gintrain sweep: attempt {self.record["attempts"]}'
                      f' of {self.trial.name} at {time.ctime()}\n'.encode())
      self._log.flush()
    self.proc = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
        self.command(), stdout=self._log, stderr=subprocess.STDOUT,
        env=self.env, preexec_fn=_die_with_parent)
    if self.cpus:
      with contextlib.suppress(OSError):
        os.sched_setaffinity(self.proc.pid, self.cpus)
    return True

  def signal(self, signum) -> None:
    if self.proc is not None and self.proc.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        self.proc.send_signal(signum)

  def prune(self, reason: str) -> None:
    """Stops the trial (SIGTERM: the runner checkpoints and exits); its
    record will say ``pruned`` and why."""
    if self.pruned is None:
      self.pruned = reason
      self.signal(signal.SIGTERM)

  def log_text(self) -> str:
    with open(os.path.join(self.dir, LOG_FILE), 'rb') as f:
      f.seek(self._log_start)
      return f.read().decode('utf-8', 'replace')

  def poll(self) -> str | None:
    if self.proc is None:
      return self.status
    rc = self.proc.poll()
    if rc is None:
      return None
    return self._finish(rc)

  def wait(self) -> str:
    while True:
      status = self.poll()
      if status is not None:
        return status
      time.sleep(0.05)

  def exit_status(self) -> int:
    """The status ``gintrain sweep trial`` exits with."""
    if self.status == 'pruned':
      return PRUNED_EXIT_CODE
    if self.proc is None:
      return 0
    rc = self.proc.returncode
    return 128 - rc if rc < 0 else rc

  def _finish(self, rc: int) -> str:
    self.proc.wait()
    self._log.close()
    error = None
    if self.pruned is not None and rc != 0:
      # asked to stop: checkpointed (75), or killed by the SIGTERM itself
      # when it came before the runner took the signal over or as it exited
      status = 'pruned'
    elif rc == 0:
      status = 'done'
    elif rc in (_PREEMPTED, _INTERRUPTED):
      status = 'interrupted'
    else:
      status = 'failed'
      error = last_error(self.log_text()) or (
          f'gintrain: error: the runner was killed by signal {-rc}'
          if rc < 0 else f'gintrain: error: the runner exited with status'
          f' {rc} (see {os.path.join(self.dir, LOG_FILE)})')
    self.status = status
    if self.writer:
      self.record.update(status=status, ended=time.time(), error=error,
                         reason=self.pruned if status == 'pruned' else None,
                         exit_status=(PRUNED_EXIT_CODE if status == 'pruned'
                                      else self.exit_status()))
      _write_json(os.path.join(self.dir, RECORD_FILE), self.record)
    if self._lock_fd is not None:
      os.close(self._lock_fd)
      self._lock_fd = None
    return status
