"""State dicts and the msgpack wire format of flax checkpoints.

Two layers, as in ``flax.serialization``:

* the **state-dict registry** turns objects (dicts, lists, tuples, namedtuples,
  ``jax.tree_util.Partial``, :mod:`lib.struct` dataclasses, and whatever is
  registered with :func:`register_serialization_state`) into nested dicts with
  string keys, and back into the shape of a *target* object;
* the **msgpack layer** encodes such nested dicts of arrays and scalars into
  bytes that are identical to flax's, and decodes them again.

  >>> import numpy as np
  >>> from lib import serialization
  >>> b = serialization.to_bytes({'w': np.ones(2, np.float32), 'step': 3})
  >>> serialization.from_bytes({'w': np.zeros(2, np.float32), 'step': 0}, b)
  {'w': array([1., 1.], dtype=float32), 'step': 3}

Wire format: arrays are msgpack ExtType 1 holding ``[shape, dtype name,
C-order bytes]``, numpy scalars ExtType 3 (same payload, 0-d), Python complex
ExtType 2. Arrays larger than :data:`MAX_CHUNK_SIZE` bytes are split into a
``{'__msgpack_chunked_array__': True, 'shape': ..., 'chunks': ...}`` dict.
Decoding never executes code.
"""

import contextlib
import enum
import threading
from typing import Any, Callable

import jax
import ml_dtypes
import msgpack
import numpy as np

from lib import errors

__all__ = [
    'MAX_CHUNK_SIZE',
    'current_path',
    'from_state_dict',
    'to_state_dict',
    'register_serialization_state',
    'is_serializable',
    'msgpack_serialize',
    'msgpack_restore',
    'to_bytes',
    'from_bytes',
]

# Arrays with more bytes than this are split into chunks. Read at call time, so
# tests may lower it (flax's tests use 91 * 8).
MAX_CHUNK_SIZE = 2**30

CHUNKED_KEY = '__msgpack_chunked_array__'


# ---------------------------------------------------------------------------
# State-dict registry.


class _ErrorContext(threading.local):
  def __init__(self):
    self.path = []


_error_context = _ErrorContext()


@contextlib.contextmanager
def _record_path(name):
  _error_context.path.append(name)
  try:
    yield
  finally:
    _error_context.path.pop()


def current_path() -> str:
  """The ``/``-joined path of the ``from_state_dict`` call in progress."""
  return '/'.join(_error_context.path)


class _NamedTuple:
  """Registry key shared by all namedtuple types."""


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, '_fields')


def _registry_key(x):
  return _NamedTuple if _is_namedtuple(x) else type(x)


_STATE_DICT_REGISTRY: dict[Any, tuple[Callable, Callable]] = {}


def register_serialization_state(
    ty, ty_to_state_dict: Callable, ty_from_state_dict: Callable,
    override: bool = False):
  """Registers state-dict handlers for the exact type ``ty``.

  Args:
    ty: the type (subclasses are not covered).
    ty_to_state_dict: ``obj -> state`` (a dict with str keys, or a leaf).
    ty_from_state_dict: ``(target, state) -> obj``.
    override: replace an existing handler instead of raising ``ValueError``.
  """
  if ty in _STATE_DICT_REGISTRY and not override:
    raise ValueError(
        f'a serialization handler for "{ty.__name__}" is already registered')
  _STATE_DICT_REGISTRY[ty] = (ty_to_state_dict, ty_from_state_dict)


def is_serializable(target) -> bool:
  """Whether ``target`` (an object or a type) has state-dict handlers."""
  if not isinstance(target, type):
    target = type(target)
  return target in _STATE_DICT_REGISTRY


def to_state_dict(target) -> Any:
  """Returns the state dict of ``target``; unregistered objects are leaves."""
  ty = _registry_key(target)
  if ty not in _STATE_DICT_REGISTRY:
    return target
  state = _STATE_DICT_REGISTRY[ty][0](target)
  if isinstance(state, dict):
    for key in state:
      assert isinstance(key, str), 'A state dict must only have string keys.'
  return state


def from_state_dict(target, state, name: str = '.'):
  """Rebuilds an object shaped like ``target`` from ``state``.

  Unregistered targets are leaves: ``state`` is returned as it is (no shape or
  dtype check). Mismatches raise ``ValueError`` naming the path, e.g. ``./a/0``.
  """
  ty = _registry_key(target)
  if ty not in _STATE_DICT_REGISTRY:
    return state
  with _record_path(name):
    return _STATE_DICT_REGISTRY[ty][1](target, state)


def _dict_state_dict(xs: dict) -> dict[str, Any]:
  str_keys = {str(k) for k in xs}
  if len(str_keys) != len(xs):
    raise ValueError(
        'Dict keys do not have a unique string representation:'
        f' {str_keys} vs given: {list(xs)}')
  return {str(k): to_state_dict(v) for k, v in xs.items()}


def _restore_dict(xs: dict, states: dict) -> dict:
  missing = {str(k) for k in xs}.difference(states.keys())
  if missing:
    raise ValueError(
        'The target dict keys and state dict keys do not match, target dict'
        f' contains keys {missing} which are not present in state dict at'
        f' path {current_path()}')
  return {
      k: from_state_dict(v, states[str(k)], name=str(k)) for k, v in xs.items()
  }


def _list_state_dict(xs) -> dict[str, Any]:
  return {str(i): to_state_dict(x) for i, x in enumerate(xs)}


def _restore_list(xs, states: dict) -> list:
  if len(states) != len(xs):
    raise ValueError(
        'The size of the list and the state dict do not match, got'
        f' {len(xs)} and {len(states)} at path {current_path()}')
  return [
      from_state_dict(xs[i], states[str(i)], name=str(i))
      for i in range(len(states))
  ]


def _namedtuple_state_dict(nt) -> dict[str, Any]:
  return {k: to_state_dict(getattr(nt, k)) for k in nt._fields}


def _restore_namedtuple(xs, states: dict):
  if set(states.keys()) == {'name', 'fields', 'values'}:  # legacy layout
    states = {
        states['fields'][str(i)]: states['values'][str(i)]
        for i in range(len(states['fields']))
    }
  state_keys, fields = set(states.keys()), set(xs._fields)
  if state_keys != fields:
    raise ValueError(
        'The field names of the state dict and the named tuple do not match,'
        f' got {state_keys} and {fields} at path {current_path()}')
  return type(xs)(**{
      k: from_state_dict(getattr(xs, k), v, name=k) for k, v in states.items()
  })


def _partial_state_dict(p):
  return {
      'args': to_state_dict(p.args), 'keywords': to_state_dict(p.keywords)}


def _restore_partial(p, states):
  args = from_state_dict(p.args, states['args'])
  keywords = from_state_dict(p.keywords, states['keywords'])
  return jax.tree_util.Partial(p.func, *args, **keywords)


register_serialization_state(dict, _dict_state_dict, _restore_dict)
register_serialization_state(list, _list_state_dict, _restore_list)
register_serialization_state(
    tuple, _list_state_dict, lambda xs, s: tuple(_restore_list(xs, s)))
register_serialization_state(
    _NamedTuple, _namedtuple_state_dict, _restore_namedtuple)
register_serialization_state(
    jax.tree_util.Partial, _partial_state_dict, _restore_partial)


# ---------------------------------------------------------------------------
# msgpack encoding.


class _ExtType(enum.IntEnum):
  ndarray = 1
  native_complex = 2
  npscalar = 3


def _as_little_endian(arr: np.ndarray) -> np.ndarray:
  """Big-endian arrays are stored little-endian (flax stores them unswapped)."""
  if arr.dtype.byteorder == '>':
    return arr.astype(arr.dtype.newbyteorder('<'))
  return arr


def _check_dtype(dtype: np.dtype):
  if dtype.hasobject or dtype.isalignedstruct:
    raise ValueError(
        f'Arrays of dtype {dtype} cannot be serialized: object and structured'
        ' dtypes are not supported.')


def array_header(shape, dtype: np.dtype) -> tuple[bytes, int]:
  """Encodes everything of an ExtType-1 array before its raw data bytes.

  Returns ``(header, nbytes)``: ``header + arr.tobytes('C')`` is exactly the
  ext payload that :func:`to_bytes` writes for ``arr``. Lets a writer stream
  the data buffer instead of copying it into one bytes object.
  """
  _check_dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  packer = msgpack.Packer(use_bin_type=True)
  head = (packer.pack_array_header(3) + packer.pack(tuple(shape)) +
          packer.pack(dtype.name) + packer.pack_bin_header(nbytes))
  return head, nbytes


def _ndarray_to_bytes(arr) -> bytes:
  if isinstance(arr, jax.Array):
    arr = np.asarray(arr)
  _check_dtype(arr.dtype)
  arr = _as_little_endian(arr)
  return msgpack.packb(
      (arr.shape, arr.dtype.name, arr.tobytes('C')), use_bin_type=True)


def dtype_from_name(name: str | bytes) -> np.dtype:
  """The dtype for a stored dtype name, incl. bfloat16 and ml_dtypes names."""
  if isinstance(name, bytes):
    name = name.decode('ascii')
  try:
    return np.dtype(name)
  except TypeError:
    ml_type = getattr(ml_dtypes, name, None)
    if ml_type is None:
      raise ValueError(f'unknown array dtype name {name!r}') from None
    return np.dtype(ml_type)


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  dtype = dtype_from_name(dtype_name)
  return np.frombuffer(buffer, dtype=dtype).reshape(shape, order='C')


def _msgpack_ext_pack(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return msgpack.ExtType(_ExtType.ndarray, _ndarray_to_bytes(x))
  if isinstance(x, np.generic):
    return msgpack.ExtType(_ExtType.npscalar, _ndarray_to_bytes(np.asarray(x)))
  if isinstance(x, complex):
    return msgpack.ExtType(
        _ExtType.native_complex, msgpack.packb((x.real, x.imag)))
  return x


def _msgpack_ext_unpack(code, data):
  if code == _ExtType.ndarray:
    return _ndarray_from_bytes(data)
  if code == _ExtType.native_complex:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  if code == _ExtType.npscalar:
    return _ndarray_from_bytes(data)[()]
  return msgpack.ExtType(code, data)


def _np_convert_in_place(d):
  """jax.Arrays in nested dicts (and a bare top-level one) -> numpy."""
  if isinstance(d, dict):
    for k, v in d.items():
      if isinstance(v, jax.Array):
        d[k] = np.array(v)
      elif isinstance(v, dict):
        _np_convert_in_place(v)
  elif isinstance(d, jax.Array):
    return np.array(d)
  return d


def _tuple_to_dict(tpl) -> dict[str, Any]:
  return {str(i): x for i, x in enumerate(tpl)}


def _dict_to_tuple(dct) -> tuple:
  return tuple(dct[str(i)] for i in range(len(dct)))


def needs_chunking(arr: np.ndarray) -> bool:
  """Whether ``arr`` is stored as chunks (more than MAX_CHUNK_SIZE bytes)."""
  return arr.size * arr.dtype.itemsize > MAX_CHUNK_SIZE


def chunk(arr: np.ndarray) -> dict[str, Any]:
  """The chunked-array dict of ``arr``; chunks are views where possible."""
  chunksize = max(1, int(MAX_CHUNK_SIZE / arr.dtype.itemsize))
  flat = arr.reshape(-1)
  chunks = [flat[i:i + chunksize] for i in range(0, flat.size, chunksize)]
  return {
      CHUNKED_KEY: True,
      'shape': _tuple_to_dict(arr.shape),
      'chunks': _tuple_to_dict(chunks),
  }


def _unchunk(data: dict) -> np.ndarray:
  shape = _dict_to_tuple(data['shape'])
  return np.concatenate(_dict_to_tuple(data['chunks'])).reshape(shape)


def _chunk_array_leaves_in_place(d):
  if isinstance(d, dict):
    for k, v in d.items():
      if isinstance(v, np.ndarray):
        if needs_chunking(v):
          d[k] = chunk(v)
      elif isinstance(v, dict):
        _chunk_array_leaves_in_place(v)
  elif isinstance(d, np.ndarray) and needs_chunking(d):
    return chunk(d)
  return d


def unchunk_array_leaves_in_place(d):
  """Replaces every chunked-array dict in nested dicts by its array."""
  if isinstance(d, dict):
    if CHUNKED_KEY in d:
      return _unchunk(d)
    for k, v in d.items():
      if isinstance(v, dict):
        d[k] = unchunk_array_leaves_in_place(v)
  return d


def _find_unserializable(tree, path='') -> tuple[str, Any] | None:
  """The first leaf msgpack cannot encode, as (path, leaf), or None."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      found = _find_unserializable(v, f'{path}/{k}')
      if found:
        return found
    return None
  if type(tree) is list:
    for i, v in enumerate(tree):
      found = _find_unserializable(v, f'{path}/{i}')
      if found:
        return found
    return None
  if type(tree) in (str, bytes, int, float, bool, type(None), complex):
    return None
  if isinstance(tree, (np.ndarray, jax.Array, np.generic)):
    return None
  return (path or '/', tree)


def _pack(tree) -> bytes:
  try:
    return msgpack.packb(tree, default=_msgpack_ext_pack, strict_types=True)
  except TypeError as e:
    found = _find_unserializable(tree)
    if found is None:
      raise
    path, leaf = found
    raise TypeError(
        f'Cannot serialize the leaf at {path}: a {type(leaf).__name__}'
        f' ({e}). Leaves must be arrays, numpy scalars, str, bytes, int,'
        ' float, bool, complex or None; register other types with'
        ' register_serialization_state.') from e


def msgpack_serialize(pytree, in_place: bool = False) -> bytes:
  """Encodes a nested dict of arrays and scalars as flax-compatible msgpack.

  Args:
    pytree: nested dicts (with str keys), lists, arrays, scalars. Tuples are
      not allowed here; use :func:`to_bytes` for arbitrary registered objects.
    in_place: if False (default) the tree is first copied with
      ``jax.tree_util.tree_map``, which sorts dict keys; if True, ``pytree``'s
      dicts are modified (jax.Arrays become numpy, large arrays chunked) and
      their order is kept.
  """
  if not in_place:
    pytree = jax.tree_util.tree_map(lambda x: x, pytree)
  pytree = _np_convert_in_place(pytree)
  pytree = _chunk_array_leaves_in_place(pytree)
  return _pack(pytree)


def msgpack_restore(encoded_pytree: bytes):
  """Decodes msgpack bytes into nested dicts of numpy arrays and scalars.

  Raises:
    lib.errors.MsgpackDecodeError: the bytes are truncated or not a valid
      encoding (it is also a ``ValueError``).
  """
  try:
    state = msgpack.unpackb(
        encoded_pytree, ext_hook=_msgpack_ext_unpack, raw=False,
        strict_map_key=False)
    return unchunk_array_leaves_in_place(state)
  except (msgpack.UnpackException, ValueError, TypeError, KeyError,
          IndexError) as e:
    raise errors.MsgpackDecodeError(f'{type(e).__name__}: {e}') from e


def to_bytes(target) -> bytes:
  """Serializes ``target`` via its state dict (dict order is kept)."""
  return msgpack_serialize(to_state_dict(target), in_place=True)


def from_bytes(target, encoded_bytes: bytes):
  """Restores bytes from :func:`to_bytes` into the structure of ``target``."""
  return from_state_dict(target, msgpack_restore(encoded_bytes))
