"""The runner with ``--workdir=s3://...`` on a real S3 server (moto_server on
127.0.0.1, the ``s3`` fixture of tests/s3_server.py).

Shown here:
* a 2-process run (launch/local.sh, 2 processes x 2 CPU devices, the
  experiment of tests/cluster/multihost.gin) writes its checkpoints,
  configs, settings, metrics JSONL, TensorBoard events and plot to the
  bucket, and nothing of the run to the local disk: the working directory
  stays empty and the temporary staging directory (``TMPDIR``) is empty at
  the end. SIGKILL of both processes mid-run on S3 and a relaunch (bitwise
  equal to the uninterrupted run, both processes restoring from the store,
  TMPDIR holding only what the SIGKILLed processes left) is
  tests/test_sharding.py::test_fsdp_on_s3_sigkill_and_relaunch_resumes_from_the_store,
  on FSDP sharded checkpoints;
* ``--workdir=gs://...`` without gcsfs and ``--workdir=foo://bar``: one
  line each, exit 1, nothing created locally.
"""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position

from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 60
# JAX coordinator ports: apart from the other tests' (24200-24399) and from
# the S3 server's (the first free port from 24500).
COORDINATOR_PORTS = (24560, 24600)
FAST_FAILURE = ('--heartbeat_timeout=5', '--barrier_timeout=60',
                '--shutdown_timeout=20', '--initialization_timeout=60')


class S3Launch:
  """launch/local.sh with 2 processes, run from an empty directory."""

  def __init__(self, workdir_url, base, name, environ):
    self.cwd = base / 'cwd'
    self.log_dir = base / 'logs' / name
    os.makedirs(self.cwd, exist_ok=True)
    os.makedirs(self.log_dir, exist_ok=True)
    self.launcher_log = self.log_dir / 'launcher.log'
    self._log = open(self.launcher_log, 'w', encoding='utf-8')
    command = harness.train_command(workdir_url, *FAST_FAILURE)
    self.proc = subprocess.Popen(
        [os.path.join(harness.LAUNCH, 'local.sh'), '-n', '2', '-p',
         str(harness.free_port(COORDINATOR_PORTS)), '-d', '2', '-l', str(self.log_dir), '--',
         *command],
        stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd,
        env=environ, start_new_session=True)

  def log(self, i):
    with open(self.log_dir / f'process_{i}.log', encoding='utf-8',
              errors='replace') as f:
      return f.read()

  def describe(self):
    parts = [self.launcher_log.read_text()]
    for i in range(2):
      with contextlib.suppress(OSError):
        parts.append(f'--- process {i}\n{harness.tail(self.log(i))}')
    return '\n'.join(parts)

  def wait(self, timeout=300):
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError('launch timed out\n' + self.describe()) from None
    finally:
      self._log.close()

  def kill(self):
    with contextlib.suppress(ProcessLookupError):
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait(30)


def test_two_processes_write_the_whole_run_to_s3(s3, tmp_path):  # pylint: disable=redefined-outer-name
  s3.create_bucket('runs')
  staging = tmp_path / 'staging'
  staging.mkdir()
  environ = harness.env(tmp_path / 'jax_cache', TMPDIR=staging)
  base = tmp_path / 'job'

  straight = 's3://runs/straight'
  launch = S3Launch(straight, base, 'straight', environ)
  assert launch.wait() == 0, launch.describe()
  entries = storage.list_entries(straight)
  for name in ('config.parsed.gin', 'config.operative.gin', 'flags.txt',
               'settings.json', 'metrics.jsonl', 'hparams.json',
               'metrics.png', 'checkpoints', 'tensorboard'):
    assert name in entries, (name, entries)
  assert any(n.startswith('events.out.tfevents.') for n in
             storage.list_entries(f'{straight}/tensorboard'))
  assert checkpoints.available_steps(f'{straight}/checkpoints') == [
      10, 20, 30, 40, 50, 60]
  records = [json.loads(line) for line in storage.read_bytes(
      f'{straight}/metrics.jsonl').decode().splitlines()]
  assert [r['step'] for r in records if r['split'] == 'train'] == [
      10, 20, 30, 40, 50, 60]
  settings = json.loads(storage.read_bytes(f'{straight}/settings.json'))
  assert settings['devices']['process_count'] == 2
  assert 'Workdir lease s3://runs/straight/.gintrain.lock taken' in launch.log(0)

  # nothing of the run on local disk: the working directory is empty, no
  # 's3:' folder appeared anywhere, and the finished run removed its
  # staging directories from TMPDIR
  assert os.listdir(base / 'cwd') == []
  assert os.listdir(staging) == []
  assert not any('s3:' in d for d, _, _ in os.walk(tmp_path))


@pytest.mark.parametrize('bad,line', [
    ('gs://bar/run', "--workdir=gs://bar/run: gs:// needs a package that is"
     " not installed; run: pip install 'gintrain[gcs]'"),
    ('foo://bar', '--workdir=foo://bar: unknown storage scheme "foo://"'),
])
def test_cli_bad_workdir_urls(tmp_path, bad, line):
  if bad.startswith('gs') and importlib.util.find_spec('gcsfs'):
    pytest.skip('gcsfs is installed here')
  result = subprocess.run(
      [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={bad}',
       f'--gin_file={harness.GIN_FILE}'],
      cwd=tmp_path, env=harness.env(), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 1, result.stderr
  errors = [l for l in result.stderr.splitlines() if 'error' in l.lower()]
  assert errors == [f'gintrain: error: {line} (use a local path, or a URL'
                    ' fsspec knows: s3://, gs://, memory://, ...)'
                    if bad.startswith('foo') else f'gintrain: error: {line}']
  assert os.listdir(tmp_path) == []


def test_corrupt_latest_checkpoint_on_s3_is_moved_aside(s3, tmp_path):  # pylint: disable=redefined-outer-name
  """A bit flipped in the latest S3 checkpoint (caught by its integrity
  sidecar): the resume moves it to corrupt_checkpoints/ in the bucket,
  resumes from the one before and writes the same checkpoint again."""
  s3.create_bucket('corrupt')
  url = 's3://corrupt/run'
  environ = harness.env(tmp_path / 'jax_cache', devices=1)
  command = harness.train_command(url, '--gin.slow_synthetic.delay=0',
                                  "--gin.train.parallelism='single'")

  def run():
    result = subprocess.run(command, env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, harness.tail(result.stderr)
    return result.stderr

  run()
  last = f'{url}/checkpoints/checkpoint_{STEPS}'
  good = storage.read_bytes(last)
  fs, key = storage.filesystem(last)
  flipped = bytearray(good)
  flipped[len(good) // 2] ^= 0x10
  fs.pipe_file(key, bytes(flipped))
  log = run()
  assert f'Skipping checkpoint {last}' in log and 'sidecar' in log, (
      harness.tail(log))
  assert storage.read_bytes(
      f'{url}/corrupt_checkpoints/checkpoint_{STEPS}') == bytes(flipped)
  assert storage.read_bytes(last) == good  # trained again from step 50
  assert os.listdir(tmp_path) == ['jax_cache']
