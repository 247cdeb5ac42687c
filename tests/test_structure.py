"""Issue 17 (structure) and issue 18 items 3 and 6: a refused resume
writes nothing, storage takes paths and URLs alike, the checkpoint stream
reader's bounds."""

import hashlib
import os

from gintrain.lib import storage
from gintrain.runner.outputs import workdir as workdir_lib

from tiny import run  # pylint: disable=g-bad-import-order


def _md5s(root):
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.md5(f.read()).hexdigest()
  return out


def test_refused_resume_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert run(workdir, '--gin.train.num_steps=4') == 0
  before = _md5s(workdir)
  assert workdir_lib.PARSED_CONFIG in before and 'flags.txt' in before
  # Refused by the settings guard, then (past it) by the checkpoint.
  for extra, why in (((), 'was checkpointed with other'),
                     (('--allow_config_change',),
                      'does not match the model and optimizer')):
    capsys.readouterr()
    assert run(workdir, '--gin.train.num_steps=8', '--gin.mlp.features=(8,)',
               *extra) == 1
    err = capsys.readouterr().err
    assert why in err, err
    # Every file (configs, flags, settings, metrics, event files, lock,
    # checkpoints) byte for byte as the first run left it; none added.
    assert _md5s(workdir) == before


def test_storage_takes_local_paths_and_urls(tmp_path):
  for root in (str(tmp_path), f'memory://gintrain-structure/{os.getpid()}'):
    d = storage.join(root, 'a', 'b')
    storage.makedirs(d)
    f = storage.join(d, 'x.txt')
    assert not storage.exists(f)
    storage.write_text(f, 'hello')
    assert storage.exists(f) and storage.isfile(f) and not storage.isdir(f)
    assert storage.read_text(f) == 'hello' and storage.size(f) == 5
    assert storage.read_bytes(f, limit=2) == b'he'
    with storage.open_read(f) as fh:
      assert fh.read() == b'hello'
    assert storage.listdir(d) == ['x.txt']
    assert storage.list_entries(storage.join(root, 'a')) == {'b': 'directory'}
    g = storage.join(root, 'moved', 'y.txt')
    storage.move(f, g)
    assert not storage.exists(f) and storage.read_text(g) == 'hello'
    with storage.staged_download(g) as local:
      with open(local, encoding='utf-8') as fh:
        assert fh.read() == 'hello'
    storage.remove(g)
    assert not storage.exists(g)
    storage.rmtree(storage.join(root, 'a'))
    storage.rmtree(storage.join(root, 'a'))  # nothing there: no error
    assert storage.listdir(storage.join(root, 'a')) == []
  # The local fast path leaves no temporary behind.
  assert sorted(os.listdir(tmp_path)) == ['moved']


# --- issue 18 item 6: the CLI readers on hostile files ----------------------

import signal  # pylint: disable=g-import-not-at-top,wrong-import-position
import struct  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import serialization  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.cli import ckpt  # pylint: disable=g-import-not-at-top,wrong-import-position


def _empties(n: int) -> bytes:
  """A msgpack map of ``n`` empty float32 arrays (about 21 bytes each)."""
  payload = b'\x93\x91\x00\xa7float32\xc4\x00'  # [[0], 'float32', b'']
  value = b'\xc7' + bytes([len(payload), 1]) + payload
  parts = [b'\xdf' + struct.pack('>I', n)]
  for i in range(n):
    key = b'%x' % i
    parts.append(bytes([0xa0 | len(key)]) + key + value)
  return b''.join(parts)


@pytest.fixture(name='no_hang')
def _no_hang():
  """Fails the test instead of hanging it (SIGALRM after 60 s)."""
  def alarm(*_):
    raise TimeoutError('blocked')
  old = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(60)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, old)


def test_ckpt_never_opens_a_fifo(tmp_path, capsys, no_hang):  # pylint: disable=unused-argument
  good = tmp_path / 'checkpoint_3'
  good.write_bytes(serialization.msgpack_serialize({'w': np.ones(2)}))
  os.mkfifo(tmp_path / 'checkpoint_5')
  assert ckpt.main(['inspect', str(tmp_path / 'checkpoint_5')]) == 1
  assert capsys.readouterr().err.strip() == (
      f'gintrain ckpt: error: {tmp_path}/checkpoint_5: a FIFO, not a'
      ' checkpoint file.')
  rows = ckpt.list_checkpoints(str(tmp_path))
  assert [(r['step'], r['status']) for r in rows] == [
      (3, 'complete'), (5, 'not a checkpoint: a fifo')]
  with pytest.raises(checkpoint_io.NotARegularFileError, match='FIFO'):
    checkpoint_io.read_checkpoint_file(str(tmp_path / 'checkpoint_5'))


def test_a_million_empty_arrays_cost_bounded_memory(tmp_path):
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(_empties(1_000_000))
  assert path.stat().st_size < 21 << 20
  code = ('import resource, sys\n'
          'from gintrain.runner.cli import ckpt\n'
          'base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
          'status = ckpt.main(["inspect", sys.argv[1]])\n'
          'peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
          'print((peak - base) >> 10)\n'
          'sys.exit(status)\n')
  result = subprocess.run([sys.executable, '-c', code, str(path)],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith(f'gintrain ckpt: error: {path}: not a complete'
                          ' msgpack checkpoint: ') and 'crafted' in error, error
  # Peak memory beyond the imports' (MiB): the bound, not 1 GiB.
  assert int(result.stdout.split()[-1]) < 200, result.stdout
  # A restore of the file: the arrays are one shared empty array; the same
  # tree as msgpack's own decoder.
  tree = checkpoint_io.read_checkpoint_file(str(path))
  assert len(tree) == 1_000_000 and len({id(v) for v in tree.values()}) == 1
  data = path.read_bytes()
  assert tree.keys() == serialization.msgpack_restore(data).keys()


def test_a_crafted_huge_list_is_refused_before_the_work(tmp_path):
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(b'\x81\xa1x\xdd' + struct.pack('>I', 40 << 20) +
                   b'\x01' * (40 << 20))
  assert ckpt.main(['inspect', str(path)]) == 1  # at the list's header


def test_orbax_checkpoint_gets_a_line_saying_to_convert(tmp_path, capsys):
  orbax = tmp_path / 'checkpoint_7'
  orbax.mkdir()
  (orbax / '_METADATA').write_text('{}')
  assert ckpt.main(['inspect', str(tmp_path)]) == 1
  assert capsys.readouterr().err.strip() == (
      f'gintrain ckpt: error: {orbax} is an Orbax checkpoint; gintrain ckpt'
      ' inspect and diff read msgpack checkpoints: convert it first with'
      f' `gintrain ckpt convert {orbax} {orbax}.msgpack`.')
  assert ckpt.main(['diff', str(orbax), str(orbax)]) == 1
  assert 'is an Orbax checkpoint' in capsys.readouterr().err
  assert [r['status'] for r in ckpt.list_checkpoints(str(tmp_path))] == [
      'orbax']
