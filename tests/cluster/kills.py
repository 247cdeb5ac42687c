"""SIGKILL the runner at random moments, relaunch, compare bitwise (tests only).

One piece of code for every kill-and-resume test of the runner on the
multi-host experiment (tests/cluster/multihost.gin): tests/test_multihost.py
kills a 2-process run once mid-run, tests/test_reliability_kills.py kills
1- and 2-process runs many times (a soak).

A *run* is one launch of the runner, either one process
(``python -m gintrain.runner.train``) or two (``launch/local.sh``, which
:class:`harness.Launch` starts in its own session). :func:`kill` SIGKILLs
every process of a run at once. :class:`Soak` repeats: launch in an
episode's workdir, SIGKILL at a random moment, relaunch in the same workdir,
until the episode's run ends by itself; then it checks the final state
bitwise against an uninterrupted run with the same process count.
"""

import contextlib
import dataclasses
import os
import random
import re
import signal
import subprocess
import time

import numpy as np

import harness

# Bounded failure detection (the defaults are minutes).
FAST_FAILURE = ('--heartbeat_timeout=5', '--barrier_timeout=60',
                '--shutdown_timeout=20', '--initialization_timeout=60')
# Only a hang (a bug) gets near these.
RUN_BOUND_S = 300


class Single:
  """One runner process in its own session (same interface as
  :class:`harness.Launch` for what the soak needs)."""

  num_processes = 1

  def __init__(self, command, log_dir, environ):
    os.makedirs(log_dir, exist_ok=True)
    self.path = os.path.join(str(log_dir), 'process_0.log')
    self._log = open(self.path, 'w', encoding='utf-8')
    self.proc = subprocess.Popen(command, stdout=self._log,
                                 stderr=subprocess.STDOUT, cwd=harness.REPO,
                                 env=environ, start_new_session=True)

  def log(self, index=0) -> str:
    del index
    with open(self.path, encoding='utf-8', errors='replace') as f:
      return f.read()

  def wait(self, timeout=RUN_BOUND_S) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f'run did not finish within {timeout} s:\n'
                           + self.describe()) from None
    finally:
      self._log.close()

  def kill(self):
    with contextlib.suppress(ProcessLookupError):
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait(30)

  def describe(self) -> str:
    return f'--- process 0\n{harness.tail(self.log())}'


def start(workdir, log_dir, processes, environ, *args):
  """Launches the multi-host experiment in ``workdir`` on 1 or 2
  processes (2 CPU devices in all, so 2 processes have 1 each)."""
  command = harness.train_command(workdir, *args)
  if processes == 1:
    flags = environ.get('XLA_FLAGS', '')
    return Single(command, log_dir, dict(environ, XLA_FLAGS=(
        f'{flags} --xla_force_host_platform_device_count=2'.strip())))
  return harness.Launch(command + list(FAST_FAILURE), log_dir,
                        num_processes=processes, devices=2 // processes,
                        environ=environ)


def kill(run) -> None:
  """SIGKILLs every process of ``run`` (and its launcher) at once."""
  run.kill()
  with contextlib.suppress(Exception):
    run.wait(timeout=60)


def last_state(workdir):
  return harness.final_state(workdir, harness.checkpoint_steps(workdir)[-1])


def assert_identical(workdir, reference, step=None) -> None:
  """The checkpoints of ``step`` (default: the latest) of both workdirs
  hold bitwise-equal states."""
  if step is None:
    got, want = last_state(workdir), last_state(reference)
  else:
    got = harness.final_state(workdir, step)
    want = harness.final_state(reference, step)
  got, want = harness.flat(got), harness.flat(want)
  assert got.keys() == want.keys()
  for key in want:
    assert np.asarray(got[key]).dtype == np.asarray(want[key]).dtype, key
    assert np.array_equal(got[key], want[key]), key


@dataclasses.dataclass
class Stats:
  kills: int = 0
  launches: int = 0
  resumes: int = 0
  episodes: int = 0
  failures: list = dataclasses.field(default_factory=list)
  kills_by_processes: dict = dataclasses.field(
      default_factory=lambda: {1: 0, 2: 0})


class Soak:
  """``kills`` SIGKILLs at random moments over episodes that alternate
  between 1 and 2 processes (at most ``per_episode`` kills each).

  ``args``: runner flags for every launch (e.g. frequent checkpoints).
  ``references``: ``{processes: workdir of an uninterrupted run}``.
  """

  def __init__(self, base, environ, args, references, kills, seed=0,
               per_episode=4):
    self.base, self.environ, self.args = str(base), environ, list(args)
    self.references = references
    self.target, self.per_episode = kills, per_episode
    self.random = random.Random(seed)
    self.stats = Stats()
    self.durations = {}  # processes -> seconds of an uninterrupted launch

  def _launch(self, workdir, processes, name):
    self.stats.launches += 1
    return start(workdir, os.path.join(self.base, 'logs', name), processes,
                 self.environ, *self.args)

  def _fail(self, what, run):
    self.stats.failures.append(what)
    raise AssertionError(f'{what}\n{run.describe()}\nstats: {self.stats}')

  def _finished(self, run, workdir, resumable, name):
    """Checks a launch that ended by itself."""
    status = run.proc.returncode
    if status != 0:
      self._fail(f'{name}: exit status {status} (a failed resume)', run)
    logs = ''.join(run.log(i) for i in range(run.num_processes))
    if resumable and 'Resumed from' not in logs:
      self._fail(f'{name}: checkpoints existed but the run did not resume',
                 run)
    if 'does not read back' in logs:
      self._fail(f'{name}: a checkpoint was corrupt after a SIGKILL', run)

  def episode(self, processes):
    """Kill-relaunch cycles in a fresh workdir until the run completes."""
    index = self.stats.episodes
    self.stats.episodes += 1
    workdir = os.path.join(self.base, f'episode{index}_p{processes}')
    kills_here = 0
    for attempt in range(10 ** 6):
      name = f'episode{index}_p{processes}_launch{attempt}'
      resumable = os.path.isdir(os.path.join(workdir, 'checkpoints')) and bool(
          harness.checkpoint_steps(workdir))
      begun = time.monotonic()
      run = self._launch(workdir, processes, name)
      want_kill = (kills_here < self.per_episode and
                   self.stats.kills < self.target)
      if want_kill:
        # Half the kills anywhere in a launch (start-up included), half
        # once this launch is stepping (writing checkpoints).
        typical = self.durations.get(processes, 10.0)
        if self.random.random() < 0.5:
          delay = self.random.uniform(0.0, typical)
        else:
          delay = self._after_stepping(run, workdir, begun)
          delay = None if delay is None else delay + self.random.uniform(
              0.0, 1.5)
        if delay is not None:
          deadline = begun + delay
          while time.monotonic() < deadline and run.proc.poll() is None:
            time.sleep(0.005)
        if run.proc.poll() is None:
          kill(run)
          kills_here += 1
          self.stats.kills += 1
          self.stats.kills_by_processes[processes] += 1
          if resumable:
            self.stats.resumes += 1
          continue
      run.wait(RUN_BOUND_S)
      self._finished(run, workdir, resumable, name)
      if resumable:
        self.stats.resumes += 1
      assert_identical(workdir, self.references[processes])
      return workdir
    raise AssertionError('unreachable')

  def _after_stepping(self, run, workdir, begun):
    """Seconds from ``begun`` until this launch wrote a checkpoint (None
    if it ended first)."""
    directory = os.path.join(workdir, 'checkpoints')
    before = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    while run.proc.poll() is None:
      if os.path.isdir(directory) and set(os.listdir(directory)) - before:
        return time.monotonic() - begun
      if time.monotonic() - begun > RUN_BOUND_S:
        return None
      time.sleep(0.005)
    return None

  def run(self):
    """Episodes until ``kills`` kills; returns the stats."""
    processes = 1
    while self.stats.kills < self.target:
      self.episode(processes)
      processes = 3 - processes
    return self.stats


def reference(base, environ, args, processes):
  """An uninterrupted run; returns (workdir, seconds)."""
  workdir = os.path.join(str(base), f'reference_p{processes}')
  begun = time.monotonic()
  run = start(workdir, os.path.join(str(base), 'logs', f'reference_p'
                                    f'{processes}'), processes, environ,
              *args)
  status = run.wait(RUN_BOUND_S)
  assert status == 0, run.describe()
  return workdir, time.monotonic() - begun


def resumed_step(log) -> int:
  match = re.search(r'Resumed from \S+ \(step (\d+)\)', log)
  return int(match.group(1)) if match else 0
