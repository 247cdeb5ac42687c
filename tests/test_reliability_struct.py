"""lib.struct treedefs never compare equal across classes (issue 12, item
10): jax's ``register_dataclass`` treedefs do, which let jit's caches return
a lib ``TrainState`` for flax's input now and then."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct as flax_struct
from flax.training import train_state as flax_train_state

from gintrain.lib import struct
from gintrain.lib import train_state


class Point(struct.PyTreeNode):
  x: jax.Array
  tag: str = struct.field(pytree_node=False, default='a')


class Other(struct.PyTreeNode):
  y: jax.Array
  tag: str = struct.field(pytree_node=False, default='a')


@flax_struct.dataclass
class FlaxPoint:
  x: jax.Array
  tag: str = flax_struct.field(pytree_node=False, default='a')


def structure(tree):
  return jax.tree_util.tree_structure(tree)


def test_treedefs_differ_across_classes():
  assert structure(Point(1.0)) != structure(Other(1.0))
  assert structure(Point(1.0)) != structure(FlaxPoint(1.0))
  assert structure(Point(1.0)) == structure(Point(2.0))
  assert structure(Point(1.0)) != structure(Point(1.0, tag='b'))


def test_train_state_treedef_differs_from_flax():
  apply_fn = lambda variables, x: x  # pylint: disable=unnecessary-lambda-assignment
  tx = optax.sgd(0.1)
  params = {'w': jnp.ones(2)}
  ours = train_state.TrainState.create(apply_fn=apply_fn, params=params,
                                       tx=tx)
  theirs = flax_train_state.TrainState.create(apply_fn=apply_fn,
                                              params=params, tx=tx)
  assert structure(ours) != structure(theirs)
  step = jax.jit(lambda s: s.replace(step=s.step + 1))
  for _ in range(20):
    ours, theirs = step(ours), step(theirs)
    assert type(ours) is train_state.TrainState
    assert type(theirs) is flax_train_state.TrainState
  assert int(ours.step) == int(theirs.step) == 20


def test_same_leaves_paths_and_unflatten_as_register_dataclass():
  p = Point(jnp.ones(2), tag='t')
  assert jax.tree_util.tree_flatten_with_path(p)[0] == [
      ((jax.tree_util.GetAttrKey('x'),), p.x)]
  leaves, treedef = jax.tree_util.tree_flatten(p)
  back = jax.tree_util.tree_unflatten(treedef, [jnp.zeros(2)])
  assert type(back) is Point and back.tag == 't'
  assert dataclasses.fields(back) == dataclasses.fields(p)
  flax_paths = jax.tree_util.tree_flatten_with_path(FlaxPoint(p.x, 't'))[0]
  assert [k for k, _ in flax_paths] == [
      k for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
  assert len(leaves) == 1
