"""lib.checkpoints behaves like flax.training.checkpoints (msgpack backend).

flax is imported only as the oracle: its files are compared byte for byte
with ours, each library restores the other's files, and the retention and
overwrite rules are run on both with the same sequence of saves.
"""

import collections
import doctest
import logging
import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import core as flax_core
from flax import errors as flax_errors
from flax import serialization as flax_serialization
from flax.training import checkpoints as flax_ckpt

from gintrain.lib import async_manager
from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import serialization
from gintrain.lib import struct

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(autouse=True)
def flax_msgpack_backend():
  old = flax.config.flax_use_orbax_checkpointing
  flax.config.update('flax_use_orbax_checkpointing', False)
  yield
  flax.config.update('flax_use_orbax_checkpointing', old)


@pytest.fixture
def chunk_size():
  """Sets MAX_CHUNK_SIZE in both libraries; restored afterwards."""
  old = serialization.MAX_CHUNK_SIZE, flax_serialization.MAX_CHUNK_SIZE

  def set_size(n):
    serialization.MAX_CHUNK_SIZE = flax_serialization.MAX_CHUNK_SIZE = n

  yield set_size
  serialization.MAX_CHUNK_SIZE, flax_serialization.MAX_CHUNK_SIZE = old


def names(d):
  """The directory's entries, naturally sorted."""
  return flax_ckpt.natural_sort(os.listdir(d)) if os.path.isdir(d) else []


def read(path):
  with open(path, 'rb') as f:
    return f.read()


def assert_tree_equal(a, b):
  """Same structure, leaf types, dtypes and values."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert type(x) is type(y), (x, y)
    if isinstance(x, (np.ndarray, np.generic)):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x, y)
    else:
      assert x == y


Point = collections.namedtuple('Point', ['x', 'y'])


@struct.dataclass
class Holder:
  params: dict
  count: int
  name: str = struct.field(pytree_node=False, default='h')


# ---------------------------------------------------------------------------
# Names and sorting.


def test_doctests():
  for module in (checkpoints, checkpoint_naming, async_manager):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0, module


@pytest.mark.parametrize('ordered', [
    ['f_1', 'f_2', 'f_3', 'f_10', 'f_11', 'f_100'],
    ['f_0.001', 'f_0.01', 'f_0.1', 'f_1'],
    ['f_-3.0', 'f_-2', 'f_-1', 'f_0.0'],
    ['f_1e1', 'f_1.0e2', 'f_1e3', 'f_1.0e4'],
    ['f_9', 'f_1.0e1', 'f_11'],
    ['f_1e-05', 'f_0.5', 'f_1e+16'],
    ['f_1_2', 'f_1_10', 'f_2_1'],
    ['ckpt_1', 'ckpt_20', 'ckpt_best', 'ckpt_tmp'],
])
def test_natural_sort(ordered):
  shuffled = list(np.random.default_rng(0).permutation(ordered))
  assert checkpoints.natural_sort(shuffled) == ordered
  assert flax_ckpt.natural_sort(shuffled) == ordered


def test_natural_sort_stable_and_unsigned():
  assert checkpoints.natural_sort(['c_5.0', 'c_5']) == ['c_5.0', 'c_5']
  assert checkpoints.natural_sort(['c_5', 'c_5.0']) == ['c_5', 'c_5.0']
  # signed=False drops the sign: f_-1 and f_1 have the same key (stable).
  assert checkpoints.natural_sort(['f_2', 'f_-1', 'f_1'], signed=False) == [
      'f_-1', 'f_1', 'f_2']
  assert checkpoints.natural_sort(['f_1', 'f_-1'], signed=False) == [
      'f_1', 'f_-1']
  assert checkpoints.natural_sort(['f_1', 'f_-1']) == ['f_-1', 'f_1']
  for signed in (True, False):
    names_ = ['a-3', 'a+2', 'b_.5', 'b_0.25', 'x1y2', 'x1y10', 'z']
    assert (checkpoints.natural_sort(names_, signed) ==
            flax_ckpt.natural_sort(names_, signed))


@pytest.mark.parametrize('path,expected', [
    ('./a/b/c', 'a/b/c'), ('/a//b/c', '/a/b/c'), ('/a/../b/c', '/b/c'),
    ('gs://a//b/c', 'gs://a/b/c'), ('', '.'), ('a/b/', 'a/b'),
    ('S3+x.y://q/./r', 'S3+x.y://q/r'),
])
def test_safe_normpath(path, expected):
  assert checkpoints.safe_normpath(path) == expected
  assert flax_ckpt.safe_normpath(path) == expected


def test_regex_constants_match_flax():
  for name in ('SIGNED_FLOAT_RE', 'UNSIGNED_FLOAT_RE', 'MODULE_NUM_RE',
               'SCHEME_RE'):
    ours, theirs = getattr(checkpoints, name), getattr(flax_ckpt, name)
    assert (ours.pattern, ours.flags) == (theirs.pattern, theirs.flags)
  for name in ('MP_ARRAY_POSTFIX', 'MP_ARRAY_PH', 'COMMIT_SUCCESS_FILE',
               'ORBAX_CKPT_FILENAME', 'ORBAX_MANIFEST_OCDBT',
               'ORBAX_METADATA_FILENAME'):
    assert getattr(checkpoints, name) == getattr(flax_ckpt, name)


@pytest.mark.parametrize('path', [
    '/a1/checkpoint_x', '/r/checkpoint_2.5', 'ck_-3', 'ck_1e-05', 'nothing',
    'ck_7_tmp', '/x/ck_+4'])
def test_checkpoint_path_step(path):
  assert (checkpoint_naming.checkpoint_path_step(path) ==
          flax_ckpt._checkpoint_path_step(path))


# ---------------------------------------------------------------------------
# Save and restore.


def test_restore_from_empty_or_missing_dir_returns_target(tmp_path, caplog):
  target = {'a': np.zeros(2)}
  assert checkpoints.restore_checkpoint(tmp_path, target) is target
  assert checkpoints.restore_checkpoint(tmp_path, None) is None
  missing = tmp_path / 'not' / 'there'
  with caplog.at_level(logging.WARNING):
    assert checkpoints.restore_checkpoint(missing, target) is target
  assert str(missing) in caplog.text
  # A file path that does not exist: same (flax's documented behaviour).
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    got = checkpoints.restore_checkpoint(tmp_path / 'checkpoint_9', target)
  assert got is target and 'checkpoint_9' in caplog.text
  assert checkpoints.latest_checkpoint(missing) is None
  assert checkpoints.available_steps(missing) == []


def test_save_step0_prefix_and_restore_latest(tmp_path):
  obj = {'a': np.array([1, 2, 3], np.int32), 'b': jnp.ones(3, jnp.int32)}
  path = checkpoints.save_checkpoint(tmp_path, obj, 0, prefix='test_')
  assert path == str(tmp_path / 'test_0') and names(tmp_path) == ['test_0']
  got = checkpoints.restore_checkpoint(tmp_path, None, prefix='test_')
  assert_tree_equal(got, {'a': np.array([1, 2, 3], np.int32),
                          'b': np.ones(3, np.int32)})
  # Restored arrays are numpy (read-only, like flax's frombuffer arrays).
  assert not got['a'].flags.writeable
  # Other prefixes see nothing.
  assert checkpoints.restore_checkpoint(tmp_path, 'tgt') == 'tgt'


def test_keep_sequences_and_latest(tmp_path):
  for step in range(5):
    checkpoints.save_checkpoint(tmp_path, {'s': step}, step, keep=1)
    assert names(tmp_path) == [f'checkpoint_{step}']
  for step in range(5, 9):
    checkpoints.save_checkpoint(tmp_path, {'s': step}, step, keep=2)
  assert names(tmp_path) == ['checkpoint_7', 'checkpoint_8']
  assert checkpoints.restore_checkpoint(tmp_path, {'s': 0}) == {'s': 8}
  assert checkpoints.restore_checkpoint(tmp_path, {'s': 0}, step=7) == {
      's': 7}


def test_restore_explicit_step_file_path_and_missing_step(tmp_path):
  for step in (1, 2, 3):
    checkpoints.save_checkpoint(tmp_path, {'s': step}, step, keep=3)
  assert checkpoints.restore_checkpoint(tmp_path, None, step=3) == {'s': 3}
  assert checkpoints.restore_checkpoint(
      tmp_path / 'checkpoint_2', None) == {'s': 2}
  # A file path: the prefix is ignored.
  assert checkpoints.restore_checkpoint(
      str(tmp_path / 'checkpoint_1'), None, prefix='zzz') == {'s': 1}
  with pytest.raises(ValueError, match='Matching checkpoint not found: .*'
                     'checkpoint_4'):
    checkpoints.restore_checkpoint(tmp_path, None, step=4)
  # step=3.0 looks for checkpoint_3.0, which does not exist.
  with pytest.raises(ValueError, match='checkpoint_3.0'):
    checkpoints.restore_checkpoint(tmp_path, None, step=3.0)
  # An explicit step also applies under a missing directory.
  with pytest.raises(ValueError, match='Matching checkpoint not found'):
    checkpoints.restore_checkpoint(tmp_path / 'nope', None, step=1)


def test_overwrite_rules(tmp_path):
  checkpoints.save_checkpoint(tmp_path, {'v': 1}, 5)
  before = read(tmp_path / 'checkpoint_5')
  with pytest.raises(errors.InvalidCheckpointError,
                     match='outdated checkpoint at step: "5"') as e:
    checkpoints.save_checkpoint(tmp_path, {'v': 2}, 5)
  assert not isinstance(e.value, ValueError)
  assert str(tmp_path / 'checkpoint_5') in str(e.value)
  with pytest.raises(errors.InvalidCheckpointError):  # a lower step
    checkpoints.save_checkpoint(tmp_path, {'v': 3}, 4)
  assert names(tmp_path) == ['checkpoint_5']
  assert read(tmp_path / 'checkpoint_5') == before
  # 5.0 ties with 5: no error, both coexist (keep=2).
  checkpoints.save_checkpoint(tmp_path, {'v': 4}, 5.0, keep=2)
  assert names(tmp_path) == ['checkpoint_5', 'checkpoint_5.0']
  # overwrite=True replaces and deletes everything sorting after it.
  checkpoints.save_checkpoint(tmp_path, {'v': 6}, 6, keep=5)
  checkpoints.save_checkpoint(tmp_path, {'v': 9}, 5, overwrite=True, keep=5)
  assert names(tmp_path) == ['checkpoint_5']
  assert checkpoints.restore_checkpoint(tmp_path, None) == {'v': 9}


def test_overwrite_error_matches_flax(tmp_path):
  ours, theirs = tmp_path / 'ours', tmp_path / 'flax'
  for saver, err, d in ((checkpoints, errors.InvalidCheckpointError, ours),
                        (flax_ckpt, flax_errors.InvalidCheckpointError,
                         theirs)):
    saver.save_checkpoint(d, {'v': 1}, 3, keep=3)
    for step in (3, 2, 2.5, -1):
      with pytest.raises(err):
        saver.save_checkpoint(d, {'v': 1}, step, keep=3)
    saver.save_checkpoint(d, {'v': 1}, 3.0, keep=3)
    saver.save_checkpoint(d, {'v': 1}, 1e1, keep=3)
  assert names(ours) == names(theirs)


def test_non_normalised_and_pathlike_dirs(tmp_path):
  d = str(tmp_path) + '//sub//'
  path = checkpoints.save_checkpoint(d, {'v': 1}, 1)
  assert path == str(tmp_path / 'sub' / 'checkpoint_1')
  assert checkpoints.restore_checkpoint(d, None) == {'v': 1}
  assert checkpoints.restore_checkpoint(d, None, step=1) == {'v': 1}
  path = checkpoints.save_checkpoint(pathlib.Path(d), {'v': 2}, 2)
  assert isinstance(path, str)
  assert checkpoints.latest_checkpoint(pathlib.Path(d)) == path
  assert checkpoints.restore_checkpoint(f'./{os.path.relpath(d)}/', None) == {
      'v': 2}


RETENTION_CASES = [
    # (keep, keep_every_n_steps, steps, expected final steps)
    (2, 7, [0, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 21, 22],
     ['1', '8', '15', '21', '22']),
    (3, 7, [17, 22, 27, 32], ['17', '22', '27', '32']),
    (2, 7, [0.0, 1.0, 2.0, 3.0, 7.0, 8.0, 9.0, 10.0, 14.0, 15.0, 16.0, 21.0,
            22.0], ['1.0', '8.0', '15.0', '21.0', '22.0']),
    (1, 0.5, [0.1, 0.3, 0.6, 0.7, 1.2, 1.25, 2.0],
     ['0.1', '0.6', '1.2', '2.0']),
    (0, None, [1, 2, 3], ['1', '2', '3']),
    (1, 1, [0, 1, 2, 3], ['1', '2', '3']),  # step 0 is never protected
    (2, None, [1, 2.5, 3, 1e1, 2e1], ['10.0', '20.0']),
    (1, 5, [-10, -4, 0, 3, 6], ['-10', '-4', '3', '6']),
]


@pytest.mark.parametrize('keep,every,steps,expected', RETENTION_CASES)
def test_retention_matches_flax(tmp_path, keep, every, steps, expected):
  ours, theirs = tmp_path / 'ours', tmp_path / 'flax'
  for step in steps:
    checkpoints.save_checkpoint(ours, {'s': step}, step, keep=keep,
                                keep_every_n_steps=every)
    flax_ckpt.save_checkpoint(theirs, {'s': step}, step, keep=keep,
                              keep_every_n_steps=every)
    assert names(ours) == names(theirs), step
  assert names(ours) == [f'checkpoint_{s}' for s in expected]
  for name in names(ours):
    assert read(ours / name) == read(theirs / name)


def test_step0_deleted_at_save_of_step2(tmp_path):
  for step, expected in ((0, [0]), (1, [0, 1]), (2, [1, 2]), (3, [1, 2, 3]),
                         (7, [1, 3, 7])):
    checkpoints.save_checkpoint(tmp_path, {}, step, keep=2,
                                keep_every_n_steps=7)
    steps = checkpoints.available_steps(tmp_path)
    assert steps[-2:] == expected[-2:] and steps[0] == expected[0], steps


def test_restore_surviving_and_deleted_steps(tmp_path):
  for step in (17, 22, 27, 32):
    checkpoints.save_checkpoint(tmp_path, {'s': step}, step, keep=1,
                                keep_every_n_steps=7)
  assert checkpoints.available_steps(tmp_path) == [17, 27, 32]
  for step in (17, 27, 32):
    assert checkpoints.restore_checkpoint(tmp_path, None, step=step) == {
        's': step}
  with pytest.raises(ValueError):
    checkpoints.restore_checkpoint(tmp_path, None, step=22)


def test_float_steps(tmp_path):
  checkpoints.save_checkpoint(tmp_path, {'s': 0}, 0.0, prefix='test_')
  assert names(tmp_path) == ['test_0.0']
  checkpoints.save_checkpoint(tmp_path, {'s': 2}, 2.0, prefix='test_', keep=2)
  checkpoints.save_checkpoint(tmp_path, {'s': 3}, 3.0, prefix='test_', keep=2)
  assert names(tmp_path) == ['test_2.0', 'test_3.0']
  assert checkpoints.restore_checkpoint(tmp_path, None, 2.0, 'test_') == {
      's': 2}
  assert checkpoints.available_steps(tmp_path, 'test_', float) == [2.0, 3.0]
  with pytest.raises(ValueError):
    checkpoints.available_steps(tmp_path, 'test_')


def test_stale_tmp_file(tmp_path):
  (tmp_path / 'checkpoint_tmp').write_bytes(b'half a checkpoint')
  (tmp_path / 'checkpoint_tmp_gda').mkdir()
  assert checkpoints.latest_checkpoint(tmp_path) is None
  assert checkpoints.restore_checkpoint(tmp_path, 'tgt') == 'tgt'
  checkpoints.save_checkpoint(tmp_path, {'v': 1}, 1)  # no overwrite error
  # flax's tmp name may be a live flax writer's: left until it is stale.
  assert names(tmp_path) == ['checkpoint_1', 'checkpoint_tmp',
                             'checkpoint_tmp_gda']
  assert checkpoints.restore_checkpoint(tmp_path, None) == {'v': 1}


def test_checkpoint_best_sorts_last(tmp_path):
  checkpoints.save_checkpoint(tmp_path, {'v': 1}, 1, keep=5)
  checkpoints.save_checkpoint(tmp_path, {'v': 'best'}, 'best', keep=5)
  checkpoints.save_checkpoint(tmp_path, {'v': 100}, 100, keep=5,
                              overwrite=True)
  assert names(tmp_path) == ['checkpoint_1', 'checkpoint_100']
  checkpoints.save_checkpoint(tmp_path, {'v': 'best'}, 'best', keep=5)
  assert checkpoints.latest_checkpoint(tmp_path).endswith('checkpoint_best')
  assert checkpoints.restore_checkpoint(tmp_path, None) == {'v': 'best'}
  with pytest.raises(errors.InvalidCheckpointError):
    checkpoints.save_checkpoint(tmp_path, {'v': 10**6}, 10**6, keep=5)
  with pytest.raises(ValueError):
    checkpoints.available_steps(tmp_path)
  with pytest.raises(ValueError):
    checkpoints.available_steps(tmp_path, step_type=float)
  # The same with flax.
  flax_dir = tmp_path / 'flax'
  flax_ckpt.save_checkpoint(flax_dir, {'v': 1}, 1, keep=5)
  flax_ckpt.save_checkpoint(flax_dir, {'v': 'best'}, 'best', keep=5)
  with pytest.raises(flax_errors.InvalidCheckpointError):
    flax_ckpt.save_checkpoint(flax_dir, {'v': 10**6}, 10**6, keep=5)


@pytest.mark.parametrize('prefix', ['a_', 'ck[0-9]_', 'ck?_', 'x*', 'ck[!a]'])
def test_prefixes_match_flax(tmp_path, prefix):
  ours, theirs = tmp_path / 'ours', tmp_path / 'flax'
  for d in (ours, theirs):
    d.mkdir()
    for name in ('ck1_3', 'ckb_9', 'b_1', 'xyz_2', 'ck[0-9]_0'):
      (d / name).write_bytes(serialization.to_bytes({'n': name}))
  for step in (1, 2, 3):
    checkpoints.save_checkpoint(ours, {'s': step}, step, prefix=prefix,
                                keep=2, overwrite=True)
    flax_ckpt.save_checkpoint(theirs, {'s': step}, step, prefix=prefix,
                              keep=2, overwrite=True)
    assert names(ours) == names(theirs)
  assert (os.path.basename(checkpoints.latest_checkpoint(ours, prefix)) ==
          os.path.basename(flax_ckpt.latest_checkpoint(theirs, prefix)))


def test_prefixes_do_not_interfere(tmp_path):
  for step in range(4):
    checkpoints.save_checkpoint(tmp_path, {'a': step}, step, prefix='a_')
    checkpoints.save_checkpoint(tmp_path, {'b': step}, step * 10,
                                prefix='b_', keep=2)
  assert names(tmp_path) == ['a_3', 'b_20', 'b_30']
  assert checkpoints.restore_checkpoint(tmp_path, None, prefix='b_') == {
      'b': 3}


def test_latest_checkpoint_ignores_tmp_gda_and_orbax_tmp(tmp_path):
  for name in ('test_1', 'test_5', 'test_112'):
    checkpoints.save_checkpoint(tmp_path, {}, int(name[5:]), prefix='test_',
                                keep=5)
  for d in ('test_tmp_gda', 'test_200_gda', 'test_300.orbax-checkpoint-tmp-9',
            'other_999'):
    (tmp_path / d).mkdir()
  (tmp_path / 'test_tmp').write_bytes(b'x')
  assert checkpoints.latest_checkpoint(tmp_path, 'test_') == str(
      tmp_path / 'test_112')
  assert checkpoints.available_steps(tmp_path, 'test_') == [1, 5, 112]
  assert (checkpoints.latest_checkpoint(tmp_path, 'test_') ==
          flax_ckpt.latest_checkpoint(tmp_path, 'test_'))
  assert (checkpoints.available_steps(tmp_path, 'test_') ==
          flax_ckpt.available_steps(tmp_path, 'test_'))


def test_available_steps_float(tmp_path):
  for step in (1.0, 4.5, 5.6):
    checkpoints.save_checkpoint(tmp_path, {}, step, prefix='test_', keep=5)
  (tmp_path / 'test_tmp').write_bytes(b'x')
  (tmp_path / 'test_9_gda').mkdir()
  assert checkpoints.available_steps(tmp_path, 'test_', float) == [
      1.0, 4.5, 5.6]
  with pytest.raises(ValueError):
    checkpoints.available_steps(tmp_path, 'test_', int)


TREES = {
    'params': {'params': {'Dense_0': {'kernel': np.arange(12.0).reshape(3, 4)
                                      .astype(np.float32),
                                      'bias': np.zeros(4, np.float32)}},
               'step': 3},
    'mixed': {'i': np.int64(-7), 'f': 1.5, 'c': 2 - 1j, 'b': True, 'n': None,
              's': 'text', 'by': b'\x00\x01', 'bf': jnp.ones((2, 2),
                                                          jnp.bfloat16),
              'h': np.ones(3, np.float16), 'u8': np.arange(5, dtype=np.uint8),
              'big': 2**64 - 1, 'neg': -2**63, 'e': {}, 'z': np.zeros((0, 3))},
    'containers': (np.arange(3), [np.ones(2), {'k': Point(1, np.zeros(1))}]),
    'leaf': np.arange(6.0).reshape(2, 3),
    'empty_list': [],
    'jax': {'w': jnp.arange(10.0), 'r': jax.random.key_data(
        jax.random.PRNGKey(0))},
}


@pytest.mark.parametrize('name', sorted(TREES))
@pytest.mark.parametrize('max_chunk', [2**30, 24])
def test_files_identical_to_flax_and_cross_restore(tmp_path, chunk_size,
                                                   name, max_chunk):
  chunk_size(max_chunk)
  tree = TREES[name]
  ours = checkpoints.save_checkpoint(tmp_path / 'ours', tree, 1)
  theirs = flax_ckpt.save_checkpoint(tmp_path / 'flax', tree, 1)
  assert read(ours) == read(theirs)
  assert read(ours) == flax_serialization.to_bytes(tree)
  for ckpt in (ours, theirs):
    expect_none = flax_ckpt.restore_checkpoint(ckpt, None)
    assert_tree_equal(checkpoints.restore_checkpoint(ckpt, None), expect_none)
    expect = flax_ckpt.restore_checkpoint(ckpt, tree)
    got = checkpoints.restore_checkpoint(ckpt, tree)
    assert_tree_equal(got, expect)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
        tree)


def test_chunked_large_array_identical(tmp_path, chunk_size):
  chunk_size(1000)
  tree = {'w': np.random.default_rng(0).normal(size=(37, 91)),
          'inner': {'v': np.arange(700, dtype=np.int16)}, 'x': 1}
  ours = checkpoints.save_checkpoint(tmp_path, tree, 1)
  assert read(ours) == flax_serialization.to_bytes(tree)
  got = checkpoints.restore_checkpoint(ours, tree)
  assert_tree_equal(got, flax_ckpt.restore_checkpoint(ours, tree))
  assert got['w'].flags.writeable  # concatenated in flax too
  chunk_size(2**30)  # restoring does not depend on the constant
  assert_tree_equal(checkpoints.restore_checkpoint(ours, None)['w'],
                    tree['w'])


def test_restore_targets(tmp_path):
  state = {'a': np.arange(3), 'b': [np.ones(2), 7]}
  path = checkpoints.save_checkpoint(tmp_path, state, 1)
  restored = checkpoints.restore_checkpoint(path, None)
  assert_tree_equal(restored, {'a': np.arange(3),
                               'b': {'0': np.ones(2), '1': 7}})
  assert_tree_equal(checkpoints.restore_checkpoint(path, state), state)
  # A tuple file restores as {'0':..} without a target, as a list into a list.
  path = checkpoints.save_checkpoint(tmp_path, (np.ones(1), 2), 2)
  assert_tree_equal(checkpoints.restore_checkpoint(path, None),
                    {'0': np.ones(1), '1': 2})
  assert_tree_equal(checkpoints.restore_checkpoint(path, [0, 0]),
                    [np.ones(1), 2])
  # Empty containers.
  path = checkpoints.save_checkpoint(tmp_path, [], 3)
  assert checkpoints.restore_checkpoint(path, None) == {}
  path = checkpoints.save_checkpoint(tmp_path, {}, 4)
  assert checkpoints.restore_checkpoint(path, []) == []
  # A bare array, with and without a target.
  path = checkpoints.save_checkpoint(tmp_path, np.arange(4.0), 5)
  np.testing.assert_array_equal(checkpoints.restore_checkpoint(path, None),
                                np.arange(4.0))
  np.testing.assert_array_equal(
      checkpoints.restore_checkpoint(path, np.zeros(1)), np.arange(4.0))
  # No shape check: a (4, 8) array restores into a (2, 3) target.
  path = checkpoints.save_checkpoint(tmp_path, {'w': np.ones((4, 8))}, 6)
  got = checkpoints.restore_checkpoint(path, {'w': jnp.zeros((2, 3))})
  assert isinstance(got['w'], np.ndarray) and got['w'].shape == (4, 8)


def test_dataclass_namedtuple_round_trip(tmp_path):
  tree = [Holder(params={'w': np.ones(2)}, count=3,
                 name='n'), Point(np.arange(2), 1.5), np.zeros(3)]
  path = checkpoints.save_checkpoint(tmp_path, tree, 1)
  # flax writes the same bytes for the same structure of plain values.
  assert read(path) == flax_serialization.to_bytes(
      [{'params': {'w': np.ones(2)}, 'count': 3},
       {'x': np.arange(2), 'y': 1.5}, np.zeros(3)])
  target = [Holder(params={'w': np.zeros(2)}, count=0, name='target'),
            Point(np.zeros(2), 0.0), np.ones(3)]
  got = checkpoints.restore_checkpoint(path, target)
  assert isinstance(got[0], Holder) and got[0].name == 'target'
  assert got[0].count == 3
  np.testing.assert_array_equal(got[0].params['w'], np.ones(2))
  assert isinstance(got[1], Point) and got[1].y == 1.5
  other = collections.namedtuple('Other', ['x', 'z'])(0, 0)
  with pytest.raises(ValueError, match='field names.* at path ./1'):
    checkpoints.restore_checkpoint(path, [target[0], other, target[2]])
  with pytest.raises(ValueError, match='size of the list'):
    checkpoints.restore_checkpoint(path, target[:2])


def test_unserializable_target_raises_and_writes_nothing(tmp_path):
  with pytest.raises(TypeError, match='/a/b'):
    checkpoints.save_checkpoint(tmp_path, {'a': {'b': object()}}, 1)
  assert names(tmp_path) == []


def test_deprecation_warning(tmp_path):
  with pytest.warns(DeprecationWarning, match='Orbax'):
    checkpoints.save_checkpoint(tmp_path, {}, 1)


# ---------------------------------------------------------------------------
# AsyncManager.


def test_async_save_content_and_back_to_back(tmp_path):
  am = checkpoints.AsyncManager()
  assert am.save_future is None
  path = checkpoints.save_checkpoint(tmp_path, {'v': np.arange(3)}, 1,
                                     async_manager=am)
  am.save_future.result()
  assert os.path.exists(path)
  assert_tree_equal(checkpoints.restore_checkpoint(tmp_path, None),
                    {'v': np.arange(3)})
  checkpoints.save_checkpoint(tmp_path, {'v': 2}, 2, async_manager=am)
  checkpoints.save_checkpoint(tmp_path, {'v': 3}, 3, async_manager=am)
  am.wait_previous_save()
  assert names(tmp_path) == ['checkpoint_3']
  assert checkpoints.restore_checkpoint(tmp_path, None) == {'v': 3}


def test_async_snapshot_is_independent_of_later_mutation(tmp_path,
                                                         chunk_size):
  chunk_size(4096)
  big = np.zeros(300_000, np.float32)  # above the inline size, chunked
  small = np.zeros(4, np.float32)
  nested = {'l': [np.zeros(70_000)]}
  am = checkpoints.AsyncManager()
  checkpoints.save_checkpoint(tmp_path, {'big': big, 'small': small,
                                         'nested': nested}, 1,
                              async_manager=am)
  big += 1
  small += 1
  nested['l'][0] += 1
  nested['l'].append(5)
  am.wait_previous_save()
  got = checkpoints.restore_checkpoint(tmp_path, None)
  assert not got['big'].any() and not got['small'].any()
  assert list(got['nested']['l']) == ['0']  # the append came too late
  assert not got['nested']['l']['0'].any()


def test_async_jax_arrays_survive_donation(tmp_path):
  x = jnp.arange(100_000, dtype=jnp.float32)
  expected = np.asarray(x).copy()
  am = checkpoints.AsyncManager()
  checkpoints.save_checkpoint(tmp_path, {'x': x}, 1, async_manager=am)
  y = jax.jit(lambda a: a * 0 - 1, donate_argnums=0)(x)
  y.block_until_ready()
  am.wait_previous_save()
  np.testing.assert_array_equal(
      checkpoints.restore_checkpoint(tmp_path, None)['x'], expected)


def test_failed_async_save_raises_at_next_wait_and_save(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_bytes(b'')
  am = checkpoints.AsyncManager()
  # The directory "file/sub" cannot be created: fails in the background.
  checkpoints.save_checkpoint(blocker / 'sub', {'v': 1}, 1, overwrite=True,
                              async_manager=am)
  with pytest.raises(OSError):
    am.wait_previous_save()
  am.wait_previous_save()  # reported once
  checkpoints.save_checkpoint(blocker / 'sub', {'v': 1}, 1, overwrite=True,
                              async_manager=am)
  with pytest.raises(OSError):  # raised by the next save call
    checkpoints.save_checkpoint(tmp_path, {'v': 2}, 2, async_manager=am)
  checkpoints.save_checkpoint(tmp_path, {'v': 3}, 3, async_manager=am)
  am.wait_previous_save()
  assert checkpoints.restore_checkpoint(tmp_path, None) == {'v': 3}


def test_overwrite_error_is_raised_in_caller_with_async(tmp_path):
  am = checkpoints.AsyncManager()
  checkpoints.save_checkpoint(tmp_path, {'v': 1}, 5, async_manager=am)
  with pytest.raises(errors.InvalidCheckpointError):
    checkpoints.save_checkpoint(tmp_path, {'v': 2}, 4, async_manager=am)
  am.wait_previous_save()
  assert names(tmp_path) == ['checkpoint_5']


# ---------------------------------------------------------------------------
# convert_pre_linen.


def test_convert_pre_linen_example():
  params = {
      'mod_0': {'submod1_0': {}, 'submod2_1': {}, 'submod1_2': {}},
      'mod2_2': {'submod2_2_0': {}},
      'mod2_11': {'submod2_11_0': {}},
      'mod2_1': {'submod2_1_0': {}},
  }
  expected = {
      'mod_0': {'submod1_0': {}, 'submod1_1': {}, 'submod2_0': {}},
      'mod2_0': {'submod2_1_0': {}},
      'mod2_1': {'submod2_2_0': {}},
      'mod2_2': {'submod2_11_0': {}},
  }
  got = checkpoints.convert_pre_linen(params)
  assert got == expected
  theirs = flax_ckpt.convert_pre_linen(params)
  assert got == theirs and list(got) == list(theirs)
  assert list(got['mod_0']) == list(theirs['mod_0'])
  frozen = checkpoints.convert_pre_linen(flax_core.FrozenDict(params))
  assert isinstance(frozen, flax_core.FrozenDict)
  assert flax_core.unfreeze(frozen) == expected
  assert checkpoints.convert_pre_linen([{'a_1': 1}]) == [{'a_1': 1}]
  assert checkpoints.convert_pre_linen(3) == 3
  leaves = {'Conv_0': {'kernel': 1}, 'Dense_1': {'kernel': 2}, 'x_y': 3}
  assert checkpoints.convert_pre_linen(leaves) == {
      'Conv_0': {'kernel': 1}, 'Dense_0': {'kernel': 2}, 'x_y': 3}


# ---------------------------------------------------------------------------
# Orbax delegation (routing only; lib.orbax_delegation has its own tests).


def test_orbax_and_legacy_checkpoints_in_one_directory(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  tree = {'w': np.arange(3.0), 'b': {'c': np.ones(2, np.int32)}}
  orbax_path = checkpoints.save_checkpoint(
      tmp_path, tree, 1, keep=5,
      orbax_checkpointer=ocp.Checkpointer(ocp.PyTreeCheckpointHandler()))
  assert os.path.isdir(orbax_path)
  legacy_path = checkpoints.save_checkpoint(tmp_path, {'w': np.zeros(1)}, 2,
                                            keep=5)
  assert os.path.isfile(legacy_path)
  assert_tree_equal(checkpoints.restore_checkpoint(orbax_path, None), tree)
  assert_tree_equal(checkpoints.restore_checkpoint(tmp_path, None, step=1),
                    tree)
  assert_tree_equal(checkpoints.restore_checkpoint(tmp_path, None),
                    {'w': np.zeros(1)})
  got = checkpoints.restore_checkpoint(orbax_path, tree)
  assert_tree_equal(got, tree)
  # flax reads the same Orbax directory the same way.
  assert_tree_equal(flax_ckpt.restore_checkpoint(orbax_path, None), tree)
  # Retention also applies to Orbax saves (keep=1 deletes both older ones).
  checkpoints.save_checkpoint(
      tmp_path, tree, 3, keep=1,
      orbax_checkpointer=ocp.Checkpointer(ocp.PyTreeCheckpointHandler()))
  assert names(tmp_path) == ['checkpoint_3']


def test_save_checkpoint_multiprocess_is_exported():
  from gintrain.lib import checkpoints_multiprocess  # pylint: disable=g-import-not-at-top
  assert (checkpoints.save_checkpoint_multiprocess is
          checkpoints_multiprocess.save_checkpoint_multiprocess)
  assert set(checkpoints.__all__) <= set(dir(checkpoints))
