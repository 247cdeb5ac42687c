"""lib.train_state.TrainState behaves as flax's TrainState (flax = oracle)."""

import dataclasses
import doctest
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization as flax_serialization
from flax.training import train_state as flax_train_state

from gintrain.lib import serialization, struct, train_state
from gintrain.lib.train_state import TrainState

FlaxTrainState = flax_train_state.TrainState


def apply_fn(variables, x):
  p = variables['params']
  h = jnp.tanh(x @ p['dense']['kernel'] + p['dense']['bias'])
  return h @ p['out']['kernel']


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      'dense': {'kernel': normal(3, 4), 'bias': normal(4)},
      'out': {'kernel': normal(4, 2)},
  }


def batch(seed):
  rng = np.random.default_rng(100 + seed)
  return (jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
          jnp.asarray(rng.normal(size=(5, 2)), jnp.float32))


def loss(params, x, y):
  pred = apply_fn({'params': params}, x)
  return jnp.mean((pred - y) ** 2)


grad_fn = jax.jit(jax.grad(loss))


def assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)
  assert (jax.tree_util.tree_structure(serialization.to_state_dict(a)) ==
          jax.tree_util.tree_structure(
              flax_serialization.to_state_dict(b)))


def both_states(tx, params=None):
  params = make_params() if params is None else params
  return (TrainState.create(apply_fn=apply_fn, params=params, tx=tx),
          FlaxTrainState.create(apply_fn=apply_fn, params=params, tx=tx))


def test_docstring_examples_run():
  result = doctest.testmod(train_state)
  assert result.attempted >= 8 and result.failed == 0


def test_flax_docstring_example_with_lib_train_state():
  """flax's own example (linen Dense as the model) gives flax's numbers."""
  import flax.linen as nn  # the model only; TrainState is lib's

  x = jnp.ones((1, 2))
  y = jnp.ones((1, 2))
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), x)
  tx = optax.adam(1e-3)
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx)

  def loss_fn(params, x, y):
    predictions = state.apply_fn({'params': params}, x)
    return optax.l2_loss(predictions=predictions, targets=y).mean()

  assert repr(loss_fn(state.params, x, y)) == 'Array(1.8136346, dtype=float32)'
  grads = jax.grad(loss_fn)(state.params, x, y)
  state = state.apply_gradients(grads=grads)
  assert repr(loss_fn(state.params, x, y)) == 'Array(1.8079796, dtype=float32)'


def test_fields_static_fields_and_leaves():
  ours, theirs = both_states(optax.adam(1e-3))
  names = [f.name for f in dataclasses.fields(TrainState)]
  assert names == [f.name for f in dataclasses.fields(FlaxTrainState)]
  assert names == ['step', 'apply_fn', 'params', 'tx', 'opt_state']
  assert all(f.default is dataclasses.MISSING
             for f in dataclasses.fields(TrainState))
  assert ours.step == 0 and type(ours.step) is int
  assert len(jax.tree_util.tree_leaves(ours)) == len(
      jax.tree_util.tree_leaves(theirs))
  assert_trees_equal(ours, theirs)
  assert set(serialization.to_state_dict(ours)) == {
      'step', 'params', 'opt_state'}
  with pytest.raises(dataclasses.FrozenInstanceError):
    ours.step = 3


@pytest.mark.parametrize('make_tx', [
    lambda: optax.adam(1e-2),
    lambda: optax.sgd(0.1, momentum=0.9),
    lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)),
])
def test_several_steps_equal_flax_exactly(make_tx):
  tx = make_tx()
  ours, theirs = both_states(tx)
  for i in range(4):
    x, y = batch(i)
    grads = grad_fn(ours.params, x, y)
    ours = ours.apply_gradients(grads=grads)
    theirs = theirs.apply_gradients(grads=grads)
    assert ours.step == theirs.step == i + 1
    assert_trees_equal(ours, theirs)
  assert serialization.to_bytes(ours) == flax_serialization.to_bytes(theirs)
  ours_sd = serialization.to_state_dict(ours)
  theirs_sd = flax_serialization.to_state_dict(theirs)
  assert jax.tree_util.tree_structure(ours_sd) == (
      jax.tree_util.tree_structure(theirs_sd))
  assert_trees_equal(ours_sd, theirs_sd)


def test_jitted_train_step_equals_flax():
  tx = optax.adam(1e-2)
  ours, theirs = both_states(tx)
  # One jitted function for both classes: their treedefs must differ, or
  # jit's caches may (rarely: a hash probe collision) hand one class's
  # output structure to the other (jax's register_dataclass treedefs
  # compare equal across classes; lib.struct registers custom nodes).
  assert (jax.tree_util.tree_structure(ours) !=
          jax.tree_util.tree_structure(theirs))

  @jax.jit
  def step(state, x, y):
    grads = jax.grad(loss)(state.params, x, y)
    return state.apply_gradients(grads=grads)

  for i in range(3):
    ours, theirs = step(ours, *batch(i)), step(theirs, *batch(i))
    assert type(ours) is TrainState and type(theirs) is FlaxTrainState
  assert_trees_equal(ours, theirs)
  assert int(ours.step) == 3
  assert ours.apply_fn is apply_fn and ours.tx is tx


def test_bytes_cross_restore_with_flax():
  ours, theirs = both_states(optax.adam(1e-2))
  grads = grad_fn(ours.params, *batch(0))
  ours = ours.apply_gradients(grads=grads)
  theirs = theirs.apply_gradients(grads=grads)
  data = flax_serialization.to_bytes(theirs)
  assert serialization.to_bytes(ours) == data
  fresh, _ = both_states(optax.adam(1e-2), params=make_params(seed=7))
  restored = serialization.from_bytes(fresh, data)
  assert_trees_equal(restored, theirs)
  assert restored.apply_fn is apply_fn


def test_apply_gradients_kwargs_and_subclass_fields():

  class StateWithStats(TrainState):
    batch_stats: Any = None
    note: str = struct.field(pytree_node=False, default='a')

  state = StateWithStats.create(
      apply_fn=apply_fn, params=make_params(), tx=optax.sgd(0.1),
      batch_stats={'mean': jnp.zeros(3)}, note='b')
  assert state.note == 'b' and state.step == 0
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  new = state.apply_gradients(grads=grads, batch_stats={'mean': jnp.ones(3)})
  assert isinstance(new, StateWithStats)
  np.testing.assert_array_equal(new.batch_stats['mean'], np.ones(3))
  np.testing.assert_allclose(new.params['out']['kernel'],
                             state.params['out']['kernel'] - 0.1, rtol=1e-6)
  assert set(serialization.to_state_dict(new)) == {
      'step', 'params', 'opt_state', 'batch_stats'}


def test_grads_is_keyword_only_and_bad_kwargs_raise():
  ours, _ = both_states(optax.sgd(0.1))
  grads = jax.tree_util.tree_map(jnp.ones_like, ours.params)
  with pytest.raises(TypeError):
    ours.apply_gradients(grads)  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError):
    ours.apply_gradients(grads=grads, not_a_field=1)
  with pytest.raises(TypeError):
    TrainState.create(apply_fn, make_params(), optax.sgd(0.1))


def test_mismatched_grads_raise_like_flax():
  ours, theirs = both_states(optax.adam(1e-3))
  bad = {'dense': ours.params['dense']}  # 'out' missing
  with pytest.raises(Exception) as flax_error:
    theirs.apply_gradients(grads=bad)
  with pytest.raises(type(flax_error.value)):
    ours.apply_gradients(grads=bad)


def owg_params():
  return {
      'params': make_params(),
      '_overwrite_with_gradient': {'amax_history': jnp.arange(4.0)},
  }


def test_overwrite_with_gradient_create():
  assert train_state.OVERWRITE_WITH_GRADIENT == '_overwrite_with_gradient'
  tx = optax.adam(1e-2)
  ours, theirs = both_states(tx, params=owg_params())
  assert_trees_equal(ours, theirs)
  # The optimizer state covers params['params'] only.
  expected = tx.init(owg_params()['params'])
  assert jax.tree_util.tree_structure(ours.opt_state) == (
      jax.tree_util.tree_structure(expected))


def test_overwrite_with_gradient_apply_gradients_equals_flax():
  tx = optax.adam(1e-2)
  ours, theirs = both_states(tx, params=owg_params())
  for i in range(3):
    x, y = batch(i)
    grads = {
        'params': grad_fn(ours.params['params'], x, y),
        '_overwrite_with_gradient': {'amax_history': jnp.full((4,), i + 10.0)},
    }
    ours = ours.apply_gradients(grads=grads)
    theirs = theirs.apply_gradients(grads=grads)
    assert_trees_equal(ours, theirs)
    assert ours.params['_overwrite_with_gradient'] is (
        grads['_overwrite_with_gradient'])
  assert set(ours.params) == {'params', '_overwrite_with_gradient'}
  assert serialization.to_bytes(ours) == flax_serialization.to_bytes(theirs)


def test_bare_array_params_create_works_but_apply_raises_like_flax():
  tx = optax.sgd(0.5)
  params = jnp.array([1.0, 2.0])
  ours, theirs = both_states(tx, params=params)
  assert_trees_equal(ours, theirs)
  # flax tests `'_overwrite_with_gradient' in grads`, which a jax.Array
  # refuses; lib keeps that behaviour.
  grads = jnp.array([1.0, -1.0])
  with pytest.raises(TypeError):
    theirs.apply_gradients(grads=grads)
  with pytest.raises(TypeError):
    ours.apply_gradients(grads=grads)
