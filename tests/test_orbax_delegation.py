"""Orbax as an optional backend (lib.orbax_delegation via lib.checkpoints)."""

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.lib import orbax_delegation
from gintrain.lib import struct
from gintrain.lib.checkpoints_multiprocess import save_checkpoint_multiprocess

ocp = pytest.importorskip('orbax.checkpoint')


@pytest.fixture(autouse=True)
def _quiet():
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    yield


@struct.dataclass
class State:
  params: dict
  count: jax.Array
  name: str = struct.field(pytree_node=False, default='s')


def _checkpointer():
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _tree():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('d',))
  sharded = jax.device_put(
      jnp.arange(16.0).reshape(8, 2),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  return {'w': sharded, 'b': jnp.ones(3, jnp.bfloat16),
          'n': np.arange(4, dtype=np.int32), 'sub': {'x': np.float32(2.0)}}


def _assert_tree_equal(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
      want)
  for g, w in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_save_with_orbax_checkpointer_and_restore(tmp_path):
  tree = _tree()
  path = checkpoints.save_checkpoint(tmp_path, tree, 1,
                                     orbax_checkpointer=_checkpointer())
  assert path == str(tmp_path / 'checkpoint_1')
  assert os.path.isdir(path) and orbax_delegation.is_orbax_checkpoint(path)

  # Without a target: Orbax's tree as a state dict.
  back = checkpoints.restore_checkpoint(tmp_path, None)
  _assert_tree_equal(back, tree)
  assert isinstance(back['w'], jax.Array)
  assert isinstance(back['n'], np.ndarray)

  # With a target: its shardings and types.
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('a', 'b'))
  other = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a',
                                                                      'b'))
  target = {'w': jax.device_put(jnp.zeros((8, 2)), other),
            'b': jnp.zeros(3, jnp.bfloat16), 'n': np.zeros(4, np.int32),
            'sub': {'x': np.float32(0)}}
  back = checkpoints.restore_checkpoint(tmp_path, target)
  _assert_tree_equal(back, tree)
  assert back['w'].sharding == other
  assert back['b'].dtype == jnp.bfloat16
  assert isinstance(back['n'], np.ndarray) and back['n'].dtype == np.int32


def test_async_checkpointer_and_struct_target(tmp_path):
  state = State(params={'k': np.arange(3.0)}, count=jnp.array(5))
  ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
  checkpoints.save_checkpoint(tmp_path, state, 2, orbax_checkpointer=ckptr)
  target = State(params={'k': np.zeros(3)}, count=jnp.array(0), name='t')
  back = checkpoints.restore_checkpoint(tmp_path, target,
                                        orbax_checkpointer=ckptr)
  assert isinstance(back, State) and back.name == 't'
  np.testing.assert_array_equal(back.params['k'], np.arange(3.0))
  assert int(back.count) == 5


def test_overwrite_and_retention_with_orbax(tmp_path):
  for step in (1, 2, 3):
    checkpoints.save_checkpoint(tmp_path, {'s': np.array(step)}, step, keep=2,
                                orbax_checkpointer=_checkpointer())
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_2', 'checkpoint_3']
  with pytest.raises(ValueError):  # Orbax refuses an existing destination
    checkpoints.save_checkpoint(tmp_path, {'s': np.array(0)}, 3,
                                orbax_checkpointer=_checkpointer())
  checkpoints.save_checkpoint(tmp_path, {'s': np.array(9)}, 3, keep=2,
                              overwrite=True,
                              orbax_checkpointer=_checkpointer())
  assert checkpoints.restore_checkpoint(tmp_path, None)['s'] == 9


def test_multiprocess_save_with_orbax_prunes_before_saving(tmp_path):
  # As flax: process 0 prunes before the save, so keep=1 leaves two.
  for step in (1, 2, 3):
    save_checkpoint_multiprocess(tmp_path, {'s': np.array(step)}, step,
                                 orbax_checkpointer=_checkpointer())
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_2', 'checkpoint_3']
  assert checkpoints.restore_checkpoint(tmp_path, None)['s'] == 3


def test_flax_written_orbax_checkpoint_restores(tmp_path):
  flax_checkpoints = pytest.importorskip('flax.training.checkpoints')
  from flax import config as flax_config  # pylint: disable=g-import-not-at-top
  old = flax_config.flax_use_orbax_checkpointing
  flax_config.update('flax_use_orbax_checkpointing', True)  # flax's default
  tree = _tree()
  try:
    path = flax_checkpoints.save_checkpoint(tmp_path, tree, 4)
  finally:
    flax_config.update('flax_use_orbax_checkpointing', old)
  assert os.path.isdir(path)
  _assert_tree_equal(checkpoints.restore_checkpoint(tmp_path, None), tree)
  target = jax.tree_util.tree_map(jnp.zeros_like, tree)
  target['n'] = np.zeros(4, np.int32)
  target['sub'] = {'x': np.float32(0)}
  back = checkpoints.restore_checkpoint(path, target)
  _assert_tree_equal(back, tree)
  assert back['w'].sharding == target['w'].sharding
  # The directory itself is an Orbax checkpoint: restored directly.
  _assert_tree_equal(checkpoints.restore_checkpoint(path, None), tree)


def test_orbax_dir_and_legacy_file_in_one_directory(tmp_path):
  legacy = checkpoints.save_checkpoint(tmp_path, {'a': np.arange(2)}, 1)
  orbax = checkpoints.save_checkpoint(tmp_path, {'b': np.arange(3)}, 2,
                                      orbax_checkpointer=_checkpointer(),
                                      keep=2)
  assert os.path.isfile(legacy) and os.path.isdir(orbax)
  for path, want in ((legacy, {'a': np.arange(2)}),
                     (orbax, {'b': np.arange(3)})):
    _assert_tree_equal(checkpoints.restore_checkpoint(path, None), want)
  _assert_tree_equal(checkpoints.restore_checkpoint(tmp_path, None, step=1),
                     {'a': np.arange(2)})
  _assert_tree_equal(checkpoints.restore_checkpoint(tmp_path, None),
                     {'b': np.arange(3)})  # latest


@pytest.mark.parametrize('target', [np.arange(3), jnp.ones(2), 5.0])
def test_bare_leaf_target_raises_value_error(tmp_path, target):
  with pytest.raises(ValueError, match='single'):
    checkpoints.save_checkpoint(tmp_path, target, 0,
                                orbax_checkpointer=_checkpointer())
  with pytest.raises(ValueError, match='single'):
    save_checkpoint_multiprocess(tmp_path, target, 0,
                                 orbax_checkpointer=_checkpointer())
  assert not os.path.exists(tmp_path / 'checkpoint_0')


def test_failed_orbax_checks_delete_nothing(tmp_path):
  checkpoints.save_checkpoint(tmp_path, {'a': np.arange(2)}, 1)
  with pytest.raises(ValueError):
    save_checkpoint_multiprocess(tmp_path, np.arange(3), 2, keep=0,
                                 orbax_checkpointer=_checkpointer())
  assert os.listdir(tmp_path) == ['checkpoint_1']


def test_empty_container_is_refused_by_orbax(tmp_path):
  with pytest.raises(ValueError):
    checkpoints.save_checkpoint(tmp_path, {}, 0,
                                orbax_checkpointer=_checkpointer())


def test_is_orbax_checkpoint(tmp_path):
  assert not orbax_delegation.is_orbax_checkpoint(tmp_path / 'missing')
  assert not orbax_delegation.is_orbax_checkpoint(tmp_path)
  (tmp_path / 'file').write_bytes(b'\x80')
  assert not orbax_delegation.is_orbax_checkpoint(tmp_path / 'file')
  for marker in ('checkpoint', '_METADATA', 'manifest.ocdbt'):
    d = tmp_path / marker.strip('_.')
    d.mkdir()
    (d / marker).write_bytes(b'')
    assert orbax_delegation.is_orbax_checkpoint(d)


def test_missing_orbax_names_the_extra(monkeypatch):
  # None in sys.modules makes the import fail as if orbax were absent.
  monkeypatch.setitem(sys.modules, 'orbax.checkpoint', None)
  with pytest.raises(ImportError, match=r'pip install gintrain\[orbax\]'):
    orbax_delegation.import_orbax()
  with pytest.raises(ImportError, match=r'gintrain\[orbax\]'):
    orbax_delegation.restore_with_orbax('/nonexistent', None)
