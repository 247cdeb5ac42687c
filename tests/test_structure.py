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
  capsys.readouterr()
  assert run(workdir, '--gin.train.num_steps=8',
             '--gin.mlp.features=(8,)') == 1
  err = capsys.readouterr().err
  assert 'does not match the model and optimizer' in err, err
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
