"""lib.struct: flax.struct's dataclasses without flax (flax as an oracle).

Covers flax's struct_test.py cases (frozen errors, replace, slots, static
fields, key-path errors, double decoration, kw_only, metadata, Generic) plus
jit with struct arguments and the state dicts of struct dataclasses.
"""

import dataclasses
from typing import Any, Generic, TypeVar

from flax import serialization as fser
from flax import struct as fstruct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.lib import serialization
from gintrain.lib import struct

T = TypeVar('T')


@struct.dataclass
class Point:
  x: float
  y: float
  meta: Any = struct.field(pytree_node=False)


@fstruct.dataclass
class FlaxPoint:
  x: float
  y: float
  meta: Any = fstruct.field(pytree_node=False)


def test_no_new_attributes():
  p = Point(x=1, y=2, meta={})
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.new_field = 1


def test_frozen_assignment_and_replace():
  p = Point(x=1, y=2, meta={})
  new_p = p.replace(x=3)
  assert new_p == Point(x=3, y=2, meta={})
  assert p.x == 1  # replace copies
  with pytest.raises(dataclasses.FrozenInstanceError,
                     match="cannot assign to field 'y'"):
    p.y = 3
  with pytest.raises(TypeError):
    p.replace(z=1)


def test_slots_mutable():

  @struct.dataclass(frozen=False, slots=True)
  class Slotted:
    a: int
    b: Any = struct.field(pytree_node=False, default=None)

  s = Slotted(1)
  s.a = 2
  assert s.a == 2 and Slotted.__slots__ == ('a', 'b')
  with pytest.raises(AttributeError):
    s.c = 3
  assert jax.tree_util.tree_leaves(s) == [2]
  assert s.replace(a=5) == Slotted(5)
  assert serialization.from_state_dict(s, {'a': 7}) == Slotted(7)


def test_leaves_exclude_static_and_tree_map_keeps_them():
  p = Point(x=1, y=2, meta={'abc': True})
  assert jax.tree_util.tree_leaves(p) == [1, 2]
  new_p = jax.tree_util.tree_map(lambda x: x + x, p)
  assert new_p == Point(x=2, y=4, meta={'abc': True})
  assert new_p.meta is p.meta
  # Same flattening as flax's struct, key paths included.
  fp = FlaxPoint(x=1, y=2, meta={'abc': True})
  paths = [jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
  assert paths == [jax.tree_util.keystr(k)
                   for k, _ in jax.tree_util.tree_flatten_with_path(fp)[0]]
  assert paths == ['.x', '.y']
  # Static fields are part of the treedef.
  assert (jax.tree_util.tree_structure(p) !=
          jax.tree_util.tree_structure(p.replace(meta={})))


def test_prefix_mismatch_error_names_field():
  p = Point(x=jnp.ones(2), y=jnp.ones(2), meta=None)
  with pytest.raises(ValueError, match=r'in_axes\[0\]\.y'):
    jax.vmap(lambda p: p.x, in_axes=(Point(0, [0], meta=None),))(p)


def test_double_decoration_is_a_no_op():

  class A:
    a: int

  assert not hasattr(A, '_flax_dataclass')
  A1 = struct.dataclass(A)
  assert A1._flax_dataclass  # pylint: disable=protected-access
  assert struct.dataclass(A1) is A1
  assert struct.dataclass(frozen=False)(A1) is A1

  @struct.dataclass
  class B(struct.PyTreeNode):  # decorating a PyTreeNode subclass is fine
    b: int

  assert B(1).replace(b=2) == B(2)
  # A class flax.struct already made is left alone too (same marker).
  assert struct.dataclass(FlaxPoint) is FlaxPoint


def test_kw_only():

  @struct.dataclass(kw_only=True)
  class A:
    a: int = 1
    b: int

  assert A(b=2) == A(a=1, b=2)
  with pytest.raises(TypeError):
    A(1, 2)

  class B(struct.PyTreeNode, kw_only=True):
    a: int = 1
    b: int

  assert B(b=2).b == 2

  with pytest.raises(TypeError, match='non-default argument'):

    @struct.dataclass
    class C:  # pylint: disable=unused-variable
      a: int = 1
      b: int

  with pytest.raises(TypeError, match='non-default argument'):

    class D(struct.PyTreeNode):  # pylint: disable=unused-variable
      a: int = 1
      b: int


def test_field_metadata_merged():

  @struct.dataclass
  class A:
    a: int = struct.field(pytree_node=False, metadata={'foo': 'bar'})
    b: int = struct.field(default=3)
    c: list = struct.field(default_factory=list, kw_only=True)

  a_field, b_field, c_field = dataclasses.fields(A)
  assert dict(a_field.metadata) == {'foo': 'bar', 'pytree_node': False}
  assert dict(b_field.metadata) == {'pytree_node': True}
  assert c_field.kw_only and A(1).c == []
  flax_field = fstruct.field(pytree_node=False, metadata={'foo': 'bar'})
  assert dict(flax_field.metadata) == dict(a_field.metadata)


def test_frozen_false():

  @struct.dataclass(frozen=False)
  class A:
    a: int

  class B(struct.PyTreeNode, frozen=False):
    b: int

  a, b = A(1), B(2)
  a.a, b.b = 3, 4
  assert (a.a, b.b) == (3, 4)
  assert jax.tree_util.tree_leaves([a, b]) == [3, 4]


def test_generic_bases_in_either_order():

  class A(struct.PyTreeNode, Generic[T]):
    x: T

  class B(Generic[T], struct.PyTreeNode):
    x: T

  assert A.__parameters__ == B.__parameters__ == (T,)
  for cls in (A, B):
    obj = cls[int](x=1)
    assert type(obj) is cls and obj.replace(x=2).x == 2
    assert jax.tree_util.tree_leaves(obj) == [1]
    assert serialization.to_state_dict(obj) == {'x': 1}

  class C(A[int]):  # subclassing a parameterised generic
    y: int = 0

  c = C(1, 2)
  assert jax.tree_util.tree_leaves(c) == [1, 2] and c.replace(y=5).y == 5
  assert C.__parameters__ == ()

  class D(B[T], Generic[T]):
    z: Any = struct.field(pytree_node=False, default='s')

  assert D[str](x='v').z == 's'


def test_pytreenode_itself_not_instantiable():
  with pytest.raises(NotImplementedError):
    struct.PyTreeNode()
  with pytest.raises(NotImplementedError):
    fstruct.PyTreeNode()


def test_jit_with_struct_argument():
  traces = []

  @jax.jit
  def step(p):
    traces.append(p.meta)
    return p.replace(x=p.x * 2, y=p.y + 1)

  p = Point(x=jnp.arange(3.0), y=jnp.float32(1), meta='a')
  out = step(p)
  assert isinstance(out, Point) and out.meta == 'a'
  np.testing.assert_array_equal(out.x, [0.0, 2.0, 4.0])
  assert float(out.y) == 2.0
  step(out)  # same static field: no retrace
  assert traces == ['a']
  step(p.replace(meta='b'))  # a static field is part of the cache key
  assert traces == ['a', 'b']
  grads = jax.grad(lambda p: jnp.sum(p.x) * p.y)(p)
  assert isinstance(grads, Point) and grads.meta == 'a'
  np.testing.assert_array_equal(grads.x, [1.0, 1.0, 1.0])


def test_state_dict_excludes_static_and_restores():
  p = Point(x=1, y=2, meta={'dummy': True})
  assert serialization.to_state_dict(p) == {'x': 1, 'y': 2}
  assert fser.to_state_dict(FlaxPoint(1, 2, {'dummy': True})) == {'x': 1, 'y': 2}
  restored = serialization.from_state_dict(p, {'x': 3, 'y': 4})
  assert restored == Point(x=3, y=4, meta={'dummy': True})
  with pytest.raises(ValueError, match=r'Unknown field\(s\) "z"'):
    serialization.from_state_dict(p, {'x': 3, 'y': 4, 'z': 3})
  with pytest.raises(ValueError, match='Missing field y'):
    serialization.from_state_dict(p, {'x': 3})
  with pytest.raises(ValueError, match=r'restore a Point at path \.'):
    serialization.from_state_dict(p, 5)


def test_nested_struct_restore_paths():

  class Inner(struct.PyTreeNode):
    w: Any

  class Outer(struct.PyTreeNode):
    inner: Inner
    rest: list

  target = Outer(Inner({'a': 0}), [0, 1])
  encoded = serialization.to_bytes(Outer(Inner({'a': 5}), [6, 7]))
  assert serialization.from_bytes(target, encoded) == Outer(Inner({'a': 5}),
                                                            [6, 7])
  with pytest.raises(ValueError, match=r'at path \./inner/w$'):
    serialization.from_bytes(Outer(Inner({'a': 0, 'b': 0}), [0, 1]), encoded)
  with pytest.raises(ValueError, match=r'got 3 and 2 at path \./rest$'):
    serialization.from_bytes(Outer(Inner({'a': 0}), [0, 1, 2]), encoded)
