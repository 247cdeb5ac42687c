"""gintrain ckpt ls / inspect / diff on small files (no timing thresholds;
bench/ckpt_inspect.py measures a 2.5 GiB file)."""

import json
import os
import warnings

import numpy as np

from gintrain.lib import checkpoints
from gintrain.lib import serialization
from gintrain.runner.cli import ckpt
from gintrain.runner.cli import ckpt_structure


def _save(directory, tree, step):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # legacy format
    return checkpoints.save_checkpoint(str(directory), tree, step, keep=10)


TREE = {'state': {'step': np.int32(7),
                  'params': {'w': np.arange(12, dtype=np.float32).reshape(3, 4),
                             'b': np.zeros(4, np.float16)}},
        'data': {'step': 7, 'name': 'x'}}


def test_inspect_reads_the_structure_only(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 64)  # chunk big arrays
  tree = {**TREE, 'big': np.arange(1000, dtype=np.float64).reshape(10, 100)}
  path = _save(tmp_path, tree, 7)
  info = ckpt.inspect(path)
  by_path = {leaf['path']: leaf for leaf in info['leaves']}
  assert by_path['big'] == {'path': 'big', 'kind': 'array', 'dtype': 'float64',
                            'shape': [10, 100], 'size': 1000, 'bytes': 8000}
  assert by_path['state/params/w']['shape'] == [3, 4]
  assert by_path['state/params/b']['dtype'] == 'float16'
  assert by_path['data/name']['value'] == 'x'
  assert info['step'] == 7
  assert info['parameters'] == {'prefix': 'state/params', 'arrays': 2,
                                'size': 16, 'bytes': 56}
  # The chunked array's data is where the structure says.
  leaf = [l for l in ckpt_structure.read_structure(path).leaves
          if l.path == 'big'][0]
  assert len(leaf.segments) > 1
  np.testing.assert_array_equal(ckpt_structure.read_leaf(path, leaf),
                                tree['big'])
  assert ckpt.main(['inspect', str(tmp_path)]) == 0  # the latest file
  out = capsys.readouterr().out
  assert '| state/params/w' in out and 'Parameters (state/params): 16' in out
  assert ckpt.main(['inspect', path, '--json']) == 0
  assert json.loads(capsys.readouterr().out)['file_bytes'] == os.path.getsize(
      path)


def test_ls_marks_incomplete_files(tmp_path, capsys):
  for step in (1, 2):
    _save(tmp_path, TREE, step)
  full = (tmp_path / 'checkpoint_2').read_bytes()
  (tmp_path / 'checkpoint_3').write_bytes(full[:-5])  # cut short
  rows = ckpt.list_checkpoints(str(tmp_path))
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert [r['status'] for r in rows][:2] == ['complete', 'complete']
  assert rows[2]['status'].startswith('incomplete: truncated')
  assert rows[1]['bytes'] == len(full)
  assert ckpt.main(['ls', str(tmp_path)]) == 0
  assert 'incomplete' in capsys.readouterr().out
  assert ckpt.main(['inspect', str(tmp_path / 'checkpoint_3')]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'gintrain ckpt: error: {tmp_path}/checkpoint_3: not'
                        ' a complete msgpack checkpoint: truncated')
  assert len(err.strip().split('\n')) == 1


def test_diff(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 64)
  a = {'w': np.arange(1000, dtype=np.float32), 'n': np.float32(np.nan),
       's': 1}
  b = {'w': a['w'].copy(), 'n': np.float32(np.nan), 's': 2,
       'extra': np.zeros(2)}
  b['w'][[3, 900]] += [0.5, -2.0]
  pa = _save(tmp_path / 'a', a, 1)
  monkeypatch.setattr(serialization, 'MAX_CHUNK_SIZE', 2**30)  # unchunked
  pb = _save(tmp_path / 'b', b, 1)
  d = ckpt.diff(pa, pb)
  assert d['only_b'] == ['extra'] and d['only_a'] == []
  rows = {r['path']: r for r in d['differ']}
  assert rows['w']['max_abs_diff'] == 2.0 and rows['w']['elements'] == 2
  assert rows['s']['what'] == '1 vs 2'
  assert d['identical'] == 1  # NaN equals NaN
  assert ckpt.main(['diff', pa, pa]) == 0
  assert 'identical; 3 leaves equal.' in capsys.readouterr().out
  assert ckpt.main(['diff', pa, str(tmp_path / 'missing')]) == 1
  assert 'no such file or directory' in capsys.readouterr().err
