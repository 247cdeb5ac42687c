"""The runner when its object store fails mid-run (issue 18 item 7), against
a real S3 API server (moto) reached through the in-process forwarder of
tests/s3_server.py (``Outage``), which goes down the moment a chosen request
arrives:

* the endpoint going down during a checkpoint save, during the upload of the
  run's config files at the start, and the bucket deleted mid-run: each ends
  the run (exit 1) with one ``gintrain: error:`` line naming the URL and why,
  no traceback;
* nothing saved is lost: the checkpoint before the failed save is intact,
  and a relaunch once the endpoint is back resumes from it and finishes.

The subprocesses make one botocore attempt per call and no retries of the
library's own (``GINTRAIN_STORE_RETRIES=0``; the retries are shown in
tests/test_object_store_failures.py). Slow variants (moto itself stopped):
tests/test_reliability_round3_lock.py, GINTRAIN_SLOW=1.
"""

import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from s3_server import Outage, s3  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

from gintrain.lib import checkpoints  # pylint: disable=wrong-import-position
from gintrain.lib import storage  # pylint: disable=wrong-import-position

BUCKET = 'failing'


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture
def outage(s3):  # pylint: disable=redefined-outer-name
  if not storage.exists(f's3://{BUCKET}'):
    s3.create_bucket(BUCKET)
  proxy = Outage(s3.port)
  yield proxy
  proxy.close()


def _command(url, *args):
  return harness.train_command(url, "--gin.train.parallelism='single'",
                               '--gin.slow_synthetic.delay=0', *args)


def _env(cache, endpoint_env):  # pylint: disable=redefined-outer-name
  return harness.env(cache, devices=1, AWS_MAX_ATTEMPTS='1',
                     GINTRAIN_STORE_RETRIES='0', **endpoint_env)


def _run(command, environ, cwd):
  return subprocess.run(command, env=environ, cwd=cwd, capture_output=True,
                        text=True, timeout=300)


def _one_line(result, url):
  err = result.stderr
  lines = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  assert result.returncode == 1, harness.tail(err)
  assert len(lines) == 1 and 'Traceback' not in err, harness.tail(err)
  assert f'{url}/' in lines[0], lines
  print(lines[0])  # shown by pytest -rA
  return lines[0]


def test_endpoint_down_during_a_save_then_a_relaunch_resumes(
    outage, cache, tmp_path):  # pylint: disable=redefined-outer-name
  url = f's3://{BUCKET}/save'
  outage.cut_on(rf'PUT /{BUCKET}/save/checkpoints/\.?checkpoint_20\b')
  environ = _env(cache, outage.env())
  result = _run(_command(url), environ, tmp_path)
  assert outage.cut.is_set(), harness.tail(result.stderr)
  line = _one_line(result, url)
  # what failed first: the save, or a metrics/TensorBoard write of step 20
  assert re.match(
      rf'gintrain: error: (writing or reading a checkpoint|writing the'
      rf' metrics): {url}/\S+: cannot reach the object store at'
      rf' {outage.endpoint} \(connection refused\) \(the run stops; what is'
      ' already saved is kept: relaunch when the store is back', line), line
  # the failed background save stopped the run at the next step
  assert 'Saving checkpoint at step: 30' not in result.stderr
  # nothing saved is lost: checkpoint_10 intact, no part of checkpoint_20
  assert checkpoints.available_steps(f'{url}/checkpoints') == [10]
  assert checkpoints.restore_checkpoint(f'{url}/checkpoints/checkpoint_10',
                                        None)['state']['step'] == 10

  outage.up()  # the store is back: the relaunch resumes from step 10
  result = _run(_command(url), environ, tmp_path)
  assert result.returncode == 0, harness.tail(result.stderr)
  assert re.search(r'Resumed from \S*checkpoint_10\b', result.stderr), (
      harness.tail(result.stderr))
  assert checkpoints.available_steps(f'{url}/checkpoints') == [
      10, 20, 30, 40, 50, 60]


def test_endpoint_down_during_the_config_upload_at_start(
    outage, cache, tmp_path):  # pylint: disable=redefined-outer-name
  url = f's3://{BUCKET}/config'
  outage.cut_on(rf'PUT /{BUCKET}/config/config\.parsed\.gin')
  result = _run(_command(url), _env(cache, outage.env()), tmp_path)
  assert outage.cut.is_set(), harness.tail(result.stderr)
  line = _one_line(result, url)
  assert line.startswith(
      "gintrain: error: writing the run's config files:"
      f' {url}/config.parsed.gin: cannot reach the object store at'
      f' {outage.endpoint} (connection refused)'), line


def test_bucket_deleted_mid_run(s3, cache, tmp_path):  # pylint: disable=redefined-outer-name
  s3.create_bucket('deleted')
  url = 's3://deleted/run'
  run = subprocess.Popen(
      _command(url, '--gin.train.num_steps=2000',
               '--gin.slow_synthetic.delay=0.005'),
      env=_env(cache, s3.env()), cwd=tmp_path, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    fs, _ = storage.filesystem(url)
    deadline = time.monotonic() + 120
    while not storage.exists(f'{url}/checkpoints/checkpoint_10'):
      assert run.poll() is None and time.monotonic() < deadline
      time.sleep(0.05)
    for _ in range(50):  # objects written meanwhile: BucketNotEmpty
      try:
        fs.rm('deleted', recursive=True)
        break
      except OSError:
        time.sleep(0.05)
    out, err = run.communicate(timeout=120)
  finally:
    if run.poll() is None:
      run.kill()
      run.wait(30)
  line = _one_line(subprocess.CompletedProcess([], run.returncode, out, err),
                   url)
  assert "the bucket 'deleted' does not exist (deleted?)" in line, line
