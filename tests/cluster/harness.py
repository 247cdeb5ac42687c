"""Helpers for the multi-process tests: real processes, loopback ports only.

Used by tests/test_multihost.py, tests/test_preemption.py and
tests/test_distributed.py (imported with this directory on ``sys.path``).
Every process the tests start gets its environment from :func:`env`: CPU
only, ``PYTHONPATH`` with this directory (for ``slow_data`` and the toy
scripts), and a shared JAX compilation cache so that repeated launches of the
same experiment compile once.

Ports: JAX coordinators take ports from 24200-24399 (:func:`free_port`);
SLURM uses 24610-24650 (slurm_local.sh).
"""

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LAUNCH = os.path.join(REPO, 'launch')
GIN_FILE = os.path.join(HERE, 'multihost.gin')
TOY = os.path.join(HERE, 'preempt_toy.py')
SLURM_LOCAL = os.path.join(HERE, 'slurm_local.sh')
SLURM_LOCK = '/tmp/gintrain-slurm-cluster.lock'
PREEMPTED = 75


def worker_ports(lo: int, hi: int) -> tuple[int, int]:
  """This test process's share of the ports ``lo``-``hi - 1``.

  Under pytest-xdist (``.ci/run`` runs several workers) each worker gets its
  own slice, so two workers never pick the same free port between the check
  and the bind; a plain run gets the whole range.
  """
  worker = os.environ.get('PYTEST_XDIST_WORKER', '')
  count = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1') or 1)
  if not worker.startswith('gw') or count <= 1:
    return lo, hi
  index, size = int(worker[2:]), (hi - lo) // count
  return lo + index * size, lo + (index + 1) * size


PORT_RANGE = (24200, 24400)
_next_port = [0]


def port_free(port: int) -> bool:
  """Whether 127.0.0.1 can bind ``port`` now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(('127.0.0.1', port))
    except OSError:
      return False
    return True


def free_port(port_range: tuple[int, int] = PORT_RANGE) -> int:
  """A port of ``port_range`` (24200-24399 by default; this xdist worker's
  share of it, see :func:`worker_ports`) that 127.0.0.1 can bind now, taken
  round robin so consecutive tests get different ports."""
  lo, hi = worker_ports(*port_range)
  start = (_next_port[0] if lo <= _next_port[0] < hi else
           lo + os.getpid() % (hi - lo))
  for i in range(hi - lo):
    port = lo + (start - lo + i) % (hi - lo)
    if port_free(port):
      _next_port[0] = lo + (port + 1 - lo) % (hi - lo)
      return port
  raise RuntimeError(f'no free port in {lo}-{hi - 1} on 127.0.0.1')


# Prefix for a command that must start with SIGINT and SIGQUIT at their
# defaults, whatever this process inherited. A non-interactive shell starts its
# background jobs with both ignored, and an ignored disposition survives
# ``exec``: a suite started that way (``bash .ci/run &`` in a script) would hand
# it on to every process it starts. A POSIX shell cannot undo it ("signals
# ignored upon entry to a non-interactive shell cannot be trapped or reset"),
# so launch/local.sh started with SIGINT ignored could not give its trainers
# Ctrl-C. Tests that send SIGINT start their processes through this (an exec
# wrapper rather than ``preexec_fn``, which would fork a threaded process).
DEFAULT_SIGNALS = [
    sys.executable, '-c',
    'import os, signal, sys;'
    ' signal.signal(signal.SIGINT, signal.SIG_DFL);'
    ' signal.signal(signal.SIGQUIT, signal.SIG_DFL);'
    ' os.execvp(sys.argv[1], sys.argv[1:])']


def env(cache_dir=None, devices=None, **extra) -> dict:
  """The environment of a test process (from a clean copy of ours).

  ``devices``: virtual CPU devices per process (XLA_FLAGS); None leaves
  XLA_FLAGS without a device count (launch/*.sh -d sets it).
  """
  out = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 out.get('XLA_FLAGS', '')).strip()
  if devices:
    flags = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  if flags:
    out['XLA_FLAGS'] = flags
  else:
    out.pop('XLA_FLAGS', None)
  out['JAX_PLATFORMS'] = 'cpu'
  out['PYTHONPATH'] = os.pathsep.join(
      p for p in (HERE, REPO, out.get('PYTHONPATH')) if p)
  out['PYTHONUNBUFFERED'] = '1'
  for key in list(out):  # keep every JAX coordinator setting explicit
    if key.startswith('JAX_COORDINATOR') or key.startswith('SLURM_') or (
        key.startswith('OMPI_')):
      del out[key]
  if cache_dir:
    out['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
    out['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    out['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  out.update({k: str(v) for k, v in extra.items()})
  return out


def train_command(workdir, *args) -> list:
  """``python -m gintrain.runner.train`` on the tests' tiny experiment."""
  return [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={workdir}',
          f'--gin_file={GIN_FILE}', *args]


class Launch:
  """A ``launch/local.sh`` run in its own session (so it can be killed whole).

  Process i's output goes to ``log_dir/process_i.log``; local.sh's own
  messages (pids, exit statuses) to ``log_dir/launcher.log``.
  """

  def __init__(self, command, log_dir, num_processes=2, devices=2,
               port=None, environ=None, stall_s=None):
    self.log_dir = str(log_dir)
    self.stall_s = stall_s  # see wait()
    os.makedirs(self.log_dir, exist_ok=True)
    self.port = port or free_port()
    self.launcher_log = os.path.join(self.log_dir, 'launcher.log')
    self._log = open(self.launcher_log, 'w', encoding='utf-8')
    self.proc = subprocess.Popen(
        [*DEFAULT_SIGNALS, os.path.join(LAUNCH, 'local.sh'),
         '-n', str(num_processes), '-p',
         str(self.port), '-d', str(devices), '-l', self.log_dir, '--',
         *command],
        stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
        env=environ or env(), start_new_session=True)
    self.num_processes = num_processes

  def pids(self, timeout=60) -> list:
    """The pids of the processes (from local.sh's messages)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      found = dict(re.findall(r'process (\d+) pid (\d+)', self.text()))
      if len(found) == self.num_processes:
        return [int(found[str(i)]) for i in range(self.num_processes)]
      time.sleep(0.05)
    raise AssertionError(f'local.sh did not start its processes:\n'
                         f'{self.text()}')

  def text(self) -> str:
    with open(self.launcher_log, encoding='utf-8') as f:
      return f.read()

  def log(self, index) -> str:
    path = os.path.join(self.log_dir, f'process_{index}.log')
    with open(path, encoding='utf-8', errors='replace') as f:
      return f.read()

  def statuses(self) -> dict:
    """``{process index: exit status}`` reported by local.sh."""
    return {int(i): int(rc) for i, rc in re.findall(
        r'process (\d+) exited with status (\d+)', self.text())}

  def log_paths(self) -> list:
    return [os.path.join(self.log_dir, f'process_{i}.log')
            for i in range(self.num_processes)]

  def wait(self, timeout=240, stall_s=None) -> int:
    """The launcher's exit status; fails (killing everything) after
    ``timeout`` s, or, with ``stall_s`` (default: the constructor's), as
    soon as the processes' output stops growing for ``stall_s`` s once it
    began: a hang fails in about ``stall_s`` s instead of ``timeout``."""
    stall_s = self.stall_s if stall_s is None else stall_s
    try:
      return wait_progress(self.proc, self.log_paths(), timeout, stall_s)
    except AssertionError as e:
      self.kill()
      raise AssertionError(f'{e}; logs:\n{self.describe()}') from None
    finally:
      self._log.close()

  def kill(self):
    """SIGKILL the whole session: local.sh and every process it started."""
    with contextlib.suppress(ProcessLookupError):
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait(30)

  def describe(self) -> str:
    parts = [f'--- launcher\n{self.text()}']
    for i in range(self.num_processes):
      with contextlib.suppress(OSError):
        parts.append(f'--- process {i}\n{tail(self.log(i))}')
    return '\n'.join(parts)


def _size(path) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return -1


def wait_progress(proc, log_paths, timeout=240, stall_s=None, until=None):
  """``proc``'s exit status, polling every 50 ms (or None as soon as
  ``until()`` is true, if given, while ``proc`` runs).

  Raises AssertionError (without killing anything) after ``timeout`` s, or
  with ``stall_s``, when the files ``log_paths`` (the processes' output)
  have not grown for ``stall_s`` s since they first held output: a stuck
  run is a failure in ``stall_s`` s, however long the generous ``timeout``
  for a slow but progressing one. Start-up (no output yet) is bounded by
  ``timeout`` only.
  """
  begun = time.monotonic()
  sizes, changed = None, None
  while True:
    status = proc.poll()
    if status is not None:
      return status
    if until is not None and until():
      return None
    now = time.monotonic()
    if now - begun > timeout:
      raise AssertionError(f'did not finish within {timeout} s')
    if stall_s:
      current = [_size(p) for p in log_paths]
      if current != sizes:
        sizes = current
        changed = now if any(n > 0 for n in current) else None
      elif changed is not None and now - changed > stall_s:
        raise AssertionError(
            f'no progress: no process wrote output for {stall_s} s (a hang;'
            f' {now - begun:.0f} s after the start)')
    time.sleep(0.05)


def wait_for_resume(launch, timeout=240) -> int:
  """Waits, while ``launch`` (a :class:`Launch`) runs, for process 0's
  ``Resumed from ... (step N)`` line; returns N. Fails if the launch ends
  first."""
  pattern = re.compile(r'Resumed from \S+ \(step (\d+)\)')

  def resumed():
    try:
      return pattern.search(launch.log(0))
    except OSError:  # no log yet
      return None

  status = wait_progress(launch.proc, launch.log_paths(), timeout,
                         until=resumed)
  assert status is None, (f'the launch ended (status {status}) before it'
                          f' resumed:\n{launch.describe()}')
  return int(resumed().group(1))


def tail(text, lines=40) -> str:
  kept = [l for l in text.splitlines() if not l.startswith('    @ ')]
  return '\n'.join(kept[-lines:])


def wait_for_file(path, timeout=180, proc=None) -> None:
  """Polls (every 10 ms) until ``path`` exists; fails if ``proc`` ended."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f'{path} never appeared: the run ended first'
                           f' (status {proc.returncode})')
    if time.monotonic() > deadline:
      raise AssertionError(f'{path} did not appear within {timeout} s')
    time.sleep(0.01)


def checkpoint_steps(workdir) -> list:
  """Steps of the finished ``checkpoint_<step>`` files, sorted."""
  directory = os.path.join(str(workdir), 'checkpoints')
  steps = []
  for name in os.listdir(directory):
    match = re.fullmatch(r'checkpoint_(\d+)', name)
    if match:
      steps.append(int(match.group(1)))
  return sorted(steps)


def checkpoint_entries(workdir) -> list:
  """Every entry of ``<workdir>/checkpoints`` (to spot temporary files)."""
  return sorted(os.listdir(os.path.join(str(workdir), 'checkpoints')))


def final_state(workdir, step):
  """The ``state`` dict (numpy leaves) of ``checkpoint_<step>``."""
  from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(workdir), 'checkpoints', f'checkpoint_{step}')
  restored = checkpoints.restore_checkpoint(path, target=None)
  assert restored is not None, f'no checkpoint at {path}'
  return restored['state']


def flat(tree, prefix=''):
  """``{'params/Dense_0/kernel': array}`` of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f'{prefix}{key}/'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def run_workers(worker, root, num=2, devices=2, timeout=180, port=None):
  """Runs ``python worker <index> <port> <root>`` as ``num`` processes on
  127.0.0.1 and returns ([exit codes], [outputs]). Waits for all, at most
  ``timeout`` s, or 10 s past the first failure (a failed process leaves
  the others at a barrier); kills what is left. Outputs go through files in
  ``root`` (worker<i>.log), so a chatty worker never blocks on a pipe."""
  port = free_port() if port is None else port
  logs = [open(os.path.join(root, f'worker{i}.log'), 'w+')  # pylint: disable=consider-using-with
          for i in range(num)]
  procs = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, worker, str(i), str(port), str(root)], cwd=REPO,
      env=env(devices=devices), stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(num)]
  deadline = time.monotonic() + timeout
  failed_at = None
  try:
    while None in [p.poll() for p in procs]:
      now = time.monotonic()
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = now
      if now > deadline or (failed_at and now > failed_at + 10):
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  return [p.returncode for p in procs], outputs


def mount_namespace():
  """A command prefix that runs a command in a private mount namespace (to
  mount a small tmpfs without touching the machine's mounts), or None where
  no namespace can be made (no ``unshare``, no privilege)."""
  if shutil.which('unshare') is None:
    return None
  for cmd in (['unshare', '-m'], ['unshare', '-rm']):
    probe = subprocess.run(cmd + ['true'], capture_output=True, check=False)
    if probe.returncode == 0:
      return cmd
  return None


def node_name_resolves() -> bool:
  """Whether ``hostname -s`` resolves (Debian lists it in /etc/hosts)."""
  try:
    socket.gethostbyname(socket.gethostname().split('.')[0])
  except OSError:
    return False
  return True


def have(*binaries) -> bool:
  return all(shutil.which(b) for b in binaries)


class SlurmCluster:
  """The single-node SLURM of slurm_local.sh, up for the lifetime of this
  object (``with SlurmCluster() as slurm: ...``).

  Its state directory is a fresh one under /tmp: munged runs as the munge
  user, who cannot enter pytest's private (0700) temporary directories.
  """

  def __init__(self):
    base = '/tmp' if os.access('/tmp', os.W_OK) else tempfile.gettempdir()
    self.state_dir = tempfile.mkdtemp(prefix='gintrain-slurm-', dir=base)
    self.env = dict(os.environ, SLURM_LOCAL_DIR=self.state_dir)
    self.conf = os.path.join(self.state_dir, 'slurm.conf')

  def __enter__(self):
    # One cluster at a time on this machine (fixed ports 24610/24611): a
    # second test process (an xdist worker) waits for the first to finish.
    self._lock = open(SLURM_LOCK, 'w', encoding='utf-8')
    fcntl.flock(self._lock, fcntl.LOCK_EX)
    result = subprocess.run(['bash', SLURM_LOCAL, 'up'], env=self.env,
                            capture_output=True, text=True, timeout=120)
    if result.returncode:
      self.__exit__()
      raise AssertionError(f'slurm_local.sh up failed ({result.returncode}):'
                           f'\n{result.stdout}\n{result.stderr}')
    return self

  def __exit__(self, exc_type=None, *exc_info):
    if exc_type is not None:  # shown by pytest with the failure
      print(self.logs())
    try:
      subprocess.run(['bash', SLURM_LOCAL, 'down'], env=self.env,
                     capture_output=True, text=True, timeout=120)
    finally:
      self._lock.close()  # releases the flock

  def logs(self, lines=60) -> str:
    parts = []
    for name in ('slurmctld.log', 'slurmd.log'):
      path = os.path.join(self.state_dir, 'log', name)
      with contextlib.suppress(OSError), open(path, encoding='utf-8') as f:
        parts.append(f'--- {name}\n' + tail(f.read(), lines))
    return '\n'.join(parts)

  def client_env(self, base) -> dict:
    return dict(base, SLURM_CONF=self.conf)

  def job_env(self, cache_dir, port) -> dict:
    """The environment of a runner job submitted here: 2 CPU devices per
    task, the coordinator on 127.0.0.1:``port``; JAX detects the rest."""
    environ = self.client_env(env(
        cache_dir, devices=2, GINTRAIN_PYTHON=sys.executable,
        JAX_COORDINATOR_PORT=port,
        JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}'))
    if not node_name_resolves():
      # JAX takes the coordinator host from SLURM_STEP_NODELIST (this
      # machine's short name); count and index are still auto-detected.
      environ['JAX_COORDINATOR_ADDRESS'] = f'127.0.0.1:{port}'
    return environ

  def job_field(self, job, field) -> str:
    out = subprocess.run(['scontrol', 'show', 'job', str(job)],
                         env=self.client_env(os.environ), capture_output=True,
                         text=True, timeout=30).stdout
    match = re.search(rf'\b{field}=(\S*)', out)
    return match.group(1) if match else ''

  def run(self, *args) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=self.client_env(os.environ),
                          capture_output=True, text=True, timeout=60)
