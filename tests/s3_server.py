"""A real S3 API server for the tests: ``moto_server`` on 127.0.0.1.

The server is a separate process (moto in server mode; nothing is mocked in
the test process): the code under test talks HTTP to it through s3fs /
botocore, with the endpoint and credentials taken from the usual variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which the fixture sets
for the test process and which subprocesses inherit.

Ports: 24500-24559 (the first free one of this xdist worker's share).

Use from a test module::

    sys.path.insert(0, os.path.dirname(__file__))
    from s3_server import s3  # the fixture
"""

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

PORT_RANGE = harness.worker_ports(24500, 24560)


def _moto_command(port: int) -> list:
  exe = shutil.which('moto_server')
  if exe:
    return [exe, '-H', '127.0.0.1', '-p', str(port)]
  return [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p',
          str(port)]


class S3Server:
  """``moto_server`` on a free port of :data:`PORT_RANGE`, until :meth:`stop`."""

  def __init__(self, log_path: str):
    try:
      import moto.server  # pylint: disable=g-import-not-at-top,unused-import
      import s3fs  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      pytest.skip(f'the S3 tests need s3fs and moto[s3] ({e}); pip install'
                  " 'gintrain[test]'")
    self.log = open(log_path, 'w', encoding='utf-8')
    for port in range(*PORT_RANGE):
      if harness.port_free(port):
        break
    else:
      raise RuntimeError(f'no free port in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1}')
    self.port = port
    self.endpoint = f'http://127.0.0.1:{port}'
    self.proc = subprocess.Popen(
        _moto_command(port), stdout=self.log, stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
      try:
        with urllib.request.urlopen(self.endpoint, timeout=2):
          break
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          with open(log_path, encoding='utf-8') as f:
            raise RuntimeError(f'moto_server did not start:\n{f.read()}')
        time.sleep(0.1)

  def env(self) -> dict:
    """The variables a client (or a subprocess) needs to use the server."""
    return {'AWS_ENDPOINT_URL': self.endpoint,
            'AWS_ACCESS_KEY_ID': 'testing',
            'AWS_SECRET_ACCESS_KEY': 'testing',
            'AWS_DEFAULT_REGION': 'us-east-1'}

  def create_bucket(self, name: str) -> None:
    req = urllib.request.Request(f'{self.endpoint}/{name}', method='PUT')
    with urllib.request.urlopen(req, timeout=30):
      pass

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(10)
    self.log.close()


def _clear_fsspec_instances() -> None:
  with contextlib.suppress(ImportError):
    import s3fs  # pylint: disable=g-import-not-at-top
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope='module')
def s3(tmp_path_factory):
  """A running S3 server; its variables are set in ``os.environ`` while
  the module's tests run. Yields the :class:`S3Server`."""
  server = S3Server(str(tmp_path_factory.mktemp('moto') / 'moto.log'))
  saved = {k: os.environ.get(k) for k in server.env()}
  saved['AWS_ENDPOINT_URL_S3'] = os.environ.pop('AWS_ENDPOINT_URL_S3', None)
  os.environ.update(server.env())
  _clear_fsspec_instances()
  try:
    yield server
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    _clear_fsspec_instances()
    server.stop()
