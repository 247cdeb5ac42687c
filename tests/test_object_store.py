"""lib.checkpoints on an object store: a real S3 API server (moto_server on
127.0.0.1, started by the ``s3`` fixture of tests/s3_server.py) reached over
HTTP by s3fs, nothing mocked in this process.

Shown here:
* the checkpoint rules of the local tests hold on ``s3://`` (retention and
  keep-every-n on the same cases as tests/test_checkpoints.py, overwrite,
  latest, explicit steps, restore into a target, async saves), and every
  file is byte-identical to a local save of the same tree (also a 100 MiB
  multipart upload of chunked arrays);
* each S3 checkpoint has an integrity sidecar that retention deletes with
  it and listing never shows; a flipped byte in the object is detected;
* ``gs://`` without gcsfs and ``foo://`` fail at once with one line, and
  nothing is created locally;
* ``storage.tensorstore_kvstore_spec`` gives a spec tensorstore writes and
  reads through on the same server.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
from test_checkpoints import RETENTION_CASES  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import checkpoint_naming  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import serialization  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

_buckets = [0]


@pytest.fixture
def url(s3):  # pylint: disable=redefined-outer-name
  """A fresh bucket's ``s3://<bucket>/run``."""
  _buckets[0] += 1
  name = f'gt-{os.getpid()}-{_buckets[0]}'
  s3.create_bucket(name)
  return f's3://{name}/run'


def names(u):
  """Checkpoint-like entries (sidecars apart), naturally sorted."""
  return checkpoint_naming.natural_sort(
      n for n in storage.list_entries(u)
      if not checkpoint_naming.is_sidecar_name(n))


def sidecars(u):
  return sorted(n for n in storage.list_entries(u)
                if checkpoint_naming.is_sidecar_name(n))


def local_names(d):
  return checkpoint_naming.natural_sort(os.listdir(d)) if os.path.isdir(
      d) else []


def read_local(path):
  with open(path, 'rb') as f:
    return f.read()


@pytest.mark.parametrize('keep,every,steps,expected', RETENTION_CASES)
def test_retention_matches_local(tmp_path, url, keep, every, steps, expected):
  for step in steps:
    checkpoints.save_checkpoint(tmp_path, {'s': step}, step, keep=keep,
                                keep_every_n_steps=every)
    checkpoints.save_checkpoint(url, {'s': step}, step, keep=keep,
                                keep_every_n_steps=every)
    assert names(url) == local_names(tmp_path), step
    # one sidecar per checkpoint, none left by deleted checkpoints
    assert sidecars(url) == sorted(f'.{n}.xxh3' for n in names(url))
  assert names(url) == [f'checkpoint_{s}' for s in expected]
  assert checkpoints.available_steps(
      url, step_type=float) == checkpoints.available_steps(
          tmp_path, step_type=float)
  for name in names(url):
    assert storage.read_bytes(f'{url}/{name}') == read_local(tmp_path / name)


def test_keep_latest_restore_and_explicit_steps(url):
  for step in range(5):
    checkpoints.save_checkpoint(url, {'s': step}, step, keep=1)
    assert names(url) == [f'checkpoint_{step}']
  for step in range(5, 9):
    checkpoints.save_checkpoint(url, {'s': step}, step, keep=2)
  assert names(url) == ['checkpoint_7', 'checkpoint_8']
  assert checkpoints.latest_checkpoint(url) == f'{url}/checkpoint_8'
  assert checkpoints.restore_checkpoint(url, {'s': 0}) == {'s': 8}
  assert checkpoints.restore_checkpoint(url, {'s': 0}, step=7) == {'s': 7}
  assert checkpoints.restore_checkpoint(f'{url}/checkpoint_7',
                                        None, prefix='zz') == {'s': 7}
  with pytest.raises(ValueError, match=f'not found: {url}/checkpoint_4'):
    checkpoints.restore_checkpoint(url, None, step=4)
  # a missing directory returns the target; other prefixes see nothing
  assert checkpoints.restore_checkpoint(url + '/nope', 'tgt') == 'tgt'
  assert checkpoints.restore_checkpoint(url, 'tgt', prefix='x_') == 'tgt'
  assert checkpoints.latest_valid_checkpoint(url) == f'{url}/checkpoint_8'


def test_overwrite_rules(url):
  checkpoints.save_checkpoint(url, {'v': 1}, 5)
  before = storage.read_bytes(f'{url}/checkpoint_5')
  with pytest.raises(errors.InvalidCheckpointError, match='step: "5"'):
    checkpoints.save_checkpoint(url, {'v': 2}, 5)
  with pytest.raises(errors.InvalidCheckpointError):
    checkpoints.save_checkpoint(url, {'v': 3}, 4)
  assert names(url) == ['checkpoint_5']
  assert storage.read_bytes(f'{url}/checkpoint_5') == before
  checkpoints.save_checkpoint(url, {'v': 4}, 5.0, keep=2)
  assert names(url) == ['checkpoint_5', 'checkpoint_5.0']
  checkpoints.save_checkpoint(url, {'v': 6}, 6, keep=5)
  checkpoints.save_checkpoint(url, {'v': 9}, 5, overwrite=True, keep=5)
  assert names(url) == ['checkpoint_5']
  assert sidecars(url) == ['.checkpoint_5.xxh3']
  assert checkpoints.restore_checkpoint(url, None) == {'v': 9}


@dataclasses.dataclass
class Holder:
  params: dict
  step: int


serialization.register_serialization_state(
    Holder, lambda h: {'params': h.params, 'step': h.step},
    lambda h, d: Holder(serialization.from_state_dict(h.params, d['params']),
                        d['step']))


def test_restore_into_target_and_byte_identical_multipart(tmp_path, url):
  rng = np.random.default_rng(0)
  # 100 MiB of arrays, 2 of them chunked: several 32 MiB upload parts
  tree = Holder(params={'big': rng.normal(size=(3000, 3000)),
                        'f32': rng.normal(size=(4096, 2048)).astype(
                            np.float32),
                        'jax': jnp.arange(1000.0),
                        'nested': {'i': np.arange(7, dtype=np.int16)},
                        'fortran': np.asfortranarray(
                            rng.normal(size=(700, 900)))},
                step=3)
  old = serialization.MAX_CHUNK_SIZE
  serialization.MAX_CHUNK_SIZE = 40 << 20
  try:
    ours = checkpoints.save_checkpoint(url, tree, 3)
    local = checkpoints.save_checkpoint(tmp_path, tree, 3)
  finally:
    serialization.MAX_CHUNK_SIZE = old
  assert ours == f'{url}/checkpoint_3'
  data = storage.read_bytes(ours)
  assert len(data) > 100 << 20
  assert data == read_local(local)
  target = Holder(params=jax_zeros_like(tree.params), step=0)
  got = checkpoints.restore_checkpoint(url, target)
  assert isinstance(got, Holder) and got.step == 3
  for key in ('big', 'f32', 'fortran'):
    np.testing.assert_array_equal(got.params[key], tree.params[key])
  np.testing.assert_array_equal(got.params['jax'], np.arange(1000.0))
  np.testing.assert_array_equal(got.params['nested']['i'], np.arange(7))


def jax_zeros_like(tree):
  return {k: (jax_zeros_like(v) if isinstance(v, dict) else
              np.zeros_like(np.asarray(v))) for k, v in tree.items()}


def test_async_saves(url):
  am = checkpoints.AsyncManager()
  arr = np.arange(1 << 20, dtype=np.float64)
  checkpoints.save_checkpoint(url, {'v': arr}, 1, async_manager=am)
  arr[:] = -1  # the snapshot was taken: the save must not see this
  checkpoints.save_checkpoint(url, {'v': 2}, 2, async_manager=am)
  checkpoints.save_checkpoint(url, {'v': 3}, 3, async_manager=am, keep=2)
  am.wait_previous_save()
  assert names(url) == ['checkpoint_2', 'checkpoint_3']
  assert checkpoints.restore_checkpoint(url, None) == {'v': 3}
  am2 = checkpoints.AsyncManager()
  checkpoints.save_checkpoint(url + '/b', {'v': arr * 0 + 5}, 1,
                              async_manager=am2)
  am2.wait_previous_save()
  got = checkpoints.restore_checkpoint(url + '/b', None)
  np.testing.assert_array_equal(got['v'], np.full(1 << 20, 5.0))


def test_save_checkpoint_multiprocess_single_process(url):
  checkpoints.save_checkpoint_multiprocess(url, {'b': 1, 'a': np.ones(2)}, 3)
  got = checkpoints.restore_checkpoint(url, None)
  assert got['b'] == 1 and got['a'].tolist() == [1.0, 1.0]


def test_sidecar_detects_a_flipped_byte_and_a_truncation(url):
  path = checkpoints.save_checkpoint(url, {'w': np.arange(1000.0)}, 1)
  data = bytearray(storage.read_bytes(path))
  fs, key = storage.filesystem(path)
  data[500] ^= 0x01  # inside the array payload: msgpack still parses it
  fs.pipe_file(key, bytes(data))
  with pytest.raises(errors.CheckpointReadError) as e:
    checkpoints.restore_checkpoint(url, None)
  assert path in str(e.value) and 'sidecar' in str(e.value)
  assert '\n' not in str(e.value)
  fs.pipe_file(key, bytes(data[:-10]))
  with pytest.raises(errors.CheckpointReadError, match='truncated'):
    checkpoints.restore_checkpoint(url, None)
  assert checkpoints.latest_valid_checkpoint(url) is None


def test_memory_urls_and_file_urls(tmp_path):
  u = f'memory://gt-{os.getpid()}/ck'
  for step in range(3):
    checkpoints.save_checkpoint(u, {'s': step}, step, keep=2)
  assert checkpoints.available_steps(u) == [1, 2]
  assert checkpoints.restore_checkpoint(u, None) == {'s': 2}
  # no temporary upload name is ever left behind
  assert sorted(storage.list_entries(u)) == [
      '.checkpoint_1.xxh3', '.checkpoint_2.xxh3', 'checkpoint_1',
      'checkpoint_2']
  checkpoints.save_checkpoint(f'file://{tmp_path}', {'s': 1}, 1)
  assert os.listdir(tmp_path) == ['checkpoint_1']  # local: flax's file set
  assert checkpoints.restore_checkpoint(f'file://{tmp_path}', None) == {
      's': 1}


_BAD_URL_SCRIPT = r'''
import os, sys, warnings
warnings.simplefilter('ignore')
from gintrain.lib import checkpoints
fn = sys.argv[1]
try:
  if fn == 'save':
    checkpoints.save_checkpoint(sys.argv[2], {'a': 1}, 1)
  elif fn == 'save_mp':
    checkpoints.save_checkpoint_multiprocess(sys.argv[2], {'a': 1}, 1)
  elif fn == 'restore':
    checkpoints.restore_checkpoint(sys.argv[2], None)
  elif fn == 'latest':
    checkpoints.latest_checkpoint(sys.argv[2])
  else:
    checkpoints.available_steps(sys.argv[2])
except Exception as e:
  print(f'{type(e).__name__}: {e}')
  sys.exit(2)
'''


@pytest.mark.parametrize('fn', ['save', 'save_mp', 'restore', 'latest',
                                'steps'])
@pytest.mark.parametrize('bad,line', [
    ('gs://bar/run', "gs://bar/run: gs:// needs a package that is not"
     " installed; run: pip install 'gintrain[gcs]'"),
    ('foo://bar', 'foo://bar: unknown storage scheme "foo://"'),
])
def test_bad_urls_fail_at_once_and_create_nothing(tmp_path, fn, bad, line):
  if bad.startswith('gs') and importlib.util.find_spec('gcsfs'):
    pytest.skip('gcsfs is installed here')
  result = subprocess.run([sys.executable, '-c', _BAD_URL_SCRIPT, fn, bad],
                          cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2, result.stderr
  out = result.stdout.strip()
  assert len(out.splitlines()) == 1 and out.startswith('StorageError: ')
  assert line in out
  assert os.listdir(tmp_path) == []  # no 'gs:' / 'foo:' folder


def test_tensorstore_kvstore_spec(url, monkeypatch):
  monkeypatch.setenv('AWS_ENDPOINT_URL_S3', os.environ['AWS_ENDPOINT_URL'])
  spec = storage.tensorstore_kvstore_spec(url + '/checkpoint_5_gda')
  bucket = url[len('s3://'):].split('/')[0]
  assert spec == {'driver': 's3', 'bucket': bucket,
                  'path': 'run/checkpoint_5_gda/',
                  'endpoint': os.environ['AWS_ENDPOINT_URL'],
                  'aws_region': 'us-east-1',
                  'aws_credentials': {'type': 'environment'}}
  assert storage.tensorstore_kvstore_spec('gs://b/x/y') == {
      'driver': 'gcs', 'bucket': 'b', 'path': 'x/y/'}
  assert storage.tensorstore_kvstore_spec('/tmp/x') == {
      'driver': 'file', 'path': '/tmp/x'}
  with pytest.raises(storage.StorageError, match='no kvstore'):
    storage.tensorstore_kvstore_spec('foo://x')
  # the spec really reaches the server: a zarr3 array written and read back
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kv = dict(spec, path=spec['path'] + 'w')
  arr = ts.open({'driver': 'zarr3', 'kvstore': kv}, create=True,
                dtype=ts.float32, shape=[4, 3]).result()
  arr.write(np.arange(12, dtype=np.float32).reshape(4, 3)).result()
  back = ts.open({'driver': 'zarr3', 'kvstore': kv}).result().read().result()
  np.testing.assert_array_equal(back, np.arange(12).reshape(4, 3))
  assert storage.exists(f'{url}/checkpoint_5_gda/w/zarr.json')


def test_nothing_is_written_locally(tmp_path, url, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    checkpoints.save_checkpoint(url, {'a': np.ones(3)}, 1)
    checkpoints.restore_checkpoint(url, None)
  assert os.listdir(tmp_path) == []


def test_integrity_sidecar_modes(tmp_path):
  try:
    checkpoint_io.set_integrity_sidecar(True)
    checkpoints.save_checkpoint(tmp_path, {'a': 1}, 1)
    assert sorted(os.listdir(tmp_path)) == ['.checkpoint_1.xxh3',
                                            'checkpoint_1']
    checkpoint_io.set_integrity_sidecar(False)
    checkpoints.save_checkpoint(tmp_path, {'a': 2}, 1, overwrite=True)
    # a save without a sidecar removes the stale one (it would not match)
    assert os.listdir(tmp_path) == ['checkpoint_1']
    assert checkpoints.restore_checkpoint(tmp_path, None) == {'a': 2}
    with pytest.raises(ValueError):
      checkpoint_io.set_integrity_sidecar('yes')
  finally:
    checkpoint_io.set_integrity_sidecar('auto')


def test_multiprocess_commit_steps_of_the_main_file(url):
  """The main-file steps save_checkpoint_multiprocess takes with ``_gda``
  arrays: an exclusive temporary upload, then a commit (a server-side copy:
  the checkpoint appears complete), which also drops a stale sidecar."""
  tmp = checkpoint_naming.new_tmp_path(url, 'checkpoint_')
  checkpoint_io.write_file({'a': np.arange(5)}, tmp, exclusive=True)
  with pytest.raises(FileExistsError):
    checkpoint_io.write_file({'a': 1}, tmp, exclusive=True)
  assert checkpoints.latest_checkpoint(url) is None  # temporaries unlisted
  checkpoints.save_checkpoint(url, {'a': 0}, 3)  # leaves a sidecar
  checkpoint_io.commit_file(tmp, f'{url}/checkpoint_3', overwrite=True)
  assert names(url) == ['checkpoint_3'] and sidecars(url) == []
  got = checkpoints.restore_checkpoint(url, None)
  np.testing.assert_array_equal(got['a'], np.arange(5))
  with pytest.raises(errors.AlreadyExistsError):
    checkpoint_io.commit_file(tmp, f'{url}/checkpoint_3', overwrite=False)


def test_storage_doctests():
  import doctest  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(storage)
  assert result.failed == 0 and result.attempted > 0


def test_runner_outputs_on_a_url(tmp_path, monkeypatch, caplog):
  """The runner's writers, settings, plot and lock with a URL workdir
  (memory://): files uploaded whole, metrics appended across writers (a
  resume) after a torn tail is repaired, staging removed, nothing local."""
  import logging  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import lock  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import plots  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import settings  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import writers  # pylint: disable=g-import-not-at-top
  staging = tmp_path / 'staging'
  staging.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(staging))
  monkeypatch.chdir(tmp_path)
  u = f'memory://outputs-{os.getpid()}/run'
  w = writers.MultiWriter([writers.JsonlWriter(u),
                           writers.TensorBoardWriter(u)])
  w.write_scalars(1, {'loss': 0.5})
  w.write_hparams({'lr': 0.1}, ['train/loss'])
  assert len(os.listdir(staging)) == 2  # the local copies being written
  w.close()
  assert os.listdir(staging) == []
  # a torn last line, as a killed upload of an older version could leave
  data = storage.read_bytes(f'{u}/metrics.jsonl') + b'{"step": 2, "spl'
  storage.write_bytes(f'{u}/metrics.jsonl', data)
  with writers.JsonlWriter(u) as w2:
    w2.write_scalars(2, {'loss': 0.25})
  lines = storage.read_bytes(f'{u}/metrics.jsonl').decode().splitlines()
  assert [json_step(l) for l in lines] == [1, 2]
  assert plots.read_metrics(f'{u}/metrics.jsonl')[('train', 'loss')] == (
      [1, 2], [0.5, 0.25])
  plots.plot_metrics(f'{u}/metrics.jsonl', f'{u}/metrics.png')
  assert storage.read_bytes(f'{u}/metrics.png')[:4] == b'\x89PNG'
  assert 'lr' in storage.read_bytes(f'{u}/hparams.json').decode()
  (event,) = storage.list_entries(f'{u}/tensorboard')
  assert event.startswith('events.out.tfevents.')
  cfg = settings.build({'train.batch_size': 32}, {'workdir': u},
                       versions={'jax': 'x'}, devices={'count': 1})
  assert settings.save(u, cfg) == f'{u}/settings.json'
  assert settings.load(u)['gin.train.batch_size'] == 32
  with caplog.at_level(logging.INFO):
    with lock.WorkdirLock(u):
      pass
  assert 'not locked' in caplog.text
  assert sorted(os.listdir(tmp_path)) == ['staging']
  assert os.listdir(staging) == []


def json_step(line):
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(line)['step']
