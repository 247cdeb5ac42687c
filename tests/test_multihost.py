"""The runner on 2 real processes x 2 virtual CPU devices (jax.distributed on
127.0.0.1), started by launch/local.sh, launch/mpirun.sh (Open MPI) and
launch/slurm.sbatch (a real single-node SLURM started here).

The experiment is tests/cluster/multihost.gin: 60 steps of a small MLP,
global batch 32, a checkpoint every 10 steps (all kept); every step loads its
batch through tests/cluster/slow_data.py, which sleeps 30 ms, so that a test
can signal or kill processes mid-run without racing the end of training.

Shown here:
* 2 processes train to the same params as 1 process with 4 devices (float
  tolerance), writing one file per checkpoint, metrics from process 0 only;
* SIGTERM to one process: both agree, write one checkpoint, exit 75; the
  relaunch resumes from it, is SIGKILLed (both processes) mid-run, and a
  second relaunch resumes again: bitwise-identical final state to the
  uninterrupted 2-process run (one sequence for both signals);
* SIGKILL of one process: the other exits non-zero, with a message, within
  the heartbeat timeout;
* mpirun (pmap mode) and SLURM sbatch+srun (sharded mode; preempted by
  SIGUSR1, requeued by the script, resumed) with no coordinator flag.
"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import kills  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 60
SAVES = [10, 20, 30, 40, 50, 60]
# Bounded failure detection for every run here (defaults are minutes).
FAST_FAILURE = kills.FAST_FAILURE


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def single_run(cache, tmp_path_factory):
  """1 process, 4 CPU devices: the reference for the float comparison."""
  workdir = tmp_path_factory.mktemp('single')
  result = subprocess.run(
      harness.train_command(workdir), env=harness.env(cache, devices=4),
      capture_output=True, text=True, timeout=300, cwd=harness.REPO)
  assert result.returncode == 0, harness.tail(result.stderr)
  return workdir


def _local(cache, tmp_path, name, *args):
  workdir = tmp_path / name
  launch = harness.Launch(
      harness.train_command(workdir, *FAST_FAILURE, *args),
      tmp_path / f'{name}_logs', environ=harness.env(cache))
  return workdir, launch


@pytest.fixture(scope='module')
def local_run(cache, tmp_path_factory):
  """2 processes x 2 devices via launch/local.sh, uninterrupted."""
  workdir, launch = _local(cache, tmp_path_factory.mktemp('local'), 'run')
  assert launch.wait() == 0, launch.describe()
  return workdir, launch


def _assert_close(workdir, reference, step=STEPS):
  got = harness.flat(harness.final_state(workdir, step))
  want = harness.flat(harness.final_state(reference, step))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)


def _assert_identical(workdir, reference, step=STEPS):
  kills.assert_identical(workdir, reference, step)


def _assert_one_file_per_save(workdir, steps):
  assert harness.checkpoint_steps(workdir) == steps
  # nothing else: no per-process copies, no temporary files left behind
  assert harness.checkpoint_entries(workdir) == sorted(
      f'checkpoint_{s}' for s in steps)


def test_two_processes_match_one_process(single_run, local_run):
  workdir, launch = local_run
  _assert_one_file_per_save(workdir, SAVES)
  _assert_close(workdir, single_run)
  # metrics, logs and config files come from process 0 only
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == SAVES
  for name in ('config.parsed.gin', 'config.operative.gin', 'flags.txt',
               'settings.json'):
    assert (workdir / name).exists(), name
  with open(workdir / 'settings.json', encoding='utf-8') as f:
    devices = json.load(f)['devices']
  assert (devices['process_count'], devices['device_count']) == (2, 4)
  assert 'step 60/60' in launch.log(0)
  assert 'step 60/60' not in launch.log(1)
  assert 'initialize via flags' in launch.log(1)


def test_sigterm_to_one_process_then_sigkill_both_then_relaunch(
    cache, tmp_path, local_run):
  """One workdir through both interruptions, each checked on the way, and
  its end state bitwise that of the uninterrupted run (one launch sequence
  instead of two that each started from scratch):

  1. SIGTERM to process 1 mid-run: both agree on a step, write one
     checkpoint and exit 75;
  2. the relaunch resumes from it and is SIGKILLed (local.sh and both
     processes) mid-run, once it wrote a checkpoint of its own (right after
     its resume if none is left before the end);
  3. the next relaunch resumes and finishes.
  """
  workdir = tmp_path / 'interrupted'

  def launch_in(logs):
    return harness.Launch(harness.train_command(workdir, *FAST_FAILURE),
                          tmp_path / logs, environ=harness.env(cache))

  launch = launch_in('term_logs')
  harness.wait_for_file(workdir / 'checkpoints' / 'checkpoint_20',
                        proc=launch.proc)
  os.kill(launch.pids()[1], 15)  # SIGTERM
  assert launch.wait() == harness.PREEMPTED, launch.describe()
  assert launch.statuses() == {0: 75, 1: 75}
  agreed = [int(re.search(r'Preemption agreed before step (\d+)',
                          launch.log(i)).group(1)) for i in range(2)]
  assert agreed[0] == agreed[1]
  stop = agreed[0]
  assert 20 <= stop < STEPS
  saved = sorted({s for s in SAVES if s < stop} | {stop})
  _assert_one_file_per_save(workdir, saved)
  state = harness.final_state(workdir, stop)
  assert int(state['step']) == stop

  launch = launch_in('kill_logs')
  assert harness.wait_for_resume(launch) == stop
  assert f'checkpoint_{stop} (step {stop})' in launch.log(0)
  after = [s for s in SAVES if stop < s < STEPS]
  if after:
    harness.wait_for_file(workdir / 'checkpoints' / f'checkpoint_{after[0]}',
                          proc=launch.proc)
  kills.kill(launch)  # SIGKILL to local.sh and both processes
  assert max(harness.checkpoint_steps(workdir)) < STEPS  # really mid-run

  launch = launch_in('final_logs')
  assert launch.wait() == 0, launch.describe()
  assert stop <= kills.resumed_step(launch.log(0)) < STEPS, launch.log(0)
  _assert_one_file_per_save(workdir, sorted(set(SAVES) | {stop}))
  _assert_identical(workdir, local_run[0])


@pytest.mark.parametrize('victim', [1, 0])
def test_sigkill_one_process_the_other_exits_with_an_error(cache, tmp_path,
                                                           victim):
  workdir, launch = _local(cache, tmp_path, 'crash')
  harness.wait_for_file(workdir / 'checkpoints' / 'checkpoint_20',
                        proc=launch.proc)
  os.kill(launch.pids()[victim], 9)
  # --heartbeat_timeout=5: the survivor must be gone well before this limit
  launch.wait(timeout=120)
  survivor = 1 - victim
  statuses = launch.statuses()
  assert statuses[victim] == 137
  assert statuses[survivor] not in (0, harness.PREEMPTED), launch.describe()
  log = launch.log(survivor)
  assert re.search(r'JAX distributed service detected fatal errors|'
                   r'Barrier .* failed|Gloo .* failed', log), (
                       harness.tail(log))


@pytest.mark.skipif(not harness.have('mpirun'),
                    reason='Open MPI not installed (apt-get install'
                    ' openmpi-bin); .ci/run installs it')
def test_mpirun_pmap_with_auto_detection(cache, tmp_path, single_run):
  workdir = tmp_path / 'run'
  log = tmp_path / 'mpirun.log'
  with open(log, 'w', encoding='utf-8') as out:
    result = subprocess.run(
        [os.path.join(harness.LAUNCH, 'mpirun.sh'), '-n', '2', '-d', '2',
         '-l', '-p', str(harness.free_port()), '--',
         *harness.train_command(workdir, *FAST_FAILURE,
                                "--gin.train.parallelism='pmap'")],
        env=harness.env(cache), stdout=out, stderr=subprocess.STDOUT,
        timeout=300, cwd=harness.REPO)
  text = log.read_text()
  assert result.returncode == 0, harness.tail(text)
  # no coordinator flag: both ranks found by JAX's Open MPI detection
  assert text.count('jax.distributed.initialize via ompi') == 2, text
  assert 'parallelism pmap on 4 device(s)' in text
  _assert_one_file_per_save(workdir, SAVES)
  _assert_close(workdir, single_run)


def _wait_job(slurm, job, done, timeout=240):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    state = slurm.job_field(job, 'JobState')
    if done(state):
      return state
    time.sleep(0.1)
  raise AssertionError(f'job {job} still {state} after {timeout} s')


def _release_requeued(slurm, job, timeout=120):
  """Waits for the job's requeue, then lets it start 3 s later.

  SLURM holds a requeued job for its credential lifetime (``cred_expire``,
  120 s by default) because slurmd refuses, as revoked, a new credential of
  the same job created within the second of the old one's revocation.
  """
  deadline = time.monotonic() + timeout
  seen = []
  released = False
  while time.monotonic() < deadline:
    state = slurm.job_field(job, 'JobState')
    restarts = slurm.job_field(job, 'Restarts')
    note = (state, restarts)
    if restarts == '1':
      if state in ('RUNNING', 'COMPLETED'):
        return
      if state == 'PENDING' and not released:
        result = slurm.run('scontrol', 'update', f'JobId={job}',
                           'StartTime=now+3')
        released = result.returncode == 0
        note += (result.returncode, result.stderr.strip())
      if state not in ('PENDING', 'REQUEUED', 'COMPLETING'):
        break
    if not seen or seen[-1] != note:
      seen.append(note)
    time.sleep(0.1)
  raise AssertionError(f'job {job} did not restart after its requeue: {seen}')


@pytest.mark.skipif(
    not harness.have('slurmctld', 'slurmd', 'sbatch', 'srun', 'munged'),
    reason='SLURM/munge not installed (apt-get install slurmctld slurmd'
    ' slurm-client munge); .ci/run installs them')
@pytest.mark.skipif(os.geteuid() != 0,
                    reason='starting slurmd/munged needs root')
def test_slurm_sbatch_auto_detection_preemption_and_requeue(
    cache, tmp_path, local_run):
  workdir = tmp_path / 'run'
  output = tmp_path / 'job.out'
  port = harness.free_port()
  with harness.SlurmCluster() as slurm:
    environ = slurm.job_env(cache, port)
    submit = subprocess.run(
        ['sbatch', '--parsable', '--ntasks=2', '--ntasks-per-node=2',
         f'--chdir={harness.REPO}', f'--output={output}',
         os.path.join(harness.LAUNCH, 'slurm.sbatch'),
         *harness.train_command(workdir, *FAST_FAILURE)[3:]],
        env=environ, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(';')[0]
    try:
      deadline = time.monotonic() + 240
      ckpt = workdir / 'checkpoints' / 'checkpoint_20'
      while not ckpt.exists():
        state = slurm.job_field(job, 'JobState')
        assert state in ('PENDING', 'RUNNING', 'CONFIGURING'), (
            state, output.read_text() if output.exists() else '')
        assert time.monotonic() < deadline, 'no checkpoint_20'
        time.sleep(0.01)
      # what --signal=B:USR1@120 does before the time limit
      sent = slurm.run('scancel', '--signal=USR1', '--batch', job)
      assert sent.returncode == 0, sent.stderr
      _release_requeued(slurm, job)
      final = _wait_job(slurm, job, lambda s: s in (
          'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL'))
    finally:
      slurm.run('scancel', job)
    text = output.read_text()
    assert final == 'COMPLETED', text[-5000:]
    assert slurm.job_field(job, 'ExitCode') == '0:0'
  # 2 tasks x 2 launches, each found by JAX's SLURM detection
  assert text.count('jax.distributed.initialize via slurm') == 4, text
  assert 'SIGUSR1 (time limit near): forwarding as SIGUSR1' in text
  assert 'requeueing job' in text
  assert 'restart 1' in text
  stop = int(re.search(r'Preemption agreed before step (\d+)',
                       text).group(1))
  assert f'checkpoint_{stop} (step {stop})' in text
  _assert_one_file_per_save(workdir, sorted(set(SAVES) | {stop}))
  _assert_identical(workdir, local_run[0])
