"""Frozen dataclasses that are JAX pytrees and serializable state.

A drop-in for ``flax.struct``::

    >>> from gintrain.lib import struct
    >>> import jax
    >>> class Model(struct.PyTreeNode):
    ...   params: dict
    ...   apply_fn: object = struct.field(pytree_node=False, default=None)
    >>> m = Model(params={'w': 1.0})
    >>> jax.tree_util.tree_leaves(m)
    [1.0]
    >>> m.replace(params={'w': 2.0}).params
    {'w': 2.0}

Fields marked ``pytree_node=False`` are static: they are part of the treedef
(and so of jit's cache key), are not leaves, and are left out of the state dict
that checkpoints store. Unlike flax's, the treedef of a class here never
compares equal to another class's (see ``_register_pytree``)::

    >>> class Other(struct.PyTreeNode):
    ...   params: dict
    ...   apply_fn: object = struct.field(pytree_node=False, default=None)
    >>> (jax.tree_util.tree_structure(Other(params={'w': 1.0})) ==
    ...  jax.tree_util.tree_structure(m))
    False
"""

import dataclasses
from typing import Any, TypeVar

import jax

try:
  from typing import dataclass_transform
except ImportError:  # Python < 3.11: only type checkers miss it
  def dataclass_transform(**unused_kwargs):
    return lambda x: x

from gintrain.lib import serialization

__all__ = ['dataclass', 'field', 'PyTreeNode']

_T = TypeVar('_T')
_MARK = '_flax_dataclass'  # same marker name as flax, so either can detect it


def field(pytree_node: bool = True, *, metadata: dict | None = None, **kwargs):
  """A ``dataclasses.field`` that records whether it is a pytree node.

  Args:
    pytree_node: ``False`` makes the field static (not a leaf, not saved).
    metadata: extra metadata, merged with ``{'pytree_node': pytree_node}``.
    **kwargs: passed to ``dataclasses.field`` (``default``, ``kw_only``, ...).
  """
  return dataclasses.field(
      metadata=(metadata or {}) | {'pytree_node': pytree_node}, **kwargs)


def _register_pytree(clz, data_fields, meta_fields) -> None:
  """Registers ``clz`` as a pytree node: leaves = ``data_fields`` (keyed by
  ``GetAttrKey``, as ``jax.tree_util.register_dataclass`` keys them), static
  = ``meta_fields``; unflattening calls ``clz(**fields)``.

  Not ``jax.tree_util.register_dataclass`` (which flax uses): jax's treedef
  equality ignores the class of a dataclass node (its hash does not), so
  the treedefs of two such classes with the same number of leaves and equal
  static values compare equal, e.g. ``TrainState`` here and flax's. jit's
  caches may then, rarely (a hash-table probe collision), return the output
  structure of one class for an input of the other. A custom node's
  treedef compares its class, so this class's never equals flax's nor
  another class's.
  """
  keys = tuple(jax.tree_util.GetAttrKey(name) for name in data_fields)

  def flatten_with_keys(x):
    return (tuple((key, getattr(x, name))
                  for key, name in zip(keys, data_fields)),
            tuple(getattr(x, name) for name in meta_fields))

  def flatten(x):
    return (tuple(getattr(x, name) for name in data_fields),
            tuple(getattr(x, name) for name in meta_fields))

  def unflatten(meta, children):
    return clz(**dict(zip(data_fields, children)),
               **dict(zip(meta_fields, meta)))

  jax.tree_util.register_pytree_with_keys(
      clz, flatten_with_keys, unflatten, flatten_func=flatten)


@dataclass_transform(field_specifiers=(field,))
def dataclass(clz: _T | None = None, **kwargs) -> _T:
  """Turns ``clz`` into a frozen dataclass registered as a pytree.

  Usable bare (``@dataclass``) or with ``dataclasses.dataclass`` keyword
  arguments (``@dataclass(frozen=False, kw_only=True)``). Frozen unless
  ``frozen=False`` is given. Adds ``replace(**updates)``. Applying it twice is a
  no-op.
  """
  if clz is None:
    return lambda c: dataclass(c, **kwargs)
  if _MARK in clz.__dict__:
    return clz

  kwargs.setdefault('frozen', True)
  data_clz = dataclasses.dataclass(**kwargs)(clz)
  data_fields, meta_fields = [], []
  for f in dataclasses.fields(data_clz):
    if f.metadata.get('pytree_node', True):
      data_fields.append(f.name)
    else:
      meta_fields.append(f.name)

  def replace(self, **updates):
    """Returns a copy of this instance with the given fields replaced."""
    return dataclasses.replace(self, **updates)

  data_clz.replace = replace
  _register_pytree(data_clz, data_fields, meta_fields)

  def to_state_dict(x):
    return {
        name: serialization.to_state_dict(getattr(x, name))
        for name in data_fields
    }

  def from_state_dict(x, state):
    serialization.expect_state_dict(state, x)
    state = dict(state)
    updates = {}
    for name in data_fields:
      if name not in state:
        raise ValueError(
            f'Missing field {name} in state dict while restoring an instance'
            f' of {clz.__name__}, at path {serialization.current_path()}')
      updates[name] = serialization.from_state_dict(
          getattr(x, name), state.pop(name), name=name)
    if state:
      names = ','.join(state.keys())
      raise ValueError(
          f'Unknown field(s) "{names}" in state dict while restoring an'
          f' instance of {clz.__name__} at path'
          f' {serialization.current_path()}')
    return x.replace(**updates)

  serialization.register_serialization_state(
      data_clz, to_state_dict, from_state_dict)
  setattr(data_clz, _MARK, True)
  return data_clz


@dataclass_transform(field_specifiers=(field,))
class PyTreeNode:
  """Base class form of :func:`dataclass`.

  Subclasses are dataclasses; class keyword arguments go to :func:`dataclass`;
  ``typing.Generic`` may be a base too, before or after it::

    >>> class State(PyTreeNode, kw_only=True, frozen=False):
    ...   step: int
    >>> s = State(step=1)
    >>> s.step = 2
    >>> s
    State(step=2)

  ``PyTreeNode`` itself cannot be instantiated (as in flax).
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__()  # lets typing.Generic set __parameters__
    dataclass(cls, **kwargs)

  def __init__(self, *args: Any, **kwargs: Any):
    raise NotImplementedError('PyTreeNode is a base class; subclass it.')

  def replace(self: _T, **overrides) -> _T:
    """Returns a copy with the given fields replaced (set by dataclass)."""
    raise NotImplementedError
