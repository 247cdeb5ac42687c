"""The workdir lease of object-store workdirs (issue 18, item 4), against a
real S3 API server (moto, tests/s3_server.py): taken with a conditional
write, renewed by a heartbeat, a live holder refuses a second run with one
line, a dead one (SIGKILL) is waited for at most the lease's expiry (at once
on its own host), ``--force_unlock`` takes it at once and the old holder
exits; two runners on one ``s3://`` workdir: the second refused with one
line, nothing of the first changed.
"""

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from s3_server import s3  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

from gintrain.lib import storage  # pylint: disable=wrong-import-position
from gintrain.runner.errors import RunnerError  # pylint: disable=wrong-import-position
from gintrain.runner.outputs import lock  # pylint: disable=wrong-import-position

BUCKET = 'leases'
LEASE_S = 4  # renewed every second


@pytest.fixture(scope='module')
def bucket(s3):  # pylint: disable=redefined-outer-name
  s3.create_bucket(BUCKET)
  return f's3://{BUCKET}'


def _holder(url, lease_s=LEASE_S, hostname=None, hold_s=600):
  """A process holding the lease of ``url`` (prints ``held`` once taken);
  with ``hostname``, in its own UTS namespace under that host name."""
  code = textwrap.dedent(f'''
      import time
      from gintrain.runner.outputs import lock
      with lock.WorkdirLock({url!r}, lease_s={lease_s}, force=False):
        print('held', flush=True)
        time.sleep({hold_s})
  ''')
  command = [sys.executable, '-c', code]
  if hostname:
    command = ['unshare', '--uts', 'sh', '-c',
               f'hostname {hostname} && exec "$@"', 'sh', *command]
  proc = subprocess.Popen(command, env=harness.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if line.strip() != 'held':
    proc.kill()
    _, err = proc.communicate(timeout=30)
    raise AssertionError(f'the holder did not take the lease: {err[-2000:]}')
  return proc


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait(30)


def test_a_live_holder_refuses_a_second_run_with_one_line(bucket):
  url = f'{bucket}/live'
  first = lock.WorkdirLock(url, lease_s=LEASE_S, force=False).acquire()
  try:
    assert storage.exists(f'{url}/{lock.LOCK_FILE}')
    begun = time.monotonic()
    with pytest.raises(RunnerError) as caught:
      lock.WorkdirLock(url, lease_s=LEASE_S, force=False).acquire()
    took = time.monotonic() - begun
    message = str(caught.value)
    assert '\n' not in message
    assert message.startswith(f'--workdir={url} is in use by another run'
                              f' (pid {os.getpid()} on ')
    assert 'was renewed' in message and '--force_unlock' in message
    assert took < LEASE_S  # one renewal seen, not the whole expiry
  finally:
    first.release()
  assert not storage.exists(f'{url}/{lock.LOCK_FILE}')  # released: removed
  with lock.WorkdirLock(url, lease_s=LEASE_S, force=False):
    pass  # free again


def test_relaunch_after_sigkill_on_another_host_waits_at_most_the_expiry(
    bucket):
  if not harness.have('unshare'):
    pytest.skip('needs unshare (a second host name)')
  url = f'{bucket}/other_host'
  try:
    holder = _holder(url, hostname='otherhost')
  except AssertionError as e:
    if 'unshare' in str(e) or 'hostname' in str(e):
      pytest.skip(f'cannot set a host name here: {e}')
    raise
  _kill(holder)
  killed = time.monotonic()
  relaunch = lock.WorkdirLock(url, lease_s=LEASE_S, force=False).acquire()
  waited = time.monotonic() - killed
  relaunch.release()
  skew = min(5.0, LEASE_S / 4)
  assert waited <= LEASE_S + skew + 1.5, waited
  assert waited >= 1.0, waited  # it did wait for the expiry


def test_relaunch_after_sigkill_on_the_same_host_does_not_wait(bucket):
  url = f'{bucket}/same_host'
  holder = _holder(url, lease_s=60)
  _kill(holder)
  begun = time.monotonic()
  with lock.WorkdirLock(url, lease_s=60, force=False):
    took = time.monotonic() - begun
  assert took < 5, took  # not the 60 s lease


def test_force_unlock_takes_a_live_lease_and_the_old_holder_exits(bucket):
  url = f'{bucket}/forced'
  holder = _holder(url)
  try:
    begun = time.monotonic()
    forced = lock.WorkdirLock(url, lease_s=LEASE_S, force=True).acquire()
    assert time.monotonic() - begun < 3
    status = holder.wait(LEASE_S * 3)
    err = holder.stderr.read()
    assert status == lock.LOST_EXIT_CODE, err
    errors = [l for l in err.splitlines() if l.startswith('gintrain:')]
    assert len(errors) == 1 and 'was taken over by pid' in errors[0], err
    forced.release()
  finally:
    if holder.poll() is None:
      _kill(holder)


# -- two runners on one s3:// workdir ------------------------------------------


def _md5s(url) -> dict:
  fs, path = storage.filesystem(url)
  out = {}
  for name in fs.find(path):
    if name.endswith(lock.LOCK_FILE):
      continue  # the first run's heartbeat renews it
    out[name] = hashlib.md5(fs.cat_file(name)).hexdigest()
  return out


def _runner(url, lr, *args):
  return harness.train_command(
      url, f'--gin.optimizer.learning_rate={lr}',
      '--gin.train.parallelism="single"', f'--workdir_lease_s={LEASE_S}',
      *args)


DESCRIBE = ('config.parsed.gin', 'config.operative.gin', 'flags.txt',
            'hparams.json', 'settings.json')


def test_two_runners_on_one_s3_workdir_second_refused_first_unchanged(
    bucket, tmp_path):
  url = f'{bucket}/two_runners'
  environ = harness.env(tmp_path / 'jax_cache')
  first = subprocess.Popen(
      _runner(url, 0.001, '--gin.train.num_steps=400',
              '--gin.slow_synthetic.delay=0.02'),
      env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, cwd=tmp_path)
  try:
    deadline = time.monotonic() + 180
    while not storage.exists(f'{url}/config.operative.gin'):
      assert first.poll() is None, first.stdout.read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.1)
    before = {k: v for k, v in _md5s(url).items()
              if k.rsplit('/', 1)[-1] in DESCRIBE}
    assert len(before) >= 4, before
    second = subprocess.run(_runner(url, 0.002), env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert first.poll() is None, 'the first run ended before the second'
    after = {k: v for k, v in _md5s(url).items()
             if k.rsplit('/', 1)[-1] in DESCRIBE}
    assert after == before
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines()
              if l.startswith('gintrain: error:')]
    assert len(errors) == 1, second.stderr[-3000:]
    assert re.match(rf'gintrain: error: --workdir={url} is in use by another'
                    r' run \(pid \d+ on ', errors[0]), errors
    assert 'Traceback' not in second.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
      first.wait(30)
  flags_txt = storage.read_text(f'{url}/flags.txt')
  parsed = storage.read_text(f'{url}/config.parsed.gin')
  assert '0.002' not in flags_txt + parsed
  assert 'learning_rate = 0.001' in parsed, parsed
  assert not storage.exists(f'{url}/{lock.LOCK_FILE}')


# -- item 5: a stalled upload is reported every --progress_report_s ----------


def test_a_frozen_store_is_reported_while_the_run_waits(tmp_path):
  from s3_server import S3Server  # pylint: disable=g-import-not-at-top
  server = S3Server(str(tmp_path / 'moto.log'))
  try:
    server.create_bucket('frozen')
    url = 's3://frozen/run'
    log_path = tmp_path / 'run.log'
    environ = harness.env(tmp_path / 'jax_cache', **server.env())
    with open(log_path, 'w', encoding='utf-8') as log:
      run = subprocess.Popen(
          harness.train_command(
              url, '--gin.train.parallelism="single"',
              '--gin.train.num_steps=400', '--gin.slow_synthetic.delay=0.01',
              '--progress_report_s=2', '--step_timeout=0'),
          env=environ, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
      deadline = time.monotonic() + 180
      while 'Workdir lease' not in log_path.read_text():
        assert run.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
      os.kill(server.proc.pid, signal.SIGSTOP)  # the endpoint freezes
      frozen = time.monotonic()
      start = len(log_path.read_text())
      pattern = re.compile(r'no step completed for (\d+) s[^\n]*: the main'
                           r' thread is in ([^\n]*)')
      while len(pattern.findall(log_path.read_text()[start:])) < 3:
        assert run.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() - frozen < 60, log_path.read_text()[-3000:]
        time.sleep(0.2)
      os.kill(server.proc.pid, signal.SIGCONT)
      assert run.wait(240) == 0, log_path.read_text()[-3000:]
    finally:
      if run.poll() is None:
        run.kill()
        run.wait(30)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()
  text = log_path.read_text()
  reports = pattern.findall(text[start:])
  seconds = [int(s) for s, _ in reports]
  # one every 2 s, the wait growing: the run is stuck, and says where
  assert seconds[:3] == sorted(seconds[:3]) and seconds[2] >= 4, reports
  stuck = reports[2][1]
  assert re.search(r'(lib|runner)/\S+\.py:\d+', stuck), reports
  assert re.search(r'storage|checkpoint|writers|lock|ssl|socket|asyn|'
                   r'threading', stuck), reports


# -- item 7: the store failing under a run is one line, not a traceback -------
# (the storage side is lib/storage.py's; these show what a user sees)


def _one_line_failure(result):
  err = result.stderr
  errors = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  assert result.returncode == 1, err[-3000:]
  assert len(errors) == 1 and 'Traceback' not in err, err[-3000:]
  return errors[0]


def test_an_endpoint_that_is_down_at_start_is_one_line(tmp_path):
  port = harness.free_port((24590, 24600))  # nothing listens there
  environ = harness.env(tmp_path / 'jax_cache',
                        AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}',
                        AWS_ACCESS_KEY_ID='testing',
                        AWS_SECRET_ACCESS_KEY='testing',
                        AWS_DEFAULT_REGION='us-east-1',
                        AWS_MAX_ATTEMPTS='1', GINTRAIN_STORE_RETRIES='0')
  result = subprocess.run(
      harness.train_command('s3://nowhere/run',
                            '--gin.train.parallelism="single"'),
      env=environ, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  line = _one_line_failure(result)
  assert line == (
      'gintrain: error: --workdir=s3://nowhere/run is not writable: cannot'
      f' reach the object store at http://127.0.0.1:{port} (connection'
      ' refused).'), line


@pytest.mark.skipif(not os.environ.get('GINTRAIN_SLOW'), reason=(
    'slow (moto itself stopped, botocore and the library retrying as by'
    ' default): GINTRAIN_SLOW=1 runs it; the fast variants are in'
    ' tests/test_object_store_failures_runner.py'))
@pytest.mark.parametrize('fault', ['endpoint_down', 'bucket_deleted'])
def test_the_store_failing_mid_run_is_one_line(tmp_path, monkeypatch, fault):
  from s3_server import S3Server, _clear_fsspec_instances  # pylint: disable=g-import-not-at-top
  server = S3Server(str(tmp_path / 'moto.log'))
  for key, value in server.env().items():  # this test's own server
    monkeypatch.setenv(key, value)
  _clear_fsspec_instances()
  try:
    server.create_bucket('midrun')
    url = 's3://midrun/run'
    environ = harness.env(tmp_path / 'jax_cache', AWS_MAX_ATTEMPTS='2',
                          **server.env())
    run = subprocess.Popen(
        harness.train_command(url, '--gin.train.parallelism="single"',
                              '--gin.train.num_steps=400',
                              '--gin.slow_synthetic.delay=0.01'),
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=tmp_path)
    try:
      fs, _ = storage.filesystem(f'{url}/x')
      deadline = time.monotonic() + 180
      while True:
        if storage.exists(f'{url}/checkpoints/checkpoint_10'):
          break
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
      if fault == 'endpoint_down':
        server.stop()
      else:
        fs.rm('midrun', recursive=True)
      out, err = run.communicate(timeout=300)
    finally:
      if run.poll() is None:
        run.kill()
        run.wait(30)
  finally:
    server.stop()
    _clear_fsspec_instances()
  line = _one_line_failure(subprocess.CompletedProcess([], run.returncode,
                                                       out, err))
  assert 's3://midrun/run/' in line, line
  assert ('cannot reach the object store' if fault == 'endpoint_down' else
          "the bucket 'midrun' does not exist") in line, line
