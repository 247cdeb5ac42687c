"""A real S3 API server for the tests: ``moto_server`` on 127.0.0.1.

The server is a separate process (moto in server mode; nothing is mocked in
the test process): the code under test talks HTTP to it through s3fs /
botocore, with the endpoint and credentials taken from the usual variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which the fixture sets
for the test process and which subprocesses inherit.

Ports: 24500-24559 (the first free one of this xdist worker's share).

:class:`Outage` is a TCP forwarder in the test process in front of the
server: clients given its endpoint reach moto through it, and the test can
take the endpoint down (the port closed, every connection cut: clients get
"connection refused") and bring it back on the same port in milliseconds,
while moto keeps its data (stopping moto itself loses every bucket). It can
also go down by itself the moment a request it names arrives (e.g. the PUT
of ``checkpoint_20``): the store fails in the middle of that operation.

Use from a test module::

    sys.path.insert(0, os.path.dirname(__file__))
    from s3_server import s3  # the fixture
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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
  """``moto_server`` on a free port of :data:`PORT_RANGE`, until :meth:`stop`
  (``environ``: extra variables of the server, e.g. moto's own settings)."""

  def __init__(self, log_path: str, environ: dict | None = None):
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
        start_new_session=True, env={**os.environ, **(environ or {})})
    deadline = time.monotonic() + 60
    while True:
      try:
        with urllib.request.urlopen(self.endpoint, timeout=2):
          break
      except urllib.error.HTTPError:
        break  # it answers (an error, with moto's authentication on)
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


class Outage:
  """A forwarder from a free port of :data:`PORT_RANGE` to ``target_port``
  (the S3 server), up until :meth:`down`; see the module docstring.

  Attributes:
    endpoint: the URL clients use (``http://127.0.0.1:<port>``).
    cut: set once :meth:`cut_on`'s request arrived and the endpoint went
      down.
  """

  def __init__(self, target_port: int):
    self.target = target_port
    for port in range(*PORT_RANGE):
      if port != target_port and harness.port_free(port):
        break
    else:
      raise RuntimeError('no free port for the S3 forwarder')
    self.port = port
    self.endpoint = f'http://127.0.0.1:{port}'
    self.cut = threading.Event()
    self._lock = threading.Lock()
    self._sockets = set()
    self._listener = None
    self._pattern = None
    self._refused = None
    self._threads = []
    self._timers = []
    self._closed = False
    self.up()

  def env(self) -> dict:
    return {'AWS_ENDPOINT_URL': self.endpoint,
            'AWS_ACCESS_KEY_ID': 'testing',
            'AWS_SECRET_ACCESS_KEY': 'testing',
            'AWS_DEFAULT_REGION': 'us-east-1'}

  def up(self) -> None:
    """Listens (again) on the same port."""
    with self._lock:
      if self._listener is not None or self._closed:
        return
      listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      listener.bind(('127.0.0.1', self.port))
      listener.listen(128)
      listener.settimeout(0.05)
      self._listener = listener
    thread = threading.Thread(target=self._accept, args=(listener,),
                              daemon=True, name='s3-outage-accept')
    thread.start()
    self._threads.append(thread)

  def down(self) -> None:
    """Closes the port and cuts every connection (refused from now on)."""
    with self._lock:
      listener, self._listener = self._listener, None
      sockets, self._sockets = self._sockets, set()
    if listener is not None:
      listener.close()
    for sock in sockets:
      with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
      sock.close()

  def down_for(self, seconds: float) -> threading.Timer:
    """:meth:`down` now and :meth:`up` after ``seconds`` (a blip)."""
    self.down()
    timer = threading.Timer(seconds, self.up)
    timer.daemon = True
    timer.start()
    self._timers.append(timer)
    return timer

  def cut_on(self, pattern: str) -> None:
    """Goes :meth:`down` when a request whose bytes match the regular
    expression ``pattern`` arrives (that request is not forwarded)."""
    self._pattern = re.compile(pattern.encode())

  def refuse(self, pattern: str | None) -> None:
    """Drops every request matching ``pattern`` (its connection is cut,
    nothing forwarded) while the rest pass: a store failing for some
    objects only, or flapping between two calls. None: stop dropping."""
    self._refused = None if pattern is None else re.compile(pattern.encode())

  def close(self) -> None:
    """Down for good (a pending :meth:`down_for` does not bring it up)."""
    self._closed = True
    self._pattern = None
    for timer in self._timers:
      timer.cancel()
    self.down()

  def _accept(self, listener) -> None:
    while True:
      try:
        client, _ = listener.accept()
      except socket.timeout:
        if self._listener is not listener:
          return
        continue
      except OSError:
        return
      try:
        server = socket.create_connection(('127.0.0.1', self.target), 10)
      except OSError:
        client.close()
        continue
      with self._lock:
        if self._listener is not listener:  # went down meanwhile
          client.close()
          server.close()
          continue
        self._sockets.update((client, server))
      for src, dst, check in ((client, server, True),
                              (server, client, False)):
        threading.Thread(target=self._pump, args=(src, dst, check),
                         daemon=True, name='s3-outage-pump').start()

  def _pump(self, src, dst, check) -> None:
    tail = b''
    try:
      while True:
        data = src.recv(1 << 16)
        if not data:
          break
        pattern, refused = self._pattern, self._refused
        if check and pattern is not None and pattern.search(tail + data):
          self._pattern = None
          self.cut.set()
          self.down()
          return
        if check and refused is not None and refused.search(tail + data):
          return  # this connection only (closed below)
        tail = data[-256:]
        dst.sendall(data)
    except OSError:
      pass
    finally:
      for sock in (src, dst):  # the other pump ends too
        with contextlib.suppress(OSError):
          sock.shutdown(socket.SHUT_RDWR)
      with self._lock:  # each socket is one pump's source: closed once
        self._sockets.discard(src)
      src.close()


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
