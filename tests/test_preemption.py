"""runner.preemption: signal handling in one process, agreement across two.

The two-process tests run tests/cluster/preempt_toy.py (a loop with one
cross-process collective per step) under launch/local.sh: 2 real processes
x 2 CPU devices, jax.distributed on 127.0.0.1.
"""

import doctest
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.parallel import preemption# pylint: disable=wrong-import-position


@pytest.fixture
def handler():
  preemption.reset()
  preemption.install()
  yield
  preemption.uninstall()
  preemption.reset()


def test_doctests():
  result = doctest.testmod(preemption)
  assert result.failed == 0 and result.attempted > 0


def test_exit_code_is_ex_tempfail():
  assert preemption.PREEMPTED_EXIT_CODE == os.EX_TEMPFAIL == 75


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_flag_and_stops_single_process(handler, signum):
  assert not preemption.requested()
  assert not preemption.should_stop(3)
  os.kill(os.getpid(), signum)
  assert preemption.requested()
  assert preemption.should_stop(4)


def test_check_interval_only_checks_multiples(handler):
  preemption.request()
  assert not preemption.should_stop(4, check_interval=3)
  assert not preemption.should_stop(5, check_interval=3)
  assert preemption.should_stop(6, check_interval=3)
  with pytest.raises(ValueError, match='check_interval'):
    preemption.should_stop(6, check_interval=0)


def test_uninstall_restores_previous_handlers():
  seen = []
  previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
  try:
    preemption.install()
    preemption.install()  # idempotent: still restores the original
    preemption.uninstall()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == [1]
    assert not preemption.requested()
  finally:
    signal.signal(signal.SIGUSR1, previous)
    preemption.reset()


def _stops(launch):
  """``{process: (stop step, whether it got the signal itself)}``."""
  out = {}
  for i in range(launch.num_processes):
    match = re.search(r'^STOP (\d+) local=(True|False)$', launch.log(i),
                      re.MULTILINE)
    out[i] = (int(match.group(1)), match.group(2) == 'True') if match else None
  return out


def _assert_same_stop(launch, local, first, interval):
  """Both processes stop at one step: the first check after the signal
  (``first``) or the next one (the agreement holds a process at most one
  interval after the last check it passed)."""
  stops = _stops(launch)
  assert {i: s and s[1] for i, s in stops.items()} == local, stops
  steps = {s[0] for s in stops.values()}
  assert len(steps) == 1 and steps <= {first, first + interval}, stops


# The toy prints a line every step: silence this long, once it began, is a
# hang (e.g. a broken agreement), which fails in about this long instead of
# the generous whole-run bound.
STALL_S = 15


def _toy(tmp_path, *args):
  return harness.Launch([sys.executable, harness.TOY, *args],
                        tmp_path / 'logs', environ=harness.env(),
                        stall_s=STALL_S)


def test_two_processes_agree_on_stop_step(tmp_path):
  # Process 1 sends itself SIGUSR1 during step 7: both stop at the same
  # check (8 or 9), write nothing else, and exit with the preempted status.
  launch = _toy(tmp_path, '--steps=40', '--self_signal_at=7',
                '--self_signal_process=1', '--resume_steps=12,12')
  assert launch.wait() == harness.PREEMPTED, launch.describe()
  assert launch.statuses() == {0: 75, 1: 75}
  _assert_same_stop(launch, {0: False, 1: True}, 8, 1)
  for i in range(2):
    log = launch.log(i)
    assert 'GATHER p0,p1' in log  # all_gather: process order
    assert 'AGREED 12' in log     # agree_on_step
    assert 'DONE' not in log


def test_interval_and_sigterm_on_process_0(tmp_path):
  # SIGTERM on process 0 during step 7, checks every 3 steps: stop at 9
  # (or 12).
  launch = _toy(tmp_path, '--steps=40', '--self_signal_at=7',
                '--self_signal_process=0', '--self_signal=TERM',
                '--preemption_check_interval=3')
  assert launch.wait() == harness.PREEMPTED, launch.describe()
  _assert_same_stop(launch, {0: True, 1: False}, 9, 3)


def test_no_signal_runs_to_the_end_and_disagreement_is_an_error(tmp_path):
  launch = _toy(tmp_path, '--steps=5', '--resume_steps=4,none')
  assert launch.wait() == 3, launch.describe()
  for i in range(2):
    log = launch.log(i)
    assert re.search(r'DISAGREE .*process 0: 4, process 1: none', log), log
  launch = _toy(tmp_path / 'b', '--steps=5')
  assert launch.wait() == 0, launch.describe()
  for i in range(2):
    assert re.search(r'^DONE 5 ', launch.log(i), re.MULTILINE)


def test_sigterm_during_startup_is_not_lost(tmp_path):
  # jax.distributed's own SIGTERM notifier only logs; runner.distributed
  # takes over at initialize(), so the signal stops both at the first check.
  launch = _toy(tmp_path, '--steps=5', '--signal_at_startup',
                '--self_signal=TERM', '--self_signal_process=1')
  assert launch.wait() == harness.PREEMPTED, launch.describe()
  _assert_same_stop(launch, {0: False, 1: True}, 0, 1)


def _signal_launcher(tmp_path, launcher, signum):
  """Runs the toy (slow steps) under ``launcher``, signals the launcher
  itself once both processes are stepping; returns (status, outputs)."""
  log = tmp_path / 'out.log'
  command = [sys.executable, harness.TOY, '--steps=400', '--step_sleep=0.05']
  with open(log, 'w', encoding='utf-8') as out:
    proc = subprocess.Popen(
        [os.path.join(harness.LAUNCH, launcher), '-n', '2', '-d', '2',
         '-p', str(harness.free_port()),
         *(['-l'] if launcher == 'mpirun.sh' else []), '--', *command],
        stdout=out, stderr=subprocess.STDOUT, env=harness.env(),
        start_new_session=True)
    try:
      stepping = lambda: any(int(n) >= 3 for n in re.findall(  # pylint: disable=g-long-lambda
          r'step (\d+)', log.read_text()))
      assert harness.wait_progress(proc, [log], 120, STALL_S,
                                   until=stepping) is None, (
          f'status {proc.poll()}:\n{harness.tail(log.read_text())}')
      time.sleep(0.5)  # both processes are in the loop by now
      proc.send_signal(signum)
      status = harness.wait_progress(proc, [log], 120, STALL_S)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
  return status, log.read_text()


def test_local_sh_forwards_sigterm_to_all_processes(tmp_path):
  status, text = _signal_launcher(tmp_path, 'local.sh', signal.SIGTERM)
  assert status == harness.PREEMPTED, text
  stops = re.findall(r'^\[(\d)\] STOP (\d+) local=True$', text, re.MULTILINE)
  assert sorted(i for i, _ in stops) == ['0', '1'], text
  assert len({s for _, s in stops}) == 1


@pytest.mark.skipif(not harness.have('mpirun'),
                    reason='Open MPI not installed (apt-get install'
                    ' openmpi-bin); .ci/run installs it')
def test_mpirun_sh_turns_sigterm_into_a_checkpointing_stop(tmp_path):
  # mpirun itself would SIGKILL the ranks soon after forwarding SIGTERM;
  # mpirun.sh forwards SIGUSR1 instead, which mpirun passes on.
  status, text = _signal_launcher(tmp_path, 'mpirun.sh', signal.SIGTERM)
  assert status == harness.PREEMPTED, text
  stops = re.findall(r'^STOP (\d+) local=True$', text, re.MULTILINE)
  assert len(stops) == 2 and len(set(stops)) == 1, text
