"""The packed layout of sharded checkpoint arrays (``lib.packed_arrays``).

One process with 8 CPU devices writes the slices every process of a
multi-process save writes (``lib.multiprocess_arrays`` with
``array_format='packed'``): two files per process, restored exactly into the
same, other and coarser/finer shardings, and each kind of damage raises
``CheckpointReadError`` naming the array. The 2-process save and restore
(elastic, agreed errors) is in tests/mp_checkpoint_worker.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gintrain.lib import errors
from gintrain.lib import multiprocess_arrays as mpa
from gintrain.lib import packed_arrays

PH = mpa.MP_ARRAY_PH
W = np.arange(8 * 8, dtype=np.float32).reshape(8, 8) + 1
B = (np.arange(4, dtype=np.float32) - 10).astype(jnp.bfloat16)
S = np.float32(2.5)


def _mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))


def _named(spec):
  return NamedSharding(_mesh(), spec)


def _save(root, arrays, step=1):
  ckpt, tmp = str(root / f'checkpoint_{step}'), str(root / f'.tmp_{step}')
  mpa.prepare_array_dir(tmp, ckpt, list(arrays), 'packed')
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=30)
  mpa.save_multiprocess_arrays(
      mgr, list(arrays.items()), tmp, ckpt,
      on_commit=lambda: mpa.commit_array_dir(tmp, ckpt),
      array_format='packed')
  mgr.wait_until_finished()
  state = {'params': {k.split('/')[1]: PH + k for k in arrays}}
  return ckpt, state


@pytest.fixture
def saved(tmp_path):
  return _save(tmp_path, {
      'params/w': jax.device_put(W, _named(P('data', 'model'))),
      'params/b': jax.device_put(B, _named(P())),
      'params/s': jax.device_put(S, _named(P()))})


def _restore(ckpt, state, w=P('data', 'model'), b=P('data'), s=P()):
  out = mpa.read_arrays(state, ckpt, {'params': {
      'w': _named(w), 'b': _named(b), 's': _named(s)}})
  for name, spec in (('w', w), ('b', b), ('s', s)):
    assert out['params'][name].sharding == _named(spec)
  return {k: np.asarray(v) for k, v in out['params'].items()}


def test_two_files_per_process_and_exact_restores(saved):
  ckpt, state = saved
  directory = mpa.array_dir(ckpt)
  assert sorted(os.listdir(directory)) == ['packed']
  assert sorted(os.listdir(os.path.join(directory, 'packed'))) == [
      'process_0.bin', 'process_0.json']
  merged, _ = packed_arrays.load_index(directory)
  assert packed_arrays.describe(merged) == {
      'arrays': 3, 'slices': 10, 'bytes': 8 * 8 * 4 + 4 * 2 + 4}
  mpa.verify_arrays(ckpt, state)
  for specs in ({}, {'w': P(None, 'data'), 'b': P()},  # other slices
                {'w': P(('data', 'model'))},  # finer: parts of slices
                {'w': P(None, 'model')},  # coarser: several slices each
                {'w': P('model', 'data'), 'b': P('model')}):
    got = _restore(ckpt, state, **specs)
    np.testing.assert_array_equal(got['w'], W)
    assert got['b'].dtype == B.dtype
    np.testing.assert_array_equal(got['b'], B)
    assert got['s'] == S and got['s'].shape == ()


def test_offsets_are_aligned_and_the_index_is_written_after_the_data(saved):
  ckpt, _ = saved
  folder = os.path.join(mpa.array_dir(ckpt), 'packed')
  with open(os.path.join(folder, 'process_0.json')) as f:
    index = json.load(f)
  offsets = [c['offset'] for a in index['arrays'].values()
             for c in a['chunks']]
  assert offsets and all(o % 4096 == 0 for o in offsets)
  assert (os.stat(os.path.join(folder, 'process_0.json')).st_mtime_ns >=
          os.stat(os.path.join(folder, 'process_0.bin')).st_mtime_ns)


def _data(ckpt):
  return os.path.join(mpa.array_dir(ckpt), 'packed', 'process_0.bin')


def _index(ckpt):
  return os.path.join(mpa.array_dir(ckpt), 'packed', 'process_0.json')


def _w_chunks(ckpt):
  with open(_index(ckpt)) as f:
    return json.load(f)['arrays']['params/w']['chunks']


def _truncate(ckpt):  # the file ends inside w's last slice
  c = max(_w_chunks(ckpt), key=lambda c: c['offset'])
  with open(_data(ckpt), 'r+b') as f:
    f.truncate(c['offset'] + c['nbytes'] // 2)


def _delete(ckpt):
  os.remove(_data(ckpt))


def _swap(ckpt):  # two slices of w exchanged (both valid data)
  a, b = _w_chunks(ckpt)[:2]
  with open(_data(ckpt), 'r+b') as f:
    f.seek(a['offset'])
    da = f.read(a['nbytes'])
    f.seek(b['offset'])
    db = f.read(b['nbytes'])
    f.seek(a['offset'])
    f.write(db)
    f.seek(b['offset'])
    f.write(da)


def _garbage(ckpt):
  c = _w_chunks(ckpt)[-1]
  with open(_data(ckpt), 'r+b') as f:
    f.seek(c['offset'])
    f.write(np.random.default_rng(0).bytes(c['nbytes']))


def _zeros(ckpt):  # what a sparse hole or a lost write reads as
  c = _w_chunks(ckpt)[0]
  with open(_data(ckpt), 'r+b') as f:
    f.seek(c['offset'])
    f.write(b'\0' * c['nbytes'])


DAMAGE = {'truncate': _truncate, 'delete': _delete, 'swap': _swap,
          'garbage': _garbage, 'zeros': _zeros}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_each_damage_raises_naming_the_array(saved, kind):
  ckpt, state = saved
  DAMAGE[kind](ckpt)
  for check in (lambda: mpa.verify_arrays(ckpt, state),
                lambda: _restore(ckpt, state),
                lambda: _restore(ckpt, state, w=P(('data', 'model')))):
    with pytest.raises(errors.CheckpointReadError) as info:
      check()
    assert 'params/w' in str(info.value), str(info.value)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('damage', ['missing', 'garbage', 'lies'])
def test_a_missing_or_damaged_index_is_corrupt(saved, damage):
  ckpt, state = saved
  if damage == 'missing':
    os.remove(_index(ckpt))
  elif damage == 'garbage':
    with open(_index(ckpt), 'r+b') as f:
      f.write(b'}{')
  else:  # a slice claims more bytes than its box holds
    with open(_index(ckpt)) as f:
      index = json.load(f)
    index['arrays']['params/w']['chunks'][0]['nbytes'] += 4
    with open(_index(ckpt), 'w') as f:
      json.dump(index, f)
  for check in (lambda: mpa.verify_arrays(ckpt, state),
                lambda: _restore(ckpt, state)):
    with pytest.raises(errors.CheckpointReadError, match='process_0.json'):
      check()


def test_a_slice_missing_from_the_index_never_reads_as_fill(saved):
  ckpt, state = saved
  with open(_index(ckpt)) as f:
    index = json.load(f)
  del index['arrays']['params/w']['chunks'][3]
  with open(_index(ckpt), 'w') as f:
    json.dump(index, f)
  with pytest.raises(errors.CheckpointReadError, match='params/w'):
    _restore(ckpt, state)


def test_bad_format_name_and_object_stores():
  with pytest.raises(ValueError, match="array_format='npz'"):
    mpa.resolve_format('npz', '/x/checkpoint_1')
  assert mpa.resolve_format('packed', 's3://b/checkpoint_1') == 'packed'
  assert mpa.resolve_format(None, '/x/checkpoint_1') == mpa.DEFAULT_FORMAT


def test_public_restore_checkpoint_takes_shardings_from_the_target(tmp_path):
  from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top
  from gintrain.lib.checkpoints_multiprocess import restore_checkpoint  # pylint: disable=g-import-not-at-top
  ckpt, state = _save(tmp_path, {
      'params/w': jax.device_put(W, _named(P('data', 'model'))),
      'params/b': jax.device_put(B, _named(P()))}, step=4)
  state['params']['n'] = np.arange(8.0)  # a leaf in the msgpack file
  checkpoint_io.write_checkpoint_file(state, ckpt, ckpt + '.tmp', False)
  target = {'params': {
      'w': jax.ShapeDtypeStruct(W.shape, W.dtype,
                                sharding=_named(P(None, 'data'))),
      'b': jnp.zeros(4, jnp.bfloat16, device=_named(P('data'))),
      'n': jax.ShapeDtypeStruct((8,), np.float64,
                                sharding=_named(P('data')))}}
  for where in (str(tmp_path), ckpt):
    out = restore_checkpoint(where, target)['params']
    assert out['w'].sharding == _named(P(None, 'data'))
    assert out['b'].sharding == _named(P('data'))
    assert out['n'].sharding == _named(P('data'))
    np.testing.assert_array_equal(np.asarray(out['w']), W)
    np.testing.assert_array_equal(np.asarray(out['b']), B)
    np.testing.assert_array_equal(np.asarray(out['n']), np.arange(8.0))
  (tmp_path / 'empty').mkdir()
  assert restore_checkpoint(str(tmp_path / 'empty'), target) is target
  with pytest.raises(errors.MPARestoreTargetRequiredError, match='params/w'):
    restore_checkpoint(str(tmp_path), {'params': {'b': target['params']['b'],
                                                  'w': np.zeros(1)}})


def test_what_crashed_saves_left_is_swept_on_object_stores():
  from gintrain.lib import checkpoint_naming  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoints_multiprocess as cmp  # pylint: disable=g-import-not-at-top
  from gintrain.lib import storage  # pylint: disable=g-import-not-at-top
  run = f'memory://sweep-{os.getpid()}/run'
  dead = checkpoint_naming.new_tmp_path(run, 'checkpoint_')
  current = checkpoint_naming.new_tmp_path(run, 'checkpoint_')
  for path in (dead, f'{run}/checkpoint_2_gda/packed/x',
               f'{run}/checkpoint_3', f'{run}/checkpoint_3_gda/packed/x',
               f'{run}/other_4_gda/x'):
    storage.write_bytes(path, b'x')
  removed = cmp._sweep_crashed_saves(run, 'checkpoint_', current)  # pylint: disable=protected-access
  assert sorted(removed) == sorted([dead, f'{run}/checkpoint_2_gda'])
  assert storage.listdir(run) == ['checkpoint_3', 'checkpoint_3_gda',
                                  'other_4_gda']


def test_over_the_host_memory_budget_the_save_writes_before_returning(
    tmp_path):
  arrays = {'params/w': jax.device_put(W, _named(P('data', 'model')))}
  ckpt, tmp = str(tmp_path / 'checkpoint_1'), str(tmp_path / '.tmp_1')
  mpa.prepare_array_dir(tmp, ckpt, list(arrays), 'packed')
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=30)
  data = os.path.join(mpa.array_dir(tmp), 'packed', 'process_0.bin')
  mpa.save_multiprocess_arrays(
      mgr, list(arrays.items()), tmp, ckpt,
      on_commit=lambda: mpa.commit_array_dir(tmp, ckpt),
      array_format='packed', host_memory_budget=W.nbytes - 1)
  # written by the call itself (the commit may already have renamed it):
  # jax's commit thread has no write of ours left to wait for
  assert mgr._commit_futures == []  # pylint: disable=protected-access
  assert os.path.exists(data) or os.path.exists(
      os.path.join(mpa.array_dir(ckpt), 'packed', 'process_0.bin'))
  mgr.wait_until_finished()
  out = mpa.read_arrays({'params': {'w': PH + 'params/w'}}, ckpt,
                        {'params': {'w': _named(P())}})
  np.testing.assert_array_equal(np.asarray(out['params']['w']), W)


def test_each_hash_block_is_checked_and_names_its_bytes(tmp_path,
                                                        monkeypatch):
  monkeypatch.setattr(packed_arrays, 'HASH_BLOCK', 64)
  wide = np.arange(8 * 32, dtype=np.float32).reshape(8, 32)
  ckpt, state = _save(tmp_path, {
      'params/w': jax.device_put(wide, _named(P('data', None)))})
  chunk = _w_chunks(ckpt)[1]  # rows 2:4, 256 bytes: 4 blocks of 64
  assert chunk['box'] == [[2, 4], [0, 32]] and len(chunk['xxh3']) == 4
  np.testing.assert_array_equal(_restore_w(ckpt, state, P('data')), wide)
  with open(_data(ckpt), 'r+b') as f:  # a byte of its second block
    f.seek(chunk['offset'] + 64 + 5)
    f.write(b'\x7f')
  for check in (lambda: _restore_w(ckpt, state, P('data')),
                lambda: _restore_w(ckpt, state, P(None, 'data')),
                lambda: mpa.verify_arrays(ckpt, state)):
    with pytest.raises(errors.CheckpointReadError,
                       match=r'params/w.*slice \[2:4, 0:32\].*bytes 64-128'
                       ' of 256'):
      check()


def _restore_w(ckpt, state, spec):
  out = mpa.read_arrays(state, ckpt, {'params': {'w': _named(spec)}})
  return np.asarray(out['params']['w'])


def test_version_1_indexes_one_hash_per_slice_still_restore(tmp_path):
  import xxhash  # pylint: disable=g-import-not-at-top
  ckpt, state = _save(tmp_path, {
      'params/w': jax.device_put(W, _named(P('data', 'model')))})
  with open(_index(ckpt)) as f:
    index = json.load(f)
  with open(_data(ckpt), 'rb') as f:
    data = f.read()
  index['version'] = 1
  del index['hash_block']
  for c in index['arrays']['params/w']['chunks']:
    c['xxh3'] = xxhash.xxh3_64_hexdigest(
        data[c['offset']:c['offset'] + c['nbytes']])
  with open(_index(ckpt), 'w') as f:
    json.dump(index, f)
  mpa.verify_arrays(ckpt, state)
  for spec in (P('data', 'model'), P(None, 'data'), P()):
    np.testing.assert_array_equal(_restore_w(ckpt, state, spec), W)
  _swap(ckpt)
  with pytest.raises(errors.CheckpointReadError, match='params/w'):
    _restore_w(ckpt, state, P('data', 'model'))
