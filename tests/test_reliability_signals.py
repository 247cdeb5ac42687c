"""Ctrl-C (SIGINT) is a preemption: one synchronized checkpoint, exit
status 130; a second Ctrl-C aborts at once (issue 12, item 5)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.parallel import preemption  # pylint: disable=wrong-import-position
from gintrain.runner.parallel import signals  # pylint: disable=wrong-import-position
from gintrain.runner import train  # pylint: disable=wrong-import-position

from tiny import TINY, run  # pylint: disable=g-bad-import-order
INTERRUPTED = 130



def ckpt_names(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(autouse=True)
def clean_flag():
  before = signal.getsignal(signal.SIGINT)
  preemption.reset()
  yield
  preemption.reset()
  # The run restored the test process's own Ctrl-C handler.
  assert signal.getsignal(signal.SIGINT) is before


def _sigint_at(step, count=1, gap=0.0):
  def hook(s):
    if s == step:
      for i in range(count):
        if i:
          time.sleep(gap)
        os.kill(os.getpid(), signal.SIGINT)
  return hook


def test_exit_codes():
  assert preemption.INTERRUPTED_EXIT_CODE == INTERRUPTED
  assert preemption.exit_code(signal.SIGINT) == INTERRUPTED
  assert preemption.exit_code(signal.SIGTERM) == 75
  assert preemption.exit_code(None) == 75
  assert signal.SIGINT in preemption.SIGNALS


def test_received_prefers_requeue_signals():
  signals.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.requested() and signals.received() == signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received() == signal.SIGTERM  # requeue wins
  finally:
    signals.uninstall()


def test_sigint_checkpoints_at_that_step_and_exits_130(tmp_path, caplog):
  # Two SIGINTs at once are one Ctrl-C (the terminal's and local.sh's).
  assert run(tmp_path, hooks=[_sigint_at(6, count=2)]) == INTERRUPTED
  assert ckpt_names(tmp_path) == ['checkpoint_4', 'checkpoint_6']
  assert 'interrupted (Ctrl-C) at step 6; checkpoint saved; exiting with' \
      ' status 130' in caplog.text
  preemption.reset()
  seen = []
  assert run(tmp_path, hooks=[seen.append]) == 0
  assert seen[0] == 7  # resumed from checkpoint_6
  assert ckpt_names(tmp_path) == ['checkpoint_12', 'checkpoint_6',
                                  'checkpoint_8']


def test_second_sigint_aborts_without_checkpoint(tmp_path):
  gap = signals.SIGINT_REPEAT_S + 0.2
  with pytest.raises(KeyboardInterrupt, match='second Ctrl-C'):
    run(tmp_path, hooks=[_sigint_at(6, count=2, gap=gap)])
  assert ckpt_names(tmp_path) == ['checkpoint_4']


def test_sigterm_still_exits_75(tmp_path):
  def hook(s):
    if s == 5:
      os.kill(os.getpid(), signal.SIGTERM)
  assert run(tmp_path, hooks=[hook]) == preemption.PREEMPTED_EXIT_CODE
  assert ckpt_names(tmp_path) == ['checkpoint_4', 'checkpoint_5']


def test_local_sh_forwards_ctrl_c_to_the_trainers(tmp_path):
  workdir = tmp_path / 'run'
  launch = harness.Launch(
      harness.train_command(workdir, '--gin.train.num_steps=400',
                            '--heartbeat_timeout=5', '--barrier_timeout=60',
                            '--shutdown_timeout=20',
                            '--initialization_timeout=60'),
      tmp_path / 'logs', environ=harness.env())
  try:
    pids = launch.pids()
    harness.wait_for_file(workdir / 'checkpoints' / 'checkpoint_20',
                          proc=launch.proc)
    launch.proc.send_signal(signal.SIGINT)  # to local.sh only
    assert launch.wait(timeout=120) == INTERRUPTED, launch.describe()
  finally:
    if launch.proc.poll() is None:
      launch.kill()
  assert launch.statuses() == {0: INTERRUPTED, 1: INTERRUPTED}
  for pid in pids:  # both ended
    assert not os.path.exists(f'/proc/{pid}') or _is_zombie(pid)
  stops = [int(re.search(r'Preemption agreed before step (\d+)',
                         launch.log(i)).group(1)) for i in range(2)]
  assert stops[0] == stops[1] and 20 <= stops[0] < 400
  stop = stops[0]
  assert harness.checkpoint_steps(workdir)[-1] == stop
  assert int(harness.final_state(workdir, stop)['step']) == stop
  for i in range(2):
    assert f'interrupted (Ctrl-C) at step {stop}; checkpoint saved' in (
        launch.log(i))


def _sigint_ignored(status_text):
  mask = int(re.search(r'^SigIgn:\s*(\w+)', status_text,
                       re.MULTILINE).group(1), 16)
  return bool(mask & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize('logs', [True, False])
def test_local_sh_processes_do_not_ignore_sigint(tmp_path, logs):
  # A non-interactive shell starts background jobs with SIGINT ignored.
  show = ['bash', '-c', 'grep SigIgn /proc/$$/status']
  args = ['-l', str(tmp_path)] if logs else []
  proc = subprocess.run(
      [*harness.DEFAULT_SIGNALS, os.path.join(harness.LAUNCH, 'local.sh'),
       '-n', '2', '-p',
       str(harness.free_port()), *args, '--', *show],
      capture_output=True, text=True, timeout=60, env=harness.env(),
      stdin=subprocess.DEVNULL)
  assert proc.returncode == 0, proc.stderr
  if logs:
    texts = [(tmp_path / f'process_{i}.log').read_text() for i in range(2)]
  else:
    texts = [re.search(rf'^\[{i}\] (SigIgn:.*)$', proc.stdout,
                       re.MULTILINE).group(1) for i in range(2)]
  assert [_sigint_ignored(t) for t in texts] == [False, False], texts


def _is_zombie(pid):
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().split(')')[-1].split()[0] == 'Z'
  except OSError:
    return True


def test_ctrl_c_before_the_loop_is_one_line_and_130(tmp_path):
  # The console script: Ctrl-C during start-up (no handler yet).
  proc = subprocess.Popen(
      [*harness.DEFAULT_SIGNALS, sys.executable, '-c',
       'import sys; sys.argv[0] = "gintrain";'
       ' from gintrain.runner.cli.main import run; run()',
       f'--workdir={tmp_path}', *TINY, '--gin.train.num_steps=100000',
       '--gin.checkpoint_policy.every_steps=0'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=harness.env())
  try:
    harness.wait_for_file(tmp_path / 'config.parsed.gin', timeout=120,
                          proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == INTERRUPTED, err
  assert 'Traceback' not in err, err
  last = err.strip().splitlines()[-1]
  assert last in ('gintrain: interrupted (Ctrl-C); no checkpoint written.',
                  ) or 'interrupted (Ctrl-C) at step' in last, err
