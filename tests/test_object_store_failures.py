"""An object store failing under the library (lib/storage.py), against a
real S3 API server (moto, tests/s3_server.py) reached through an in-process
forwarder that the tests take down and bring back (``Outage``):

* an unreachable endpoint, a deleted bucket and refused credentials raise a
  ``storage.StoreError`` (an ``OSError``: ``ConnectionError``,
  ``FileNotFoundError``, ``PermissionError``) naming the URL and why, from
  every kind of call (small writes, streamed uploads, reads, listings);
* a blip shorter than the retries is ridden out (``GINTRAIN_STORE_RETRIES``),
  a longer outage fails after them, and later calls to a store that failed
  are not retried again until one succeeds;
* a missing bucket reads as "nothing there" (listings, exists) and fails
  writes;
* a resume whose newest checkpoint cannot be read because the store fails
  stops with the store's error: that checkpoint is not taken for corrupt
  and moved aside (the endpoint working again for the move).

The runner's side (one ``gintrain: error:`` line, nothing saved lost, the
relaunch resuming) is in tests/test_object_store_failures_runner.py.
"""

import logging
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3_server import Outage, S3Server, s3  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

from gintrain.lib import storage  # pylint: disable=wrong-import-position


@pytest.fixture
def outage(s3, monkeypatch):  # pylint: disable=redefined-outer-name
  """The forwarder; the test process's clients use it (one botocore
  attempt per call: the retries under test are the library's own)."""
  proxy = Outage(s3.port)
  for key, value in proxy.env().items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
  storage._FAILED_STORES.clear()  # pylint: disable=protected-access
  _clear_instances()
  yield proxy
  proxy.close()
  _clear_instances()


def _clear_instances():
  import s3fs  # pylint: disable=g-import-not-at-top
  s3fs.S3FileSystem.clear_instance_cache()


def test_an_unreachable_endpoint_is_a_store_error_naming_the_url(
    s3, outage, monkeypatch):  # pylint: disable=redefined-outer-name
  s3.create_bucket('down')
  monkeypatch.setenv(storage.RETRIES_ENV, '0')
  storage.write_text('s3://down/run/a.txt', 'a')
  outage.down()
  calls = {
      'write_text': lambda u: storage.write_text(u, 'b'),
      'read_bytes': storage.read_bytes,
      'listdir': storage.listdir,
      'exists': storage.exists,
      'upload': lambda u: _upload(u, b'x' * 100),
  }
  for name, call in calls.items():
    url = f's3://down/run/{name}'
    with pytest.raises(storage.StoreUnreachableError) as caught:
      call(url)
    error = caught.value
    assert isinstance(error, ConnectionError) and isinstance(error, OSError)
    assert error.url == url, (name, error.url)
    message = str(error)
    assert '\n' not in message
    assert message.startswith(
        f'{url}: cannot reach the object store at {outage.endpoint}'
        ' (connection refused)'), (name, message)
    assert 'relaunch when the store is back' in message
  outage.up()
  assert storage.read_text('s3://down/run/a.txt') == 'a'  # kept


def _upload(url, data):
  with storage.Upload(url, block_bytes=5 << 20) as up:
    up.write(data)


def test_a_blip_is_retried_a_longer_outage_fails_after_the_retries(
    s3, outage, monkeypatch, caplog):  # pylint: disable=redefined-outer-name
  s3.create_bucket('blip')
  url = 's3://blip/run/file'
  monkeypatch.setenv(storage.RETRIES_ENV, '3')  # waits 1, 2, 4 s
  caplog.set_level(logging.WARNING, logger=storage.__name__)
  # longer than s3fs's own retries of a dropped connection (~2 s)
  outage.down_for(2.5)
  begun = time.monotonic()
  storage.write_text(url, 'after the blip')
  took = time.monotonic() - begun
  assert storage.read_text(url) == 'after the blip'
  retries = [r.getMessage() for r in caplog.records if 'retry' in
             r.getMessage()]
  assert 1 <= len(retries) <= 2, retries  # tried at 0 s, 1 s, 3 s
  assert retries[0] == (
      f'{url}: cannot reach the object store at {outage.endpoint}'
      ' (connection refused); retry 1 of 3 in 1 s (GINTRAIN_STORE_RETRIES).'
  ), retries
  assert 2.4 < took < 10, took

  # down for good: the retries are used up, then it fails ...
  monkeypatch.setenv(storage.RETRIES_ENV, '1')
  outage.down()
  caplog.clear()
  begun = time.monotonic()
  with pytest.raises(storage.StoreUnreachableError):
    storage.write_text(url, 'lost')
  assert 0.9 < time.monotonic() - begun < 5
  retries = [r.getMessage() for r in caplog.records]
  assert len(retries) == 1 and 'retry 1 of 1 in 1 s' in retries[0], retries
  # ... and later calls to that store fail at once (a run's cleanup)
  begun = time.monotonic()
  with pytest.raises(storage.StoreUnreachableError):
    storage.read_bytes(url)
  assert time.monotonic() - begun < 0.9
  # back: retried again after the first success
  outage.up()
  assert storage.read_text(url) == 'after the blip'
  assert not storage._FAILED_STORES  # pylint: disable=protected-access


def test_a_deleted_bucket_reads_as_empty_and_fails_writes_naming_it(
    s3, outage):  # pylint: disable=redefined-outer-name
  s3.create_bucket('gone')
  storage.write_text('s3://gone/run/a.txt', 'a')
  fs, _ = storage.filesystem('s3://gone')
  fs.rm('gone', recursive=True)
  assert storage.listdir('s3://gone/run') == []
  assert not storage.exists('s3://gone/run/a.txt')
  for call in (lambda u: storage.write_text(u, 'b'),
               lambda u: _upload(u, b'y' * 10),
               storage.read_bytes):
    with pytest.raises(storage.StoreNotFoundError) as caught:
      call('s3://gone/run/b.txt')
    assert isinstance(caught.value, FileNotFoundError)
    assert str(caught.value) == (
        "s3://gone/run/b.txt: the bucket 'gone' does not exist (deleted?)"
        ' (create the bucket, or use another --workdir)')
  # a missing object of an existing bucket stays a plain FileNotFoundError
  s3.create_bucket('there')
  with pytest.raises(FileNotFoundError) as caught:
    storage.read_bytes('s3://there/none')
  assert not isinstance(caught.value, storage.StoreError)


def test_refused_credentials_are_a_permission_error(tmp_path, monkeypatch):
  # moto with authentication on: the tests' keys are not an IAM user's
  server = S3Server(str(tmp_path / 'moto.log'),
                    environ={'INITIAL_NO_AUTH_ACTION_COUNT': '0'})
  try:
    for key, value in server.env().items():
      monkeypatch.setenv(key, value)
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    _clear_instances()
    with pytest.raises(storage.StorePermissionError) as caught:
      storage.write_text('s3://denied/run/a.txt', 'a')
    assert isinstance(caught.value, PermissionError)
    message = str(caught.value)
    assert message.startswith('s3://denied/run/a.txt: access denied ('), (
        message)
    assert 'AWS_ACCESS_KEY_ID' in message
  finally:
    server.stop()
    _clear_instances()


def test_translation_of_other_clients_errors():
  # tensorstore's absl statuses (sharded arrays)
  error = storage.translate_error(
      's3://b/ck_gda', ValueError('UNAVAILABLE: Failed to connect to'
                                  ' 127.0.0.1:1 [source locations=...]'))
  assert isinstance(error, storage.StoreUnreachableError)
  assert str(error).startswith('s3://b/ck_gda: the object store failed'
                               ' (UNAVAILABLE: Failed to connect')
  error = storage.translate_error('gs://b/x', ValueError(
      'PERMISSION_DENIED: caller lacks storage.objects.create'))
  assert isinstance(error, storage.StorePermissionError)
  # not a store failure: left alone
  assert storage.translate_error('s3://b/x', ValueError('bad shape')) is None
  assert storage.translate_error('s3://b/x', FileNotFoundError(
      'The specified key does not exist.')) is None
  assert storage.translate_error('s3://b/x', storage.StorageError(
      's3://b/x', 'x')) is None


def test_a_bad_retry_setting_is_one_line(monkeypatch):
  monkeypatch.setenv(storage.RETRIES_ENV, 'many')
  with pytest.raises(storage.StorageError) as caught:
    storage.call('s3://b/x', _refused)
  assert str(caught.value) == (
      'GINTRAIN_STORE_RETRIES=many: must be an integer >= 0 (how many times'
      ' a failing object store is retried)')


def _refused():
  raise ConnectionRefusedError(111, 'Connection refused')


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_a_store_failing_under_the_resume_moves_no_checkpoint_aside(
    s3, outage, monkeypatch):  # pylint: disable=redefined-outer-name
  from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import checkpoints as runner_checkpoints  # pylint: disable=g-import-not-at-top
  s3.create_bucket('resume')
  monkeypatch.setenv(storage.RETRIES_ENV, '0')
  url = 's3://resume/run'
  for step in (10, 20):
    checkpoints.save_checkpoint(
        f'{url}/checkpoints', {'state': {'step': np.int64(step),
                                         'w': np.full(3, step, np.float32)}},
        step, prefix='checkpoint_', keep=5)
  # every download of checkpoint_20 is cut; the rest of the store works
  outage.refuse(r'GET /resume/run/checkpoints/checkpoint_20 ')
  policy = runner_checkpoints.CheckpointPolicy(every_steps=10)
  with pytest.raises(storage.StoreUnreachableError) as caught:
    runner_checkpoints.Checkpointer(url, policy).latest_step()
  assert caught.value.url == f'{url}/checkpoints/checkpoint_20'
  outage.refuse(None)
  assert storage.listdir(f'{url}/corrupt_checkpoints') == []
  assert runner_checkpoints.Checkpointer(url, policy).latest_step() == 20
