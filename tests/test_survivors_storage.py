"""Checkpoint files and storage paths (issue 26, item 3 and its weak catches).

* A save with an integrity sidecar fsyncs the sidecar before the rename that
  commits the checkpoint (as it fsyncs the file itself): after a power loss
  the sidecar of a committed checkpoint is never empty or stale.
* ``storage.join`` on a URL with trailing ``/``s makes no ``//`` key; a save
  and restore (and the runner's settings and metrics) through
  ``s3://bucket/run/`` on a real S3 server write exactly the keys of
  ``s3://bucket/run``, listed from the server itself.
* Integers of every msgpack width and sign (positive and negative fixint,
  uint/int 8-64) read back with their value and sign, by the checkpoint
  reader and by ``msgpack_restore``, and the files decode to the same
  values with the msgpack library (the format, not only flax's bytes).
"""

import os
import sys
import urllib.request
import xml.etree.ElementTree as ET

import msgpack
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position

from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import checkpoint_naming  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import serialization  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.outputs import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.outputs import writers  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


# --- the sidecar's durability -----------------------------------------------------


@pytest.fixture
def sidecars_on():
  checkpoint_io.set_integrity_sidecar(True)
  yield
  checkpoint_io.set_integrity_sidecar('auto')


def test_sidecar_is_fsynced_before_the_commit_rename(tmp_path, monkeypatch,
                                                     sidecars_on):  # pylint: disable=unused-argument
  calls = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    calls.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
    return real_fsync(fd)

  def replace(src, dst):
    calls.append(('rename', str(src), str(dst)))
    return real_replace(src, dst)

  monkeypatch.setattr(os, 'fsync', fsync)
  monkeypatch.setattr(os, 'replace', replace)
  final = str(tmp_path / 'checkpoint_1')
  side = checkpoint_naming.sidecar_path(final)
  checkpoint_io.write_checkpoint_file({'a': np.arange(3)}, final, None,
                                      overwrite=False)
  renames = [i for i, c in enumerate(calls) if c[0] == 'rename']
  assert len(renames) == 1 and calls[renames[0]][2] == final, calls
  commit = renames[0]
  tmp = calls[commit][1]
  synced_before = [c[1] for c in calls[:commit] if c[0] == 'fsync']
  assert tmp in synced_before, calls
  assert side in synced_before, calls
  assert calls[commit + 1:] == [('fsync', str(tmp_path))], calls
  assert checkpoint_io.read_checkpoint_file(final)['a'].tolist() == [0, 1, 2]
  # The same through the flax-style save (a second step, retention on).
  calls.clear()
  checkpoints.save_checkpoint(tmp_path, {'b': 1}, 2, keep=5)
  renames = [i for i, c in enumerate(calls) if c[0] == 'rename']
  assert renames and calls[renames[-1]][2] == str(tmp_path / 'checkpoint_2')
  assert checkpoint_naming.sidecar_path(str(tmp_path / 'checkpoint_2')) in [
      c[1] for c in calls[:renames[-1]] if c[0] == 'fsync'], calls


# --- msgpack integers -------------------------------------------------------------

# One value at each edge of each msgpack integer encoding.
INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
        2**63, 2**64 - 1, -1, -31, -32, -33, -127, -128, -129, -32767,
        -32768, -32769, -2**31 + 1, -2**31, -2**31 - 1, -2**63 + 1, -2**63]


def _int_tree():
  tree = {f'i{k}': v for k, v in enumerate(INTS)}
  tree['nested'] = {'deep': {'min': -2**63, 'neg': -33}, 'neg': -5}
  tree['np'] = {'i8': np.int8(-100), 'i16': np.int16(-30000),
                'i32': np.int32(-2**31), 'i64': np.int64(-2**63),
                'u64': np.uint64(2**64 - 1),
                'arr': np.array([-1, -128, 127], np.int8)}
  return tree


def _check_ints(got):
  for k, v in enumerate(INTS):
    assert got[f'i{k}'] == v and type(got[f'i{k}']) is int, (k, v,
                                                             got[f'i{k}'])
  assert got['nested']['deep'] == {'min': -2**63, 'neg': -33}
  assert got['nested']['neg'] == -5
  np_ = got['np']
  assert (np_['i8'], np_['i16'], np_['i32'], np_['i64'], np_['u64']) == (
      -100, -30000, -2**31, -2**63, 2**64 - 1)
  assert np.asarray(np_['i8']).dtype == np.int8
  assert np.asarray(np_['i64']).dtype == np.int64
  assert np_['arr'].tolist() == [-1, -128, 127]


def test_signed_integers_of_every_width_read_back(tmp_path):
  tree = _int_tree()
  checkpoints.save_checkpoint(tmp_path, tree, 1)
  path = str(tmp_path / 'checkpoint_1')
  _check_ints(checkpoint_io.read_checkpoint_file(path))
  _check_ints(checkpoints.restore_checkpoint(tmp_path, None))
  _check_ints(serialization.msgpack_restore(
      serialization.msgpack_serialize(tree)))
  # The file is plain msgpack: the library reads the same integers.
  with open(path, 'rb') as f:
    raw = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
  assert [raw[f'i{k}'] for k in range(len(INTS))] == INTS
  assert raw['nested'] == {'deep': {'min': -2**63, 'neg': -33}, 'neg': -5}


# --- URLs with trailing slashes -------------------------------------------------


@pytest.mark.parametrize('base', ['s3://b/run/', 's3://b/run//', 's3://b/run'])
def test_join_makes_no_double_slash(base):
  assert storage.join(base, 'checkpoint_1') == 's3://b/run/checkpoint_1'
  assert storage.join(base, 'a', 'b') == 's3://b/run/a/b'
  assert storage.join(base, 'checkpoints/') == 's3://b/run/checkpoints'


def test_join_local_paths(tmp_path):
  assert storage.join(f'{tmp_path}/', 'x') == f'{tmp_path}/x'
  assert storage.join(str(tmp_path), 'a', 'b') == f'{tmp_path}/a/b'


def _server_keys(server, bucket):
  """Every object key in ``bucket``, from the S3 server's own listing."""
  with urllib.request.urlopen(f'{server.endpoint}/{bucket}?list-type=2',
                              timeout=30) as r:
    root = ET.fromstring(r.read())
  return sorted(e.text for e in root.iter() if e.tag.endswith('}Key'))


def test_save_and_restore_through_a_trailing_slash_url(s3):  # pylint: disable=redefined-outer-name
  s3.create_bucket('gt-slash')
  url = 's3://gt-slash/run/'
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'n': 7}
  checkpoints.save_checkpoint(url, tree, 1, keep=2)
  checkpoints.save_checkpoint(url, {**tree, 'n': 8}, 2, keep=2)
  # The runner's outputs under a workdir given with a trailing '/'.
  cfg = settings.build({'train.batch_size': 32}, {'workdir': url},
                       versions={'jax': 'x'}, devices={'count': 1})
  settings.save(url, cfg)
  with writers.JsonlWriter(url) as w:
    w.write_scalars(1, {'loss': 0.5})
  keys = _server_keys(s3, 'gt-slash')
  assert not any('//' in k for k in keys), keys
  names = sorted(k for k in keys
                 if not checkpoint_naming.is_sidecar_name(k.split('/')[-1]))
  assert names == ['run/checkpoint_1', 'run/checkpoint_2',
                   'run/metrics.jsonl', 'run/settings.json'], keys
  assert settings.load(url)['gin.train.batch_size'] == 32
  assert checkpoints.latest_checkpoint(url) == 's3://gt-slash/run/checkpoint_2'
  restored = checkpoints.restore_checkpoint(url, None)
  assert restored['n'] == 8
  np.testing.assert_array_equal(restored['w'], tree['w'])
  assert checkpoints.restore_checkpoint(url, None, step=1)['n'] == 7
