"""State dicts and the msgpack wire format of flax checkpoints.

Two layers, as in ``flax.serialization``:

* the **state-dict registry** turns objects (dicts, lists, tuples, namedtuples,
  ``jax.tree_util.Partial``, :mod:`lib.struct` dataclasses, flax's
  ``FrozenDict`` when flax is in use, and whatever is registered with
  :func:`register_serialization_state`) into nested dicts with string keys,
  and back into the shape of a *target* object;
* the **msgpack layer** encodes such nested dicts of arrays and scalars into
  bytes that are identical to flax's, and decodes them again.

  >>> import numpy as np
  >>> from gintrain.lib import serialization
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
import re
import sys
import threading
from typing import Any, Callable

import jax
import ml_dtypes
import msgpack
import numpy as np

from gintrain.lib import errors

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


_FROZEN_DICT_MODULE = 'flax.core.frozen_dict'


def _handlers(ty) -> tuple[Callable, Callable] | None:
  """The ``(to, from)`` state-dict handlers of the registry key ``ty``.

  flax's ``FrozenDict`` is registered here on first sight (only a program that
  imported flax can hand us one; this module never imports flax), with
  handlers that behave as flax's own: it saves as a dict, and restores into a
  ``FrozenDict``. A handler the user registered for it first is kept.
  """
  handlers = _STATE_DICT_REGISTRY.get(ty)
  if (handlers is None and
      getattr(ty, '__module__', None) == _FROZEN_DICT_MODULE and
      ty is getattr(sys.modules.get(ty.__module__), 'FrozenDict', None)):
    handlers = _STATE_DICT_REGISTRY.setdefault(
        ty, (_dict_state_dict, _restore_frozen_dict))
  return handlers


def is_serializable(target) -> bool:
  """Whether ``target`` (an object or a type) has state-dict handlers."""
  if not isinstance(target, type):
    target = type(target)
  return _handlers(target) is not None


def to_state_dict(target) -> Any:
  """Returns the state dict of ``target``; unregistered objects are leaves."""
  handlers = _handlers(_registry_key(target))
  if handlers is None:
    return target
  state = handlers[0](target)
  if isinstance(state, dict):
    for key in state:
      assert isinstance(key, str), 'A state dict must only have string keys.'
  return state


def from_state_dict(target, state, name: str = '.'):
  """Rebuilds an object shaped like ``target`` from ``state``.

  Unregistered targets are leaves: ``state`` is returned as it is (no shape or
  dtype check). Mismatches raise ``ValueError`` naming the path, e.g. ``./a/0``.
  """
  handlers = _handlers(_registry_key(target))
  if handlers is None:
    return state
  with _record_path(name):
    return handlers[1](target, state)


def expect_state_dict(state, target) -> None:
  """Raises ``ValueError`` naming the path unless ``state`` is a dict.

  For ``from_state_dict`` handlers whose state must be a dict (a checkpoint
  that holds a leaf where the target has a container is not restorable).
  """
  if not isinstance(state, dict):
    raise ValueError(
        f'Expected a state dict (a dict) to restore a {type(target).__name__}'
        f' at path {current_path()}, got a {type(state).__name__}: the'
        ' checkpoint has a leaf where the target has a container.')


def _dict_state_dict(xs) -> dict[str, Any]:
  str_keys = {str(k) for k in xs}
  if len(str_keys) != len(xs):
    raise ValueError(
        'Dict keys do not have a unique string representation:'
        f' {str_keys} vs given: {list(xs)}')
  return {str(k): to_state_dict(v) for k, v in xs.items()}


def _restore_dict(xs, states: dict) -> dict:
  expect_state_dict(states, xs)
  missing = {str(k) for k in xs}.difference(states.keys())
  if missing:
    raise ValueError(
        'The target dict keys and state dict keys do not match, target dict'
        f' contains keys {missing} which are not present in state dict at'
        f' path {current_path()}')
  return {
      k: from_state_dict(v, states[str(k)], name=str(k)) for k, v in xs.items()
  }


def _restore_frozen_dict(xs, states: dict):
  """Restores a flax ``FrozenDict`` (of the target's own class)."""
  return type(xs)(_restore_dict(xs, states))


def _list_state_dict(xs) -> dict[str, Any]:
  return {str(i): to_state_dict(x) for i, x in enumerate(xs)}


def _restore_list(xs, states: dict) -> list:
  expect_state_dict(states, xs)
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
  expect_state_dict(states, xs)
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
  expect_state_dict(states, p)
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
  """Non-native (big-endian) arrays as little-endian copies; others as is.

  The wire format stores only ``dtype.name``, which has no byte order, so the
  data must be little-endian to restore correctly (flax writes big-endian data
  unswapped, which restores as garbage). Streaming writers that use
  :func:`array_header` must pass their arrays through this first.
  """
  if not arr.dtype.isnative:
    return _zero_padding(arr.astype(arr.dtype.newbyteorder('<')))
  return arr


# x86's long double (numpy's longdouble/clongdouble there) holds 10 bytes of
# x87 extended precision in a 16-byte slot. numpy leaves the other 6 bytes as
# whatever the allocation held whenever it converts a value (a scalar to an
# array, a byte swap, ``astype``): two saves of one scalar differed, and heap
# contents leaked into the file. Copies made here for writing get those bytes
# zeroed; an array's own bytes are written as its memory holds them (the same
# on every save, and flax's bytes).
_LONGDOUBLE_VALUE_BYTES = (10 if np.finfo(np.longdouble).nmant == 63
                           and np.dtype(np.longdouble).itemsize > 10 else 0)


def _zero_padding(arr: np.ndarray) -> np.ndarray:
  """Zeroes the padding of a private, native ``arr`` of long doubles."""
  dtype = arr.dtype
  if (_LONGDOUBLE_VALUE_BYTES and arr.size and
      dtype.kind in 'fc' and dtype.base in (np.dtype(np.longdouble),
                                            np.dtype(np.clongdouble))):
    slots = arr.reshape(-1).view(np.uint8).reshape(
        -1, np.dtype(np.longdouble).itemsize)
    slots[:, _LONGDOUBLE_VALUE_BYTES:] = 0
  return arr


def _scalar_as_array(x: np.generic) -> np.ndarray:
  """A numpy scalar as a 0-d array whose every byte is defined."""
  return _zero_padding(np.array(x))


def _check_dtype(dtype: np.dtype):
  if dtype.hasobject or dtype.isalignedstruct:
    raise ValueError(
        f'Arrays of dtype {dtype} cannot be serialized: object and aligned'
        ' structured dtypes are not supported.')


def array_header(shape, dtype: np.dtype) -> tuple[bytes, int]:
  """Encodes everything of an ExtType-1 array before its raw data bytes.

  Returns ``(header, nbytes)``: ``header + arr.tobytes('C')`` is exactly the
  ext payload that :func:`to_bytes` writes for a little-endian ``arr`` (see
  :func:`_as_little_endian`). Lets a writer stream the data buffer instead of
  copying it into one bytes object.

    >>> arr = np.arange(3, dtype=np.int16)
    >>> head, nbytes = array_header(arr.shape, arr.dtype)
    >>> head + arr.tobytes() == _ndarray_to_bytes(arr), nbytes
    (True, 6)
  """
  dtype = np.dtype(dtype)
  _check_dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  packer = msgpack.Packer(use_bin_type=True)
  head = (packer.pack_array_header(3) + packer.pack(tuple(shape)) +
          packer.pack(dtype.name) + _bin_header(nbytes))
  return head, nbytes


def _bin_header(nbytes: int) -> bytes:
  """The msgpack bin 8/16/32 header msgpack itself writes for ``nbytes``."""
  if nbytes < 2**8:
    return b'\xc4' + nbytes.to_bytes(1, 'big')
  if nbytes < 2**16:
    return b'\xc5' + nbytes.to_bytes(2, 'big')
  if nbytes < 2**32:
    return b'\xc6' + nbytes.to_bytes(4, 'big')
  raise ValueError(
      f'An array of {nbytes} bytes does not fit one msgpack bin (4 GiB);'
      ' keep MAX_CHUNK_SIZE below that so it is chunked.')


def _ndarray_to_bytes(arr) -> bytes:
  if isinstance(arr, jax.Array):
    arr = np.asarray(arr)
  _check_dtype(arr.dtype)
  arr = _as_little_endian(arr)
  return msgpack.packb(
      (arr.shape, arr.dtype.name, arr.tobytes('C')), use_bin_type=True)


_SIZED_DTYPE_NAME = re.compile(r'(bytes|str|void)([0-9]{1,12})')


def dtype_from_name(name: str | bytes) -> np.dtype:
  """The dtype for a stored dtype name, incl. bfloat16 and ml_dtypes names.

    >>> dtype_from_name(b'bfloat16'), dtype_from_name('float8_e4m3fn')
    (dtype(bfloat16), dtype(float8_e4m3fn))

  Also the names numpy gives fixed-size string and void dtypes, which
  ``np.dtype`` itself does not parse (flax cannot restore these arrays;
  structured arrays come back as raw records):

    >>> dtype_from_name('bytes24'), dtype_from_name('str64')
    (dtype('S3'), dtype('<U2'))

  Raises:
    ValueError: the name is not a dtype, or names an object dtype (which
      could not be restored from raw bytes).
  """
  if isinstance(name, bytes):
    name = name.decode('ascii', errors='backslashreplace')
  if not isinstance(name, str):
    raise ValueError(f'the dtype name is not a str but {type(name).__name__}')
  sized = _SIZED_DTYPE_NAME.fullmatch(name)
  if sized:  # numpy writes these names but does not parse them
    kind, bits = sized.group(1), int(sized.group(2))
    char, unit = {'bytes': ('S', 8), 'str': ('U', 32), 'void': ('V', 8)}[kind]
    if bits % unit:
      raise ValueError(f'bad size in array dtype name {name!r}')
    name = f'{char}{bits // unit}'
  try:
    dtype = np.dtype(name)
  except TypeError:
    ml_type = getattr(ml_dtypes, name, None)
    if not (isinstance(ml_type, type) and issubclass(ml_type, np.generic)):
      raise ValueError(f'unknown array dtype name {name!r}') from None
    dtype = np.dtype(ml_type)
  if dtype.hasobject:
    raise ValueError(f'object dtype {name!r} cannot be restored')
  return dtype


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  """Decodes an ExtType-1/3 payload; ValueError (with the cause) if corrupt.

  The array is read-only and C-ordered, and is a view of the payload's data
  bytes. An array of the usual layout (non-negative int dims, a plain dtype,
  data of the exact size) is one ndarray object on those bytes; other payloads
  are decoded as flax does (``frombuffer(...).reshape(shape)``, e.g. a ``-1``
  dim is inferred), which builds a second ndarray object.
  """
  try:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    dtype = dtype_from_name(dtype_name)
    if (_is_plain_shape(shape) and dtype.subdtype is None and
        dtype.itemsize and isinstance(buffer, bytes) and
        len(buffer) == _prod(shape) * dtype.itemsize):
      return np.ndarray(shape, dtype, buffer=buffer)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order='C')
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    raise ValueError(f'invalid array payload: {_describe(e)}') from e


def _is_plain_shape(shape) -> bool:
  """A list of non-negative ints (not bools), as to_bytes writes shapes."""
  # pylint: disable-next=unidiomatic-typecheck
  return type(shape) is list and all(type(d) is int and d >= 0 for d in shape)


def _prod(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


def _msgpack_ext_pack(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return msgpack.ExtType(_ExtType.ndarray, _ndarray_to_bytes(x))
  if isinstance(x, np.generic):
    return msgpack.ExtType(_ExtType.npscalar,
                           _ndarray_to_bytes(_scalar_as_array(x)))
  if isinstance(x, complex):
    return msgpack.ExtType(
        _ExtType.native_complex, msgpack.packb((x.real, x.imag)))
  return x


def _msgpack_ext_unpack(code, data):
  """msgpack ``ext_hook``; raises ValueError for a corrupt payload."""
  if code == _ExtType.ndarray:
    return _ndarray_from_bytes(data)
  if code == _ExtType.native_complex:
    try:
      real, imag = msgpack.unpackb(data)
      return complex(real, imag)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
      raise ValueError(f'invalid complex payload: {_describe(e)}') from e
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
  """The chunked-array dict of ``arr``; chunks are views where possible.

    >>> import gintrain.lib.serialization as s
    >>> old, s.MAX_CHUNK_SIZE = s.MAX_CHUNK_SIZE, 16
    >>> c = s.chunk(np.arange(5.))
    >>> s.MAX_CHUNK_SIZE = old
    >>> c['shape'], [len(x) for x in c['chunks'].values()]
    ({'0': 5}, [2, 2, 1])
  """
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


def _path_str(keys) -> str:
  return '/'.join(['.', *map(str, keys)])


def _unchunk_at(data: dict, keys) -> np.ndarray:
  try:
    return _unchunk(data)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(
        f'at {_path_str(keys)}, invalid chunked array: {_describe(e)}'
    ) from e


def unchunk_array_leaves_in_place(d):
  """Replaces every chunked-array dict in nested dicts by its array.

  Only dicts are walked (as flax does); the walk is iterative, so any depth
  msgpack can decode works. A corrupt chunked dict raises ``ValueError``
  naming its path.
  """
  if not isinstance(d, dict):
    return d
  if CHUNKED_KEY in d:
    return _unchunk_at(d, ())
  stack = [(d, ())]
  while stack:
    node, keys = stack.pop()
    for k, v in node.items():
      if isinstance(v, dict):
        if CHUNKED_KEY in v:
          node[k] = _unchunk_at(v, (*keys, k))
        else:
          stack.append((v, (*keys, k)))
  return d


# ---------------------------------------------------------------------------
# Error reporting: find the place in a tree that made msgpack fail.

_NATIVE_LEAVES = (str, bytes, float, bool, type(None), complex)
_INT_RANGE = (-2**63, 2**64 - 1)


def _leaf_problem(x) -> type[Exception] | None:
  """The exception msgpack raises for a leaf (not a dict/list), if any."""
  if type(x) is int:
    return None if _INT_RANGE[0] <= x <= _INT_RANGE[1] else OverflowError
  if type(x) in _NATIVE_LEAVES:
    return None
  if isinstance(x, (np.ndarray, jax.Array, np.generic)):
    dtype = np.dtype(x.dtype)
    return ValueError if dtype.hasobject or dtype.isalignedstruct else None
  return TypeError


def _find_unpackable(tree, exc_type):
  """``(path, what)`` of the first part of ``tree`` raising ``exc_type``."""
  stack = [(tree, ())]
  while stack:
    node, keys = stack.pop()
    if type(node) is dict:
      for k, v in reversed(node.items()):
        if _leaf_problem(k) is exc_type:
          return _path_str(keys), f'the dict key {k!r}'
        stack.append((v, (*keys, k)))
    elif type(node) is list:
      stack.extend((v, (*keys, i)) for i, v in reversed(list(enumerate(node))))
    elif _leaf_problem(node) is exc_type:
      return _path_str(keys), f'a {type(node).__name__}'
  return None


def _pack(tree) -> bytes:
  try:
    return msgpack.packb(tree, default=_msgpack_ext_pack, strict_types=True)
  except (TypeError, ValueError, OverflowError) as e:
    found = _find_unpackable(tree, type(e))
    if found is None:
      raise
    path, what = found
    raise type(e)(
        f'Cannot serialize {what} at {path}: {e}. Leaves must be arrays'
        ' (not of object dtype), numpy scalars, str, bytes, int (64-bit),'
        ' float, bool, complex or None, in exact dicts and lists; convert'
        ' other objects with to_state_dict / register_serialization_state.'
    ) from e


def msgpack_serialize(pytree, in_place: bool = False) -> bytes:
  """Encodes a nested dict of arrays and scalars as flax-compatible msgpack.

  Args:
    pytree: nested dicts (with str keys), lists, arrays, scalars. Tuples are
      not allowed here; use :func:`to_bytes` for arbitrary registered objects.
    in_place: if False (default) the tree is first copied with
      ``jax.tree_util.tree_map``, which sorts dict keys; if True, ``pytree``'s
      dicts are modified (jax.Arrays become numpy, large arrays chunked) and
      their order is kept.

  Raises:
    TypeError: a leaf msgpack cannot encode (the message names its path).
    ValueError: an array of object or aligned structured dtype.
    OverflowError: an int outside the 64-bit range.
  """
  if not in_place:
    pytree = jax.tree_util.tree_map(lambda x: x, pytree)
  pytree = _np_convert_in_place(pytree)
  pytree = _chunk_array_leaves_in_place(pytree)
  return _pack(pytree)


class _Undecodable:
  """Stands in for an ext payload that failed to decode, to find its path."""

  def __init__(self, reason: str):
    self.reason = reason


def _find_undecodable(tree) -> str:
  stack = [(tree, ())]
  while stack:
    node, keys = stack.pop()
    if isinstance(node, _Undecodable):
      return f'at {_path_str(keys)}, {node.reason}'
    if isinstance(node, dict):
      for k, v in node.items():
        if isinstance(k, _Undecodable):
          return f'in a dict key at {_path_str(keys)}, {k.reason}'
        stack.append((v, (*keys, k)))
    elif isinstance(node, list):
      stack.extend((v, (*keys, i)) for i, v in enumerate(node))
  return 'a value is corrupt'


_UNPACK_REASONS = {
    'FormatError': 'invalid msgpack type byte',
    'StackError': 'nesting deeper than msgpack allows',
    'ExtraData': 'extra bytes after the end of the encoded tree',
    'OutOfData': 'the input ends early (truncated)',
}


def _describe(e: BaseException) -> str:
  """A one-line cause for an error (msgpack's own are often blank)."""
  name = type(e).__name__
  text = str(e).strip()
  if name in _UNPACK_REASONS:
    return f'{_UNPACK_REASONS[name]}' + (f': {text}' if text else '')
  if 'incomplete input' in text:
    return 'the input ends early (truncated)'
  if isinstance(e, KeyError):
    return f'missing key {text}'
  if type(e) is ValueError and text:
    return text
  return f'{name}: {text}' if text else name


# The memory msgpack_restore may spend on Python objects beyond the file's own
# bytes: max(DECODE_OVERHEAD_MIN, DECODE_OVERHEAD_FACTOR * file size). Read at
# call time; DECODE_OVERHEAD_FACTOR = None turns the check off.
DECODE_OVERHEAD_FACTOR = 4
DECODE_OVERHEAD_MIN = 64 * 2**20

# An ndarray object and the bytes object holding its data, without the data.
_ARRAY_OVERHEAD = sys.getsizeof(np.ndarray((), np.uint8)) + sys.getsizeof(b'')
# Payloads of at most this many bytes are looked up among the empty arrays
# already decoded (an empty array's payload is its shape and dtype name); at
# most _MAX_SHARED_EMPTIES distinct ones are kept per decode.
_MAX_EMPTY_PAYLOAD = 256
_MAX_SHARED_EMPTIES = 4096


class _TooManyObjects(Exception):
  """Raised by the decoding hooks when the overhead budget is spent."""


class _DecodeBudget:
  """Counts the memory of the objects a decode builds, as msgpack's hooks.

  Each dict, list, array and other ext value is charged its size without the
  data it holds (an array's data is part of the file's size already). Equal
  empty arrays (the first ``_MAX_SHARED_EMPTIES`` distinct ones) are decoded
  once and shared: they hold no data, and are read-only (as all decoded
  arrays), so only identity tells them apart. Scalars (str, int, float, ...)
  are not counted.
  """

  def __init__(self, nbytes: int):
    factor = DECODE_OVERHEAD_FACTOR
    self.limit = (None if factor is None else
                  max(DECODE_OVERHEAD_MIN, int(factor * nbytes)))
    self.used = 0
    self.nbytes = nbytes
    self.counts = {'arrays': 0, 'dicts': 0, 'lists': 0, 'other values': 0}
    self.empties = {}  # ext payload -> the shared empty array
    self.failed = False

  def _charge(self, kind: str, size: int):
    self.counts[kind] += 1
    self.used += size
    if self.limit is not None and self.used > self.limit:
      counts = ', '.join(f'{n} {kind}' for kind, n in self.counts.items())
      raise _TooManyObjects(
          f'{self.nbytes} bytes of input would take more than {self.limit}'
          f' bytes of memory for Python objects ({counts} so far), more than'
          f' DECODE_OVERHEAD_FACTOR={DECODE_OVERHEAD_FACTOR} times the input'
          ' or DECODE_OVERHEAD_MIN: a crafted or corrupt file (raise'
          ' lib.serialization.DECODE_OVERHEAD_FACTOR to load it anyway)')

  def dict_hook(self, d: dict) -> dict:
    self._charge('dicts', sys.getsizeof(d))
    return d

  def list_hook(self, xs: list) -> list:
    self._charge('lists', sys.getsizeof(xs))
    return xs

  def ext_hook(self, code: int, data: bytes):
    key = (code, data) if len(data) <= _MAX_EMPTY_PAYLOAD else None
    if key is not None and key in self.empties:
      return self.empties[key]
    try:
      value = _msgpack_ext_unpack(code, data)
    except ValueError as e:
      self.failed = True
      return _Undecodable(str(e))
    if isinstance(value, np.ndarray):
      self._charge('arrays', _ARRAY_OVERHEAD + 16 * value.ndim)
      if (key is not None and value.size == 0 and
          len(self.empties) < _MAX_SHARED_EMPTIES):
        self.empties[key] = value
    else:
      self._charge('other values', sys.getsizeof(value))
    return value


def msgpack_restore(encoded_pytree: bytes):
  """Decodes msgpack bytes into nested dicts of numpy arrays and scalars.

  Never executes code: only msgpack values, arrays of non-object dtypes,
  numpy scalars and complex numbers are built. Arrays are read-only views of
  their data (except chunked ones); equal empty arrays are one shared object.

    >>> msgpack_restore(msgpack_serialize({'a': [1, 2.5], 'b': 1j}))
    {'a': [1, 2.5], 'b': 1j}

  Memory is bounded: the arrays, dicts, lists and ext values built may take
  at most ``max(DECODE_OVERHEAD_MIN, DECODE_OVERHEAD_FACTOR * len(bytes))``
  bytes beyond their data (64 MiB or 4x the input by default), so a small
  crafted file of millions of tiny arrays or empty dicts cannot take
  gigabytes. Real checkpoints stay far below it (a few hundred bytes per
  array).

  Raises:
    gintrain.lib.errors.MsgpackDecodeError: the bytes are truncated or not a
      valid encoding, or would exceed the memory bound (it is also a
      ``ValueError``); the message names the path of a corrupt array where
      there is one.
    TypeError: ``encoded_pytree`` is not a bytes-like object.
  """
  try:
    nbytes = memoryview(encoded_pytree).nbytes
  except TypeError:
    raise TypeError(
        'msgpack_restore needs bytes, got a'
        f' {type(encoded_pytree).__name__}') from None
  budget = _DecodeBudget(nbytes)
  try:
    state = msgpack.unpackb(
        encoded_pytree, ext_hook=budget.ext_hook, object_hook=budget.dict_hook,
        list_hook=budget.list_hook, raw=False, strict_map_key=False)
  except _TooManyObjects as e:
    raise errors.MsgpackDecodeError(str(e)) from None
  except (msgpack.UnpackException, ValueError, TypeError) as e:
    raise errors.MsgpackDecodeError(_describe(e)) from e
  failed = budget.failed
  if failed:
    raise errors.MsgpackDecodeError(_find_undecodable(state))
  try:
    return unchunk_array_leaves_in_place(state)
  except ValueError as e:
    raise errors.MsgpackDecodeError(str(e)) from e


def to_bytes(target) -> bytes:
  """Serializes ``target`` via its state dict (dict order is kept)."""
  return msgpack_serialize(to_state_dict(target), in_place=True)


def from_bytes(target, encoded_bytes: bytes):
  """Restores bytes from :func:`to_bytes` into the structure of ``target``."""
  return from_state_dict(target, msgpack_restore(encoded_bytes))
