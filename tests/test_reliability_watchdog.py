"""The step watchdog (issue 12, item 9): a multi-process run whose step hangs
ends on every process with the thread stacks, one ``gintrain: error:`` line
and status 3, instead of hanging until someone kills it.

The watchdog exits the process (``os._exit``), so each unit case runs in a
fresh interpreter; the end-to-end case hangs process 1 of a 2-process run
(tests/user_plugins/faults.py) and checks that both processes report and exit
within a bounded time.
"""

import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.parallel import watchdog  # pylint: disable=wrong-import-position

from tiny import run  # pylint: disable=g-bad-import-order,wrong-import-position

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'user_plugins')
HUNG = watchdog.HUNG_EXIT_CODE
# Generous bounds: only a hang (the bug) gets near them.
HANG_BOUND_S = 120
ERROR = 'gintrain: error: no training step completed within --step_timeout='


def _python(code, timeout=HANG_BOUND_S):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                        env=harness.env(), capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_exit_code_is_documented_and_distinct():
  assert HUNG == 3
  assert HUNG not in (0, 1, 75, 130)


def test_no_beat_after_the_first_exits_3_with_stacks_and_one_line():
  out = _python('''
      import time
      from gintrain.runner.parallel import watchdog
      def stuck_in_user_code():
        time.sleep(1000)  # releases the GIL, as XLA does
      watchdog.start(1, (1, 2))
      watchdog.beat(7)
      stuck_in_user_code()
  ''')
  assert out.returncode == HUNG, out.stderr
  err = out.stderr
  assert 'most recent call first' in err and 'stuck_in_user_code' in err, err
  errors = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  assert errors == [
      f'{ERROR}1 s after step 7 (process 1 of 2): hung; thread stacks above.'
      ' Exiting with status 3 so that the launcher relaunches (resume from'
      ' the latest checkpoint).'], err
  assert err.rstrip().splitlines()[-1] == errors[0]
  assert 'Traceback' not in err


def test_fires_while_xla_executes():
  # The main thread is inside a compiled computation (XLA's Execute, GIL
  # released) that runs far longer than the timeout: a SIGTERM flag would
  # never be seen, the watchdog thread still ends the process.
  out = _python('''
      import jax, jax.numpy as jnp
      from gintrain.runner.parallel import watchdog
      # about 2**31 iterations of a loop: far longer than the timeout
      forever = jax.jit(lambda x: jax.lax.while_loop(
          lambda c: c[0] >= 0, lambda c: (c[0] + 1, c[1] * 1.0000001), x))
      args = (jnp.int32(0), jnp.float32(1))
      forever.lower(args).compile()
      watchdog.start(2)
      watchdog.beat(1)
      jax.block_until_ready(forever(args))
      print('finished?!')
  ''')
  assert out.returncode == HUNG, out.stderr[-3000:]
  assert 'finished' not in out.stdout
  assert ERROR + '2 s after step 1 (process 0 of 1)' in out.stderr


def test_beats_keep_it_quiet_it_is_disarmed_before_the_first_and_stops():
  out = _python('''
      import time
      from gintrain.runner.parallel import watchdog
      watchdog.start(0.5)
      time.sleep(2)            # disarmed before the first beat
      for step in range(30):   # 3 s of beats every 0.1 s
        watchdog.beat(step)
        time.sleep(0.1)
      watchdog.stop()
      time.sleep(2)            # stopped: no report
      print('survived')
  ''')
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == 'survived' and 'gintrain:' not in out.stderr


def test_compilation_holds_the_clock(monkeypatch):
  # While a thread is inside JAX's compiler the deadline moves on.
  seen = []
  monkeypatch.setattr(watchdog, '_compiling', lambda: seen.append(1) or True)
  dog = watchdog.Watchdog(0.2, poll_s=0.05)
  try:
    dog.beat(1)
    import time  # pylint: disable=g-import-not-at-top
    time.sleep(1.0)  # without the hold this process would be gone
  finally:
    dog.stop()
  assert seen


def test_single_process_runs_have_a_watchdog_too(tmp_path):
  # Issue 18: 1-process runs are watched too (their exit 3 is tested in a
  # subprocess by tests/test_reliability_round3.py); stopped at the end.
  seen = []
  def look(step):
    if step == 2:
      seen.append(watchdog.active())
  assert run(tmp_path, hooks=[look]) == 0
  assert seen[0] is not None and seen[0].process == (0, 1)
  assert watchdog.active() is None


def test_negative_step_timeout_is_one_line(tmp_path, capsys):
  assert run(tmp_path, '--step_timeout=-1') == 1
  assert 'step_timeout' in capsys.readouterr().err


@pytest.mark.parametrize('victim, check_interval', [
    (1, 1000),  # the coordinator waits inside the next step
    (0, 1),     # the coordinator hangs; checks of a preemption every step
])
def test_two_processes_one_hangs_both_exit_with_stacks(tmp_path, victim,
                                                       check_interval):
  environ = harness.env(PYTHONPATH=os.pathsep.join(
      [PLUGINS, harness.env()['PYTHONPATH']]))
  workdir = tmp_path / 'run'
  launch = harness.Launch(
      harness.train_command(
          workdir, '--heartbeat_timeout=30', '--barrier_timeout=60',
          '--shutdown_timeout=20', '--initialization_timeout=60',
          '--step_timeout=5', '--gin_bindings=import faults',
          '--gin.train.actions=[@faults.HangAt()]', '--gin.HangAt.step=15',
          f'--gin.HangAt.process={victim}', '--gin.train.num_steps=100000',
          f'--preemption_check_interval={check_interval}'),
      tmp_path / 'logs', environ=environ)
  try:
    status = launch.wait(timeout=HANG_BOUND_S)
  finally:
    if launch.proc.poll() is None:
      launch.kill()
  assert status != 0, launch.describe()
  assert launch.statuses() == {0: HUNG, 1: HUNG}, launch.describe()
  for i in range(2):
    log = launch.log(i)
    assert 'most recent call first' in log, harness.tail(log)
    errors = [l for l in log.splitlines() if l.startswith('gintrain: error:')]
    assert len(errors) == 1, harness.tail(log)
    assert errors[0].startswith(f'{ERROR}5 s after step 1'), errors
    assert f'(process {i} of 2): hung' in errors[0]
  hung = launch.log(victim)
  assert f'HANGING at step 15 on process {victim}' in hung
  assert 'faults.py' in hung  # its stack shows where it hangs
  waiting = _main_stack(launch.log(1 - victim))
  assert 'in _loop' in waiting, waiting  # stuck in the loop, reported


def _main_stack(log):
  """The faulthandler stack of the thread that runs the trainer."""
  stacks = log.split('\n\n')
  return next((s for s in stacks if 'runner/cli/main.py' in s), log)
