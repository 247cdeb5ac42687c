"""lib.common_utils on the 8 virtual CPU devices, against flax's versions."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import common_utils as flax_cu

from gintrain.lib import common_utils
from gintrain.lib.common_utils import (get_metrics, onehot, shard, shard_prng_key,
                              stack_forest)

N = 8


def assert_same(ours, theirs):
  assert type(ours) is type(theirs)
  assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def assert_same_tree(ours, theirs):
  assert (jax.tree_util.tree_structure(ours) ==
          jax.tree_util.tree_structure(theirs))
  for a, b in zip(jax.tree_util.tree_leaves(ours),
                  jax.tree_util.tree_leaves(theirs)):
    assert_same(a, b)


def test_eight_local_devices():
  assert jax.local_device_count() == N


def test_docstring_examples_run():
  result = doctest.testmod(common_utils)
  assert result.attempted >= 8 and result.failed == 0


def test_shard_numpy_and_jax_trees_like_flax():
  tree = {
      'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
      'y': jnp.arange(16, dtype=jnp.int32),
      'nested': [np.zeros((8, 2, 2), np.uint8), jnp.ones((24,), jnp.bfloat16)],
  }
  ours = shard(tree)
  assert_same_tree(ours, flax_cu.shard(tree))
  assert isinstance(ours['x'], np.ndarray)
  assert isinstance(ours['y'], jax.Array)
  assert ours['x'].shape == (N, 2, 3) and ours['y'].shape == (N, 2)
  assert ours['nested'][0].shape == (N, 1, 2, 2)
  assert ours['nested'][1].shape == (N, 3)
  np.testing.assert_array_equal(ours['x'][1], tree['x'][2:4])


def test_shard_feeds_pmap():
  batch = {'x': np.arange(32.0).reshape(16, 2)}
  out = jax.pmap(lambda b: b['x'].sum())(shard(batch))
  np.testing.assert_array_equal(out, np.arange(32.0).reshape(N, 4).sum(1))


def test_shard_indivisible_batch_raises():
  with pytest.raises(ValueError):
    shard({'x': np.zeros((12, 3))})
  with pytest.raises(ValueError):
    flax_cu.shard({'x': np.zeros((12, 3))})
  with pytest.raises(TypeError):
    shard({'x': jnp.zeros((12, 3))})
  with pytest.raises(TypeError):
    flax_cu.shard({'x': jnp.zeros((12, 3))})


def test_shard_empty_and_scalar_leaves():
  assert shard({}) == {}
  assert shard(np.zeros((0, 4))).shape == (N, 0, 4)
  for f in (shard, flax_cu.shard):  # a scalar cannot be split 8 ways
    with pytest.raises(ValueError):
      f(np.float32(3.0))


@pytest.mark.parametrize('make_key', [jax.random.PRNGKey, jax.random.key])
def test_shard_prng_key_like_flax(make_key):
  key = make_key(42)
  ours, theirs = shard_prng_key(key), flax_cu.shard_prng_key(key)
  assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
  np.testing.assert_array_equal(jax.random.key_data(ours),
                                jax.random.key_data(theirs))
  if make_key is jax.random.PRNGKey:
    assert ours.shape == (N, 2) and ours.dtype == jnp.uint32
  else:
    assert ours.shape == (N,)
    assert jax.dtypes.issubdtype(ours.dtype, jax.dtypes.prng_key)
  draws = jax.pmap(lambda k: jax.random.uniform(k, ()))(ours)
  assert len(set(np.asarray(draws).tolist())) == N  # a different key each


def test_stack_forest_like_flax():
  forest = [{'loss': 1.0, 'acc': np.array([0.5, 0.25], np.float32),
             'n': np.int32(i)} for i in range(3)]
  ours = stack_forest(forest)
  assert_same_tree(ours, flax_cu.stack_forest(forest))
  assert ours['loss'].dtype == jnp.float32 and ours['loss'].shape == (3,)
  assert ours['acc'].shape == (3, 2)
  np.testing.assert_array_equal(ours['n'], [0, 1, 2])
  tuples = (jnp.zeros(2), jnp.ones(2))
  assert_same(stack_forest(tuples), flax_cu.stack_forest(tuples))


def test_stack_forest_mismatched_structure_raises():
  with pytest.raises(ValueError):
    stack_forest([{'a': 1.0}, {'b': 1.0}])
  with pytest.raises(ValueError):
    stack_forest([{'a': np.zeros(2)}, {'a': np.zeros(3)}])


@functools.partial(jax.pmap, axis_name='batch')
def _pmapped_metrics(x, step):
  loss = jax.lax.pmean(jnp.mean(x ** 2), 'batch')
  count = jax.lax.psum(jnp.int32(x.shape[0]), 'batch')
  per_class = jax.lax.pmean(x[:2] * step, 'batch')
  return {'loss': loss, 'count': count, 'per_class': per_class}


def test_get_metrics_on_pmapped_outputs_like_flax():
  history = []
  for step in range(3):
    x = shard(np.arange(16.0, dtype=np.float32).reshape(16) + step)
    steps = np.full((N,), step, np.float32)
    history.append(_pmapped_metrics(x, steps))
  ours = get_metrics(history)
  assert_same_tree(ours, flax_cu.get_metrics(history))
  assert ours['loss'].shape == (3,) and ours['loss'].dtype == jnp.float32
  assert ours['count'].dtype == jnp.int32
  np.testing.assert_array_equal(ours['count'], [16, 16, 16])
  assert ours['per_class'].shape == (3, 2)
  for t in range(3):
    expected = np.mean((np.arange(16.0) + t) ** 2)
    np.testing.assert_allclose(ours['loss'][t], expected, rtol=1e-6)


def test_get_metrics_takes_the_first_local_replica():
  # Non-replicated outputs: get_metrics keeps device 0's value.
  out = jax.pmap(lambda i: {'v': i * 10})(jnp.arange(N))
  ours = get_metrics([out, out])
  np.testing.assert_array_equal(ours['v'], [0, 0])
  assert_same_tree(ours, flax_cu.get_metrics([out, out]))


ONEHOT_CASES = [
    (jnp.array([0, 1, 2]), 3, {}),
    (jnp.array([[0, 3], [-1, 2]]), 4, {}),  # negative and in range
    (jnp.array([5, 4, 10, -3]), 4, {}),  # out of range: all-off rows
    (jnp.array(2), 3, {}),  # 0-d labels
    (jnp.array([1, 0]), 2, {'on_value': 0.9, 'off_value': 0.05}),
    (jnp.array([1, 0]), 2, {'on_value': 7, 'off_value': -1}),
    (jnp.array([1, 2], jnp.int8), 3, {}),
    (jnp.array([1.0, 2.0, 2.5]), 3, {}),  # float labels compare by value
    (np.array([[[1]], [[0]]]), 2, {}),  # numpy labels, 3-d
    (jnp.array([0, 1]), 1, {}),
    (jnp.zeros((0,), jnp.int32), 3, {}),
    (jnp.array([True, False]), 2, {}),
]


@pytest.mark.parametrize('labels,num_classes,kwargs', ONEHOT_CASES)
def test_onehot_like_flax(labels, num_classes, kwargs):
  ours = onehot(labels, num_classes, **kwargs)
  assert_same(ours, flax_cu.onehot(labels, num_classes, **kwargs))
  assert ours.dtype == jnp.float32
  assert ours.shape == labels.shape + (num_classes,)


def test_onehot_values():
  np.testing.assert_array_equal(
      onehot(jnp.array([0, 2, 5, -1]), 3, on_value=2.0, off_value=-1.0),
      [[2, -1, -1], [-1, -1, 2], [-1, -1, -1], [-1, -1, -1]])
  np.testing.assert_array_equal(
      onehot(jnp.array([0, 1, 2]), 3), jax.nn.one_hot(jnp.array([0, 1, 2]), 3))


def test_onehot_under_jit_and_list_labels_raise():
  f = jax.jit(onehot, static_argnums=1)
  np.testing.assert_array_equal(f(jnp.array([1, 0]), 2), [[0, 1], [1, 0]])
  with pytest.raises(AttributeError):
    onehot([0, 1], 2)  # a list has no .ndim, as in flax
