"""lib.serialization (and lib.errors) against flax.serialization as an oracle.

Shows that for a battery of trees ``to_bytes`` / ``msgpack_serialize`` write
exactly flax's bytes and that each side's bytes restore on the other; the edge
cases of flax's own serialization tests; gintrain's big-endian fix; and that
bad input (unserializable leaves, corrupt/truncated/random bytes, corrupt
array payloads) gives clear errors naming the path, never a crash.
"""

import collections
import dataclasses
import doctest
import pickle
import typing
from typing import Any, NamedTuple

from flax import serialization as fser
from flax import struct as fstruct
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import optax
import pytest

from gintrain.lib import errors
from gintrain.lib import serialization as ser
from gintrain.lib import struct

CHUNK_LIMIT = 91 * 8  # flax's tests' value: 91 float64 per chunk


@pytest.fixture
def small_chunks(monkeypatch):
  """Lowers MAX_CHUNK_SIZE on both implementations."""
  monkeypatch.setattr(ser, 'MAX_CHUNK_SIZE', CHUNK_LIMIT)
  monkeypatch.setattr(fser, 'MAX_CHUNK_SIZE', CHUNK_LIMIT)


@pytest.fixture
def registry():
  """Registers handlers for a test and removes them afterwards."""
  added = []

  def register(ty, to_fn, from_fn, override=False):
    ser.register_serialization_state(ty, to_fn, from_fn, override=override)
    added.append(ty)

  yield register
  for ty in added:
    ser._STATE_DICT_REGISTRY.pop(ty, None)  # pylint: disable=protected-access


def assert_same(x, y, path='.'):
  """Equal structure, types, dtypes, shapes and bits (NaN-safe)."""
  assert type(x) is type(y), f'{path}: {type(x)} vs {type(y)}'
  if isinstance(x, dict):
    assert list(x) == list(y), f'{path}: keys {list(x)} vs {list(y)}'
    for k in x:
      assert_same(x[k], y[k], f'{path}/{k}')
  elif isinstance(x, (list, tuple)):
    assert len(x) == len(y), path
    for i, (a, b) in enumerate(zip(x, y)):
      assert_same(a, b, f'{path}/{i}')
  elif isinstance(x, jax.tree_util.Partial):
    assert x.func is y.func, path
    assert_same(x.args, y.args, f'{path}/args')
    assert_same(x.keywords, y.keywords, f'{path}/keywords')
  elif dataclasses.is_dataclass(x):
    for f in dataclasses.fields(x):
      assert_same(getattr(x, f.name), getattr(y, f.name), f'{path}/{f.name}')
  elif isinstance(x, (np.ndarray, np.generic, jax.Array)):
    assert x.dtype == y.dtype, f'{path}: {x.dtype} vs {y.dtype}'
    assert np.shape(x) == np.shape(y), path
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
  elif isinstance(x, float) and x != x:
    assert y != y, f'{path}: nan vs {y!r}'
  else:
    assert x == y, f'{path}: {x!r} vs {y!r}'


# ---------------------------------------------------------------------------
# The battery of trees.

Pair = collections.namedtuple('Pair', 'first second')


class Typed(NamedTuple):
  value: Any
  extra: Any = 3


def _params():
  return {
      'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
      'Dense_1': {'kernel': jnp.full((4, 2), 0.5), 'bias': jnp.zeros(2)},
  }


def _keyword_fn(a, b=0):
  return a + b


ML_DTYPES = [
    'bfloat16', 'float8_e4m3fn', 'float8_e5m2', 'float8_e4m3b11fnuz',
    'float8_e4m3fnuz', 'float8_e5m2fnuz', 'float8_e3m4', 'float8_e4m3',
    'float8_e8m0fnu', 'float4_e2m1fn', 'int4', 'uint4', 'int2', 'uint2'
]


def battery():
  """name -> tree; built fresh per call (serialization may mutate dicts)."""
  params = _params()
  rng = np.random.default_rng(0)
  return {
      'nested': {
          'b': [1, (2, 3.5), {'z': 'str', 'a': b'bytes'}],
          'a': None,
          'c': True,
          'd': Pair(np.int8(1), [2, [3, (4,)]]),
          'e': {'deep': {'deeper': {'deepest': np.arange(6).reshape(2, 3)}}},
      },
      'namedtuples': Typed(np.arange(3), {'q': 1j, 'p': Pair(1, Typed(2))}),
      'adam': optax.adam(1e-3).init(params),
      'sgd_momentum': optax.sgd(0.1, momentum=0.9).init(params),
      'chain': optax.chain(
          optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4),
          optax.sgd(0.1, momentum=0.9, nesterov=True)).init(params),
      'adamw_hyperparams': optax.inject_hyperparams(optax.adamw)(
          learning_rate=1e-3).init(params),
      'params_and_opt': {'params': params,
                         'opt': optax.adam(1e-3).init(params), 'step': 7},
      'scalars': {
          'f64': np.float64(1.5), 'f32': np.float32(-2.25),
          'bool_': np.bool_(True), 'i8': np.int8(-5), 'u64': np.uint64(2**64 - 1),
          'bf16': ml_dtypes.bfloat16(2.5), 'c64': np.complex64(1 - 2j),
          'complex': 1 + 2j, 'imag': 1j, 'int_max': 2**63 - 1,
          'int_min': -2**63, 'uint_max': 2**64 - 1, 'float': 0.1,
          'nan': float('nan'), 'inf': -float('inf'), 'true': True,
          'none': None, 'str': 'ünïcode', 'bytes': b'\x00\xff',
      },
      'ml_dtypes': {
          name: np.arange(-3, 5).astype(getattr(ml_dtypes, name)).reshape(2, 4)
          for name in ML_DTYPES
      },
      'jax_arrays': {
          'f32': jnp.arange(6.0).reshape(2, 3), 'i32_0d': jnp.array(3),
          'bf16': jnp.ones((2,), jnp.bfloat16), 'bool': jnp.array([True]),
          'f8': jnp.array([0.5, -1.0], jnp.float8_e4m3fn),
          'c64': jnp.array([1 + 1j], jnp.complex64),
          'uint8': jnp.arange(4, dtype=jnp.uint8),
      },
      'numpy_arrays': {
          'f16': rng.uniform(-1, 1, (3, 2)).astype(np.float16),
          'f128': rng.uniform(-1, 1, (2,)).astype(np.longdouble),
          'c256': rng.uniform(-1, 1, (2,)).astype(np.clongdouble),
          'td': np.array([1, -2], 'm8[s]'), 'dt': np.array(['2020-01-01'], 'M8[D]'),
          'fortran': np.asfortranarray(np.arange(6.).reshape(2, 3)),
          'strided': np.arange(20.)[::3],
      },
      'empty': {'dict': {}, 'list': [], 'tuple': (), 'str': '', 'bytes': b'',
                'arr': np.zeros((0, 3)), 'nested': {'x': {}, 'y': [[]]}},
      'partial': jax.tree_util.Partial(_keyword_fn, np.float32(1),
                                       b=jnp.ones(2)),
      'bare_array': np.arange(200.0).reshape(10, 20),
      'bare_scalar': np.float64(3.0),
      'bare_list': [np.ones(3), 2, 'x'],
      'empty_list': [],
      'chunked': {'big': rng.uniform(-100, 100, (21, 37)),
                  'ten': np.ones((10, 10)),
                  'u8': np.arange(1000, dtype=np.uint8) % 251,
                  'jax_big': jnp.arange(300.0),
                  'small': np.arange(3.0)},
  }


BATTERY_NAMES = list(battery())
LIMITS = ['default_chunks', 'small_chunks']


@pytest.fixture(params=LIMITS)
def chunk_limit(request, monkeypatch):
  if request.param == 'small_chunks':
    monkeypatch.setattr(ser, 'MAX_CHUNK_SIZE', CHUNK_LIMIT)
    monkeypatch.setattr(fser, 'MAX_CHUNK_SIZE', CHUNK_LIMIT)
  return request.param


@pytest.mark.parametrize('name', BATTERY_NAMES)
def test_to_bytes_matches_flax_and_cross_restores(name, chunk_limit):
  tree = battery()[name]
  ours, theirs = ser.to_bytes(tree), fser.to_bytes(tree)
  assert ours == theirs
  if name == 'chunked' and chunk_limit == 'small_chunks':
    assert ser.CHUNKED_KEY.encode() in ours
  # Each side restores the other's bytes exactly as flax restores its own.
  expected = fser.from_bytes(tree, theirs)
  assert_same(ser.from_bytes(tree, theirs), expected)
  assert_same(fser.from_bytes(tree, ours), expected)
  # Restored values, dtypes and types re-encode to the very same bytes.
  assert ser.to_bytes(ser.from_bytes(tree, ours)) == ours
  # Without a target (state dicts), too.
  assert_same(ser.msgpack_restore(theirs), fser.msgpack_restore(ours))


@pytest.mark.parametrize('in_place', [False, True])
@pytest.mark.parametrize('name', BATTERY_NAMES)
def test_msgpack_serialize_matches_flax(name, in_place, chunk_limit):
  # One tree: longdouble arrays have uninitialised padding bytes.
  tree = battery()[name]
  ours_state, their_state = ser.to_state_dict(tree), fser.to_state_dict(tree)
  ours = ser.msgpack_serialize(ours_state, in_place=in_place)
  theirs = fser.msgpack_serialize(their_state, in_place=in_place)
  assert ours == theirs
  assert_same(ser.msgpack_restore(theirs), fser.msgpack_restore(ours))
  assert_same(ser.msgpack_restore(ours), fser.msgpack_restore(theirs))


@struct.dataclass
class LibPoint:
  x: Any
  y: Any
  meta: Any = struct.field(pytree_node=False, default='static')


@fstruct.dataclass
class FlaxPoint:
  x: Any
  y: Any
  meta: Any = fstruct.field(pytree_node=False, default='static')


class LibState(struct.PyTreeNode):
  step: int
  params: Any
  opt_state: Any
  apply_fn: Any = struct.field(pytree_node=False, default=None)


class FlaxState(fstruct.PyTreeNode):
  step: int
  params: Any
  opt_state: Any
  apply_fn: Any = fstruct.field(pytree_node=False, default=None)


def _struct_pair():
  params = _params()
  opt = optax.adam(1e-3).init(params)
  lib_tree = {
      'point': LibPoint(np.float32(1), [jnp.ones(2), LibPoint(2, 3)]),
      'state': LibState(step=3, params=params, opt_state=opt, apply_fn=print),
  }
  flax_tree = {
      'point': FlaxPoint(np.float32(1), [jnp.ones(2), FlaxPoint(2, 3)]),
      'state': FlaxState(step=3, params=params, opt_state=opt, apply_fn=print),
  }
  return lib_tree, flax_tree


def test_struct_dataclasses_match_flax_struct(chunk_limit):
  lib_tree, flax_tree = _struct_pair()
  ours, theirs = ser.to_bytes(lib_tree), fser.to_bytes(flax_tree)
  assert ours == theirs
  restored = ser.from_bytes(lib_tree, theirs)
  assert type(restored['state']) is LibState
  assert restored['state'].apply_fn is print  # static field from the target
  assert restored['point'].meta == 'static'
  assert_same(fser.to_state_dict(fser.from_bytes(flax_tree, ours)),
              ser.to_state_dict(restored))
  for in_place in (False, True):
    assert (ser.msgpack_serialize(ser.to_state_dict(lib_tree), in_place) ==
            fser.msgpack_serialize(fser.to_state_dict(flax_tree), in_place))


# ---------------------------------------------------------------------------
# dtypes (flax's test_numpy_serialization / test_jax_numpy_serialization).

# flax's list minus the aliases numpy 2 removed (cfloat, bool8, complex_,
# int0, uint0, singlecomplex, float_, longfloat, clongfloat, longcomplex).
NUMPY_DTYPES = [
    'byte', 'b', 'ubyte', 'short', 'h', 'ushort', 'i', 'uint', 'intp', 'p',
    'uintp', 'long', 'l', 'longlong', 'q', 'ulonglong', 'half', 'e', 'f',
    'double', 'd', 'longdouble', 'g', 'cdouble', 'clongdouble', 'm', 'b1',
    'int64', 'i8', 'uint64', 'u8', 'float16', 'f2', 'float32', 'f4',
    'float64', 'f8', 'float128', 'f16', 'complex64', 'c8', 'complex128',
    'c16', 'complex256', 'c32', 'm8', 'int32', 'i4', 'uint32', 'u4', 'int16',
    'i2', 'uint16', 'u2', 'int8', 'i1', 'uint8', 'u1', 'single', 'csingle',
    'intc', 'uintc', 'int_', 'bool_', 'int', 'float', 'complex', 'bool'
]
SHAPES = [(), (5,), (10, 10), (1, 20, 30, 1)]


def _has_padding(dtype) -> bool:
  """x87 long doubles: 10 value bytes in 16, the rest uninitialised."""
  dtype = np.dtype(dtype)
  return dtype.kind in 'fc' and np.finfo(dtype).nmant == 63


def _check_round_trip(x):
  ours, theirs = ser.msgpack_serialize(x), fser.msgpack_serialize(x)
  if isinstance(x, np.generic) and _has_padding(x.dtype):
    # Each encoding copies the scalar into a fresh array (flax too), so the
    # padding differs from call to call; everything else must be equal.
    assert len(ours) == len(theirs)
  else:
    assert ours == theirs
  for restored in (ser.msgpack_restore(theirs), fser.msgpack_restore(ours),
                   ser.msgpack_restore(ours)):
    assert restored.dtype == x.dtype
    assert type(restored) is type(fser.msgpack_restore(theirs))
    np.testing.assert_array_equal(restored, x)


def test_numpy_dtype_spellings_round_trip():
  assert len(NUMPY_DTYPES) == 68
  rng = np.random.default_rng(0)
  for dtype in NUMPY_DTYPES:
    scalar = rng.uniform(-100, 100, size=()).astype(dtype)[()]
    assert isinstance(scalar, np.generic)
    _check_round_trip(scalar)
    for shape in SHAPES:
      _check_round_trip(rng.uniform(-100, 100, size=shape).astype(dtype))


@pytest.mark.parametrize('dtype', [
    jnp.bool_, jnp.uint8, jnp.uint16, jnp.uint32, jnp.int8, jnp.int16,
    jnp.int32, jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64,
    jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int4
])
def test_jax_dtypes_round_trip(dtype):
  rng = np.random.default_rng(1)
  scalar = jnp.array(rng.uniform(-100, 100, size=())).astype(dtype)[()]
  for x in [scalar] + [
      jnp.array(rng.uniform(-7, 7, size=s)).astype(dtype) for s in SHAPES]:
    ours, theirs = ser.msgpack_serialize(x), fser.msgpack_serialize(x)
    assert ours == theirs
    restored = ser.msgpack_restore(ours)
    assert type(restored) is np.ndarray and restored.dtype == x.dtype
    np.testing.assert_array_equal(restored, np.asarray(x))


def test_complex_round_trip():
  for x in [1j, 1 + 2j, complex(-0.0, float('inf'))]:
    restored = ser.msgpack_restore(fser.msgpack_serialize(x))
    assert type(restored) is complex and restored == x
  assert ser.msgpack_serialize(1j) == fser.msgpack_serialize(1j)


def test_restored_types_as_spec():
  tree = {'f64': np.float64(2.0), 'jnp0d': jnp.array(3.0),
          'bool_': np.bool_(False), 'bytes': b'x', 'str': 's', 'int': 1}
  restored = ser.msgpack_restore(ser.to_bytes(tree))
  assert type(restored['f64']) is np.float64
  assert type(restored['jnp0d']) is np.ndarray and restored['jnp0d'].ndim == 0
  assert type(restored['bool_']) is np.bool_
  assert [type(restored[k]) for k in ('bytes', 'str', 'int')] == [
      bytes, str, int]
  assert not restored['jnp0d'].flags.writeable  # from np.frombuffer


def test_float32_scalar_wire_bytes():
  assert ser.msgpack_serialize(np.float32(1.5)) == (
      b'\xd8\x03\x93\x90\xa7float32\xc4\x04\x00\x00\xc0\x3f')


def test_string_and_void_arrays():
  # numpy names these dtypes 'bytes24', 'str64', 'void96', which np.dtype
  # (and so flax's restore) cannot parse; the bytes are flax's, and lib
  # restores them (structured arrays as raw records of the same bytes).
  tree = {'S3': np.array([b'abc', b'de']), 'U2': np.array([['ab', 'c']]),
          'V4': np.array([b'wxyz'], 'V4'),
          'rec': np.array([(1, 2.0)], dtype=[('a', '<i4'), ('b', '<f8')])}
  ours = ser.to_bytes(tree)
  assert ours == fser.to_bytes(tree)
  restored = ser.from_bytes(tree, ours)
  for k in ('S3', 'U2', 'V4'):
    assert_same(restored[k], tree[k])
  assert restored['rec'].dtype == np.dtype('V12')
  assert restored['rec'].tobytes() == tree['rec'].tobytes()
  with pytest.raises(TypeError):
    fser.msgpack_restore(ours)


# ---------------------------------------------------------------------------
# Chunking.


def test_chunk_layout(small_chunks, monkeypatch):
  tree = ser._chunk_array_leaves_in_place({'a': np.ones((10, 10))})  # pylint: disable=protected-access
  assert jax.tree_util.tree_map(np.shape, tree) == {
      'a': {'__msgpack_chunked_array__': (),
            'shape': {'0': (), '1': ()},
            'chunks': {'0': (91,), '1': (9,)}}}
  assert list(tree['a']) == ['__msgpack_chunked_array__', 'shape', 'chunks']
  assert tree['a']['shape'] == {'0': 10, '1': 10}
  assert ser.needs_chunking(np.ones(92)) and not ser.needs_chunking(np.ones(91))
  # An itemsize above the limit still gives chunks of one element.
  monkeypatch.setattr(ser, 'MAX_CHUNK_SIZE', 8)
  one = ser.chunk(np.ones(3, np.clongdouble))
  assert [c.shape for c in one['chunks'].values()] == [(1,), (1,), (1,)]


def test_chunked_round_trips(small_chunks):
  rng = np.random.default_rng(2)
  big = rng.uniform(-100, 100, size=(21, 37))
  restored = ser.msgpack_restore(ser.to_bytes(big))
  np.testing.assert_array_equal(restored, big)
  assert restored.flags.writeable  # np.concatenate, unlike unchunked arrays
  tree = {'a': np.ones((10, 10)), 'b': {'c': big}}
  encoded = ser.to_bytes(tree)
  assert_same(ser.from_bytes(tree, encoded), tree)
  assert_same(ser.msgpack_restore(ser.msgpack_serialize(tree)),
              {'a': tree['a'], 'b': {'c': big}})


def test_legacy_unchunked_restores(small_chunks):
  big = np.random.default_rng(3).uniform(-100, 100, size=(21, 37))
  legacy = msgpack.packb(big, default=ser._msgpack_ext_pack, strict_types=True)  # pylint: disable=protected-access
  np.testing.assert_array_equal(ser.msgpack_restore(legacy), big)
  np.testing.assert_array_equal(ser.from_bytes(np.zeros(1), legacy), big)


def test_chunked_dict_only_walks_dicts():
  # The chunk marker's value is not inspected; lists are not walked (flax).
  marker = {'__msgpack_chunked_array__': 0, 'shape': {'0': 2},
            'chunks': {'0': np.ones(1), '1': np.zeros(1)}}
  encoded = ser.msgpack_serialize({'x': marker, 'l': [dict(marker)]},
                                  in_place=True)
  restored = ser.msgpack_restore(encoded)
  np.testing.assert_array_equal(restored['x'], [1.0, 0.0])
  assert isinstance(restored['l'][0], dict)
  assert_same(restored, fser.msgpack_restore(encoded))


def test_deep_nesting_restores_without_recursion_error():
  deep = b'\x81\xa1a' * 1020 + b'\xc0'  # msgpack's own depth limit is 1024
  node = ser.msgpack_restore(deep)
  for _ in range(1020):
    node = node['a']
  assert node is None
  with pytest.raises(errors.MsgpackDecodeError, match='nesting deeper'):
    ser.msgpack_restore(b'\x81\xa1a' * 2000 + b'\xc0')


# ---------------------------------------------------------------------------
# The state-dict registry (flax's serialization_test.py cases).


@struct.dataclass
class Point:
  x: float
  y: float
  meta: Any = struct.field(pytree_node=False)


def test_dataclass_state_dict_and_field_errors():
  p = Point(x=1, y=2, meta={'dummy': True})
  assert ser.to_state_dict(p) == {'x': 1, 'y': 2}
  assert ser.from_state_dict(p, {'x': 3, 'y': 4}) == Point(3, 4, {'dummy': True})
  with pytest.raises(ValueError) as e:
    ser.from_state_dict({'p': p}, {'p': {'x': 3, 'y': 4, 'z': 3, 'w': 0}})
  assert str(e.value) == ('Unknown field(s) "z,w" in state dict while'
                          ' restoring an instance of Point at path ./p')
  with pytest.raises(ValueError) as e:
    ser.from_state_dict([p], {'0': {'x': 3}})
  assert str(e.value) == ('Missing field y in state dict while restoring an'
                          ' instance of Point, at path ./0')


def test_custom_handler_and_override(registry):

  class Box:

    def __init__(self, v):
      self.v = v

  registry(Box, lambda b: {'v': b.v}, lambda b, s: Box(s['v']))
  assert ser.is_serializable(Box) and ser.is_serializable(Box(1))
  with pytest.raises(ValueError) as e:
    ser.register_serialization_state(Box, lambda b: b.v, lambda b, s: Box(s))
  assert str(e.value) == 'a serialization handler for "Box" is already registered'
  # Re-registration with override may map the object to a bare value.
  registry(Box, lambda b: b.v, lambda b, s: Box(s), override=True)
  assert ser.to_state_dict({'b': Box(5)}) == {'b': 5}
  restored = ser.from_bytes({'b': Box(0)}, ser.to_bytes({'b': Box(7)}))
  assert type(restored['b']) is Box and restored['b'].v == 7
  # The path stack is visible to handlers.
  seen = []
  registry(Box, lambda b: b.v, lambda b, s: seen.append(ser.current_path()),
           override=True)
  ser.from_state_dict({'a': [Box(0)]}, {'a': {'0': 1}})
  assert seen == ['./a/0'] and ser.current_path() == ''
  # Handler output dicts must have str keys.
  registry(Box, lambda b: {1: b.v}, lambda b, s: b, override=True)
  with pytest.raises(AssertionError, match='string keys'):
    ser.to_state_dict(Box(1))


def test_is_serializable_matches_flax():
  # Namedtuples are handled under a shared marker, so is_serializable says
  # False for them (as flax's does).
  for x in [{}, dict, [], list, (), tuple, Pair(1, 2), Pair, 1, int, None,
            np.ones(1), jax.tree_util.Partial(print), jax.tree_util.Partial]:
    assert ser.is_serializable(x) == fser.is_serializable(x), x
  assert not ser.is_serializable(Pair(1, 2))
  assert ser.is_serializable(LibPoint(1, 2)) and ser.is_serializable(LibPoint)
  assert not fser.is_serializable(LibPoint)  # separate registries


def test_model_params_state_dict_and_restore():
  params = {'params': {'kernel': jnp.ones((1, 1)), 'bias': jnp.zeros((1,))}}
  state = ser.to_state_dict(params)
  assert jax.tree_util.tree_map(np.asarray, state) == {
      'params': {'kernel': np.ones((1, 1)), 'bias': np.zeros((1,))}}
  new = {'params': {'kernel': np.zeros((1, 1)), 'bias': np.zeros((1,))}}
  assert_same(ser.from_state_dict(params, new), new)


def test_partial_state_dict():
  p = jax.tree_util.Partial(_keyword_fn, 1)
  assert ser.to_state_dict(p) == {'args': {'0': 1}, 'keywords': {}}
  restored = ser.from_state_dict(p, {'args': {'0': 5}, 'keywords': {}})
  assert restored.func is _keyword_fn and restored.args == (5,)
  kw = jax.tree_util.Partial(_keyword_fn, 1, b=2)
  restored = ser.from_bytes(kw, ser.to_bytes(
      jax.tree_util.Partial(_keyword_fn, 3, b=4)))
  assert restored() == 7


def test_optax_sgd_state_dict_and_plus_one():
  params = {'params': {'bias': jnp.zeros(1), 'kernel': jnp.zeros((1, 1))}}
  tx_state = optax.sgd(0.1, momentum=0.1).init(params)
  state = ser.to_state_dict(tx_state)
  expected = {'0': {'trace': {'params': {'bias': np.zeros(1, np.float32),
                                         'kernel': np.zeros((1, 1), np.float32)}}},
              '1': {}}
  assert_same(jax.tree_util.tree_map(np.asarray, state), expected)
  plus1 = jax.tree_util.tree_map(lambda x: x + 1, expected)
  restored = ser.from_state_dict(tx_state, plus1)
  assert_same(jax.tree_util.tree_map(np.asarray, restored),
              jax.tree_util.tree_map(lambda x: np.asarray(x + 1), tx_state))
  adam = optax.adam(1e-3).init(params)
  adam_state = ser.to_state_dict(adam)
  assert list(adam_state) == ['0', '1'] and adam_state['1'] == {}
  assert list(adam_state['0']) == ['count', 'mu', 'nu']
  assert adam_state['0']['count'].dtype == jnp.int32


def test_collection_holding_dataclass():

  @struct.dataclass
  class Dummy:
    x: float

  variables = {'state': {'dummy': Dummy(x=2.0)}}
  state = ser.to_state_dict(variables)
  assert state == {'state': {'dummy': {'x': 2.0}}}
  assert ser.from_state_dict(variables, state) == variables


def test_namedtuple_round_trip_and_legacy_layout():
  foo = collections.namedtuple('Foo', 'a b c')
  restored = ser.from_bytes(foo(0, 0, 0), ser.to_bytes(foo(1, 2, 3)))
  assert type(restored) is foo and restored == foo(1, 2, 3)
  legacy = {'name': 'Foo', 'fields': {'0': 'a', '1': 'b', '2': 'c'},
            'values': {'0': 1, '1': 2, '2': 3}}
  restored = ser.from_state_dict(foo(0, 0, 0), legacy)
  assert type(restored) is foo and restored == foo(1, 2, 3)


def test_dict_restore_uses_target_keys_and_order():
  target = {'b': 0, 1: 0, 'a': 0}
  state = {'a': 1, 'b': 2, '1': 3, 'extra': 4}
  restored = ser.from_state_dict(target, state)
  assert list(restored.items()) == [('b', 2), (1, 3), ('a', 1)]
  assert ser.from_state_dict([], {}) == [] and ser.from_state_dict((), {}) == ()


def test_unregistered_target_returns_state_unchanged():
  state = {'anything': [1]}
  assert ser.from_state_dict(np.zeros((2, 3)), state) is state
  assert ser.from_state_dict(None, state) is state
  leaf = np.ones(2)
  assert ser.to_state_dict(leaf) is leaf


def test_target_none_gives_string_keyed_dicts():
  tree = {'t': (1, 2), 'l': [Pair(3, 4)], 'p': LibPoint(5, 6)}
  assert ser.from_bytes(None, ser.to_bytes(tree)) == {
      't': {'0': 1, '1': 2}, 'l': {'0': {'first': 3, 'second': 4}},
      'p': {'x': 5, 'y': 6}}


def test_integer_map_keys_round_trip():
  # nnx pure dicts use int keys: msgpack must allow non-str map keys.
  pure = {0: {'kernel': np.ones(2)}, 1: {'bias': np.zeros(1)}, 'rest': 1}
  ours = ser.msgpack_serialize({0: np.ones(2), 1: {2: 3}}, in_place=True)
  assert ours == fser.msgpack_serialize({0: np.ones(2), 1: {2: 3}}, True)
  restored = ser.msgpack_restore(ser.msgpack_serialize(pure, in_place=True))
  assert list(restored) == [0, 1, 'rest']
  np.testing.assert_array_equal(restored[0]['kernel'], np.ones(2))


def test_dict_order_kept_by_to_bytes_sorted_by_msgpack_serialize():
  tree = {'b': 1, 'a': 2}
  assert list(ser.msgpack_restore(ser.to_bytes(tree))) == ['b', 'a']
  assert list(ser.msgpack_restore(ser.msgpack_serialize(tree))) == ['a', 'b']
  assert list(ser.msgpack_restore(
      ser.msgpack_serialize(dict(tree), in_place=True))) == ['b', 'a']
  assert list(tree) == ['b', 'a']


class OriginalTuple(NamedTuple):
  value: Any


class WrongTuple(NamedTuple):
  wrong_field: Any


class TinyTrainState(struct.PyTreeNode):
  step: int
  params: Any
  opt_state: Any
  apply_fn: Any = struct.field(pytree_node=False, default=None)


def _dense_params(n):
  return {'params': {f'Dense_{i}': {'kernel': np.ones((2, 2)),
                                    'bias': np.zeros(2)} for i in range(n)}}


def _train_state(n):
  params = _dense_params(n)
  return TinyTrainState(step=0, params=params,
                        opt_state=optax.sgd(0.1, 0.9).init(params))


@pytest.mark.parametrize('target, wrong_target, msg', [
    ([[[1, 2, 3], [4, 5]]], [[[1, 2, 3], [4]]],
     'The size of the list and the state dict do not match, got 1 and 2 at'
     ' path ./0/1'),
    ((((1, 2, 3), (4, 5)),), (((1, 2, 3), (4,)),),
     'The size of the list and the state dict do not match, got 1 and 2 at'
     ' path ./0/1'),
    ((((1, 2, 3), (OriginalTuple([4, 5]), 6)),),
     (((1, 2, 3), (WrongTuple([4, 5]), 6)),),
     'The field names of the state dict and the named tuple do not match, got'
     " {'value'} and {'wrong_field'} at path ./0/1/0"),
    ({'a': {'b': {'c': [1, 2, 3], 'd': [4, 5]}}},
     {'a': {'b': {'c': [1, 2, 3], 'd': [4]}}},
     'The size of the list and the state dict do not match, got 1 and 2 at'
     ' path ./a/b/d'),
    ({'a': {'b': {'c': [1, 2, 3], 'd': [4, 5]}}},
     {'a': {'b': {'c': [1, 2, 3], 'e': [4, 5]}}},
     'The target dict keys and state dict keys do not match, target dict'
     " contains keys {'e'} which are not present in state dict at path ./a/b"),
    (_dense_params(1), _dense_params(2),
     'The target dict keys and state dict keys do not match, target dict'
     " contains keys {'Dense_1'} which are not present in state dict at path"
     ' ./params'),
    (_train_state(1), _train_state(2),
     'The target dict keys and state dict keys do not match, target dict'
     " contains keys {'Dense_1'} which are not present in state dict at path"
     ' ./params/params'),
])
def test_restore_error_messages(target, wrong_target, msg):
  with pytest.raises(ValueError) as e:
    ser.from_bytes(wrong_target, ser.to_bytes(target))
  assert str(e.value) == msg
  assert ser.current_path() == ''  # the path stack is unwound
  if not isinstance(target, TinyTrainState):  # flax says the same
    with pytest.raises(ValueError) as e:
      fser.from_bytes(wrong_target, fser.to_bytes(target))
    assert str(e.value) == msg


def test_leaf_where_container_expected_names_path():
  with pytest.raises(ValueError, match=r'restore a list at path \./a/b, got a'
                     ' int'):
    ser.from_state_dict({'a': {'b': [1]}}, {'a': {'b': 5}})
  with pytest.raises(ValueError, match=r'restore a Point at path \./0'):
    ser.from_state_dict([Point(1, 2, None)], {'0': np.ones(2)})


# ---------------------------------------------------------------------------
# gintrain difference #3: big-endian arrays.


def test_big_endian_arrays_restore_correctly():
  tree = {'f4': np.array([1.5, -2.0], '>f4'), 'i8': np.arange(3, dtype='>i8'),
          'c16': np.array([[1 + 2j]], '>c16'), 'f2': np.array(0.5, '>f2'),
          'u2': np.array([[1, 2], [3, 65535]], '>u2'),
          'm8': np.array([5], '>m8[s]')}
  native = {k: v.astype(v.dtype.newbyteorder('=')) for k, v in tree.items()}
  ours = ser.to_bytes(tree)
  assert ours == fser.to_bytes(native)  # stored as flax stores native arrays
  for restored in (ser.msgpack_restore(ours), fser.msgpack_restore(ours),
                   ser.from_bytes(tree, ours)):
    for k, v in tree.items():
      assert restored[k].dtype == native[k].dtype
      np.testing.assert_array_equal(restored[k], v)
  # flax writes the raw big-endian bytes (restoring garbage); we do not.
  assert fser.to_bytes(tree) != ours
  assert tree['f4'].dtype.byteorder == '>'  # the input is not modified


# ---------------------------------------------------------------------------
# Bad input on save.


@pytest.mark.parametrize('tree, exc, where', [
    ({'a': {'b': object()}}, TypeError, r'an? object at \./a/b'),
    ({'a': [1, {2, 3}]}, TypeError, r'a set at \./a/1'),
    ({'l': [np.ones(2, dtype=object)]}, ValueError, r'ndarray at \./l/0'),
    ({'x': {'y': 2**64}}, OverflowError, r'int at \./x/y'),
    ({'x': -2**63 - 1}, OverflowError, r'\./x'),
    ({'np': np.zeros(1, np.dtype([('a', 'i4'), ('b', 'f8')], align=True))},
     ValueError, r'\./np'),
], ids=['object', 'set', 'object_dtype', 'uint_overflow', 'int_underflow',
        'aligned_struct'])
def test_unserializable_leaf_names_path(tree, exc, where):
  with pytest.raises(exc, match=where):
    ser.to_bytes(tree)
  with pytest.raises(exc):  # the same exception type as flax
    fser.to_bytes(tree)


def test_raw_msgpack_serialize_rejects_tuples_and_odd_keys():
  with pytest.raises(TypeError, match=r"can not serialize 'tuple' object"):
    ser.msgpack_serialize({'a': (1, 2)}, in_place=True)
  with pytest.raises(TypeError, match=r"a tuple at \./a"):
    ser.msgpack_serialize({'a': (1, 2)}, in_place=True)
  with pytest.raises(TypeError, match=r"the dict key \(1, 2\) at \./k"):
    ser.msgpack_serialize({'k': {(1, 2): 1}}, in_place=True)
  with pytest.raises(TypeError, match=r'OrderedDict at \./o'):
    ser.msgpack_serialize({'o': collections.OrderedDict(a=1)}, in_place=True)


def test_dict_keys_not_unique_as_strings():
  with pytest.raises(ValueError, match='Dict keys do not have a unique string'
                     ' representation'):
    ser.to_bytes({'x': {1: 'a', '1': 'b'}})


# ---------------------------------------------------------------------------
# Bad input on restore: never a crash, always MsgpackDecodeError.

DECODE_PREFIX = 'Cannot decode msgpack checkpoint bytes: '


def _decode_error(encoded) -> errors.MsgpackDecodeError:
  with pytest.raises(errors.MsgpackDecodeError) as e:
    ser.msgpack_restore(encoded)
  message = str(e.value)
  assert isinstance(e.value, ValueError)
  assert message.startswith(DECODE_PREFIX)
  reason = e.value.reason
  assert reason and reason[0].isalnum() and ': .' not in message, message
  return e.value


def _good_encoding():
  tree = {'params': {'w': np.arange(12, dtype=np.float32).reshape(3, 4),
                     'b': jnp.ones(3, jnp.bfloat16)},
          'step': np.int64(3), 'c': 1 + 2j, 'meta': [1, 'x', b'y', None, 2.5],
          'big': np.arange(40.0)}
  old = ser.MAX_CHUNK_SIZE
  ser.MAX_CHUNK_SIZE = 64
  try:
    return ser.to_bytes(tree)
  finally:
    ser.MAX_CHUNK_SIZE = old


def test_every_truncation_is_a_decode_error():
  good = _good_encoding()
  ser.msgpack_restore(good)
  for n in range(len(good)):
    error = _decode_error(good[:n])
    if n == 0:
      assert 'truncated' in str(error)


def test_random_and_corrupted_bytes_never_crash():
  good = _good_encoding()
  rng = np.random.default_rng(1234)
  outcomes = collections.Counter()
  for i in range(600):
    if i % 2:
      data = rng.bytes(int(rng.integers(1, 80)))
    else:
      b = bytearray(good)
      for _ in range(int(rng.integers(1, 4))):
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
      data = bytes(b)
    try:
      ser.msgpack_restore(data)
      outcomes['decoded'] += 1
    except errors.MsgpackDecodeError:
      _decode_error(data)  # checks the message too
      outcomes['error'] += 1
  assert outcomes['error'] > 100  # both outcomes happen; nothing else does


def _ext(code, payload, raw=False):
  inner = payload if raw else msgpack.packb(payload, use_bin_type=True)
  return msgpack.packb({'params': {'w': msgpack.ExtType(code, inner)}})


@pytest.mark.parametrize('encoded, cause', [
    (_ext(1, ((3,), 'nodtype', bytes(12))), "unknown array dtype name 'nodtype'"),
    (_ext(1, ((3,), 'O', bytes(24))), 'object dtype'),
    (_ext(1, ((2, 2), 'float32', bytes(4))), 'cannot reshape'),
    (_ext(3, ((3,), 'float32', bytes(5))), 'multiple of element size'),
    (_ext(1, ((1.5,), 'float32', bytes(4))), 'TypeError'),
    (_ext(1, ((1,), 7, bytes(4))), 'dtype name is not a str'),
    (_ext(1, ((1,), 'float32')), 'not enough values'),
    (_ext(1, b'\xc1', raw=True), 'invalid msgpack type byte'),
    (_ext(1, b'\x93\x91\x01\xa7float32\xc4\x04\x00', raw=True), 'truncated'),
    (_ext(2, (1.0,)), 'invalid complex payload'),
    (_ext(2, ('a', 1.0)), 'invalid complex payload'),
], ids=['dtype_name', 'object_dtype', 'shape_size', 'buffer_size',
        'float_shape', 'int_dtype_name', 'two_fields', 'format_byte',
        'truncated', 'complex_one', 'complex_str'])
def test_corrupt_ext_payload_names_path(encoded, cause):
  error = _decode_error(encoded)
  assert 'at ./params/w, invalid' in str(error)
  assert cause in str(error)
  with pytest.raises(errors.MsgpackDecodeError):
    ser.from_bytes({'params': {'w': np.zeros(3)}}, encoded)


@pytest.mark.parametrize('chunked, cause', [
    ({'__msgpack_chunked_array__': True}, "missing key 'shape'"),
    ({'__msgpack_chunked_array__': True, 'shape': {'0': 2}, 'chunks': {}},
     'need at least one array'),
    ({'__msgpack_chunked_array__': True, 'shape': {'0': 3},
      'chunks': {'0': np.ones(2)}}, 'cannot reshape'),
    ({'__msgpack_chunked_array__': True, 'shape': 5, 'chunks': 5}, 'TypeError'),
], ids=['no_shape', 'no_chunks', 'size', 'not_dicts'])
def test_corrupt_chunked_array_names_path(chunked, cause):
  encoded = ser.msgpack_serialize({'a': {'b': chunked}}, in_place=True)
  error = _decode_error(encoded)
  assert 'at ./a/b, invalid chunked array' in str(error) and cause in str(error)
  # A chunked dict as the whole tree.
  assert 'at ., invalid chunked array' in str(
      _decode_error(ser.msgpack_serialize(chunked, in_place=True)))


def test_other_decode_errors():
  assert 'extra bytes' in str(_decode_error(msgpack.packb(1) + b'\x01'))
  assert 'invalid msgpack type byte' in str(_decode_error(b'\xc1'))
  assert 'unhashable' in str(_decode_error(msgpack.packb(
      {msgpack.ExtType(1, msgpack.packb(((1,), 'f4', bytes(4)))): 1})))
  bad_key = msgpack.packb({msgpack.ExtType(2, b'\xc1'): 1})
  assert 'in a dict key at .' in str(_decode_error(bad_key))
  with pytest.raises(TypeError, match='needs bytes'):
    ser.msgpack_restore('not bytes')
  # Unknown ext codes come back as msgpack.ExtType (as in flax).
  unknown = msgpack.packb(msgpack.ExtType(42, b'abc'))
  assert ser.msgpack_restore(unknown) == msgpack.ExtType(42, b'abc')


def test_dtype_from_name():
  assert ser.dtype_from_name(b'bfloat16') == jnp.bfloat16
  assert ser.dtype_from_name('float8_e4m3fn') == ml_dtypes.float8_e4m3fn
  assert ser.dtype_from_name('int4') == ml_dtypes.int4
  for name in ('float32', 'complex256', 'timedelta64', 'bool', 'float16'):
    assert ser.dtype_from_name(name.encode()) == np.dtype(name)
  for bad in ('finfo', 'object', 'O', 'nope', b'\xff'):
    with pytest.raises(ValueError):
      ser.dtype_from_name(bad)


def test_array_header_matches_payload():
  for arr in (np.arange(3, dtype=np.int16), np.ones((0, 2)), np.ones(255, np.uint8),
              np.ones(256, np.uint8), np.ones((300, 300), np.uint8),
              np.ones((2,), ml_dtypes.bfloat16), np.float64(2.0)):
    arr = np.asarray(arr)
    head, nbytes = ser.array_header(arr.shape, arr.dtype)
    assert nbytes == arr.nbytes
    assert head + arr.tobytes() == ser._ndarray_to_bytes(arr)  # pylint: disable=protected-access
  with pytest.raises(ValueError):
    ser.array_header((2,), np.dtype(object))


# ---------------------------------------------------------------------------
# lib.errors.


def test_errors_hierarchy_pickling_and_messages():
  cases = [
      errors.InvalidCheckpointError('/ckpt/checkpoint_3', 3),
      errors.AlreadyExistsError('/ckpt/checkpoint_3'),
      errors.CheckpointReadError('/ckpt/checkpoint_3', 'bad bytes'),
      errors.MsgpackDecodeError('truncated'),
      errors.MPACheckpointingRequiredError('/ckpt/checkpoint_3', 3),
      errors.MPARestoreTargetRequiredError('/ckpt/checkpoint_3', 3, key='a/b'),
      errors.MPARestoreDataCorruptedError(3, '/ckpt/checkpoint_3_gda'),
  ]
  for err in cases:
    assert isinstance(err, errors.GintrainError)
    assert isinstance(err, ValueError) == isinstance(
        err, (errors.CheckpointReadError, errors.MsgpackDecodeError))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) and str(copy) == str(err)
    assert copy.__dict__ == err.__dict__
    if not isinstance(err, errors.MsgpackDecodeError):
      assert '/ckpt/checkpoint_3' in str(err) and err.path.startswith('/ckpt')
  assert 'step: "3"' in str(cases[0]) and cases[0].step == 3
  assert 'a/b' in str(cases[5])
  assert not isinstance(cases[0], ValueError)  # as flax's
  assert set(errors.__all__) == {
      name for name in dir(errors)
      if isinstance(getattr(errors, name), type) and
      issubclass(getattr(errors, name), errors.GintrainError)}


def test_docstring_examples():
  for module in (ser, struct, errors):
    failures, tried = doctest.testmod(module)
    assert failures == 0 and tried > 0, module.__name__


def test_public_names():
  for name in ser.__all__ + [
      'array_header', 'needs_chunking', 'chunk', 'unchunk_array_leaves_in_place',
      'dtype_from_name', '_np_convert_in_place', '_msgpack_ext_pack',
      '_msgpack_ext_unpack', '_ExtType', 'CHUNKED_KEY']:
    assert hasattr(ser, name), name
  assert ser.MAX_CHUNK_SIZE == fser.MAX_CHUNK_SIZE == 2**30
  assert typing.get_type_hints(ser.to_bytes) == {'return': bytes}
  assert typing.get_type_hints(ser.to_bytes) == typing.get_type_hints(
      fser.to_bytes)


# ---------------------------------------------------------------------------
# flax's FrozenDict, without lib importing flax.


def _frozen_trees():
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  fd = frozen_dict.FrozenDict
  params = fd({'dense': fd({'kernel': np.arange(6.).reshape(2, 3),
                            'bias': np.zeros(3, np.float32)}),
               'scale': np.float32(2.)})
  return [
      params,
      {'params': params, 'step': 3},
      [fd({'a': 1, 'b': [1.5, fd()]}), np.ones(2)],
      Pair(fd({2: 'two', 1: 'one'}), None),
      optax.adam(1e-3).init(params),
  ]


@pytest.mark.parametrize('index', range(5))
def test_frozen_dict_bytes_and_restore_match_flax(index):
  tree = _frozen_trees()[index]
  encoded = fser.to_bytes(tree)
  assert ser.to_bytes(tree) == encoded
  assert_same(ser.to_state_dict(tree), fser.to_state_dict(tree))
  zeros = jax.tree_util.tree_map(np.zeros_like, tree)
  ours, theirs = ser.from_bytes(zeros, encoded), fser.from_bytes(zeros, encoded)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(
      theirs) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(ours),
                  jax.tree_util.tree_leaves(theirs)):
    assert_same(a, b)


def test_frozen_dict_in_struct_dataclass():
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top

  @struct.dataclass
  class State:
    params: Any
    step: int

  @fstruct.dataclass
  class FState:
    params: Any
    step: int

  params = frozen_dict.FrozenDict({'w': np.ones(3)})
  encoded = ser.to_bytes(State(params, 2))
  assert encoded == fser.to_bytes(FState(params, 2))
  restored = ser.from_bytes(
      State(frozen_dict.FrozenDict({'w': np.zeros(3)}), 0), encoded)
  assert type(restored.params) is frozen_dict.FrozenDict
  assert restored.step == 2 and restored.params['w'].tolist() == [1., 1., 1.]


def test_frozen_dict_state_dict_rules():
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  fd = frozen_dict.FrozenDict
  assert ser.is_serializable(fd) and ser.is_serializable(fd({}))
  assert ser.to_state_dict(fd({1: 2})) == {'1': 2}
  restored = ser.from_state_dict(fd({1: 0, 'b': 0}), {'1': 5, 'b': 6, 'x': 7})
  assert type(restored) is fd and dict(restored) == {1: 5, 'b': 6}
  with pytest.raises(ValueError, match=r"keys \{'b'\} which are not present"):
    ser.from_state_dict(fd({'a': 0, 'b': 0}), {'a': 1})
  with pytest.raises(ValueError, match=r'unique string representation'):
    ser.to_state_dict(fd({1: 0, '1': 0}))
  with pytest.raises(ValueError, match=r'Expected a state dict'):
    ser.from_state_dict(fd({'a': 0}), 3)
  with pytest.raises(TypeError, match='FrozenDict'):  # as flax: not a dict
    ser.msgpack_serialize({'a': fd({'b': 1})})


def test_frozen_dict_handler_registered_by_user_is_kept(registry, monkeypatch):
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  fd = frozen_dict.FrozenDict
  monkeypatch.delitem(
      ser._STATE_DICT_REGISTRY, fd, raising=False)  # pylint: disable=protected-access
  registry(fd, lambda x: {'custom': dict(x)}, lambda x, s: 'restored')
  assert ser.to_state_dict(fd({'a': 1})) == {'custom': {'a': 1}}
  assert ser.from_state_dict(fd({'a': 1}), {}) == 'restored'


def test_lib_does_not_import_flax():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = (
      'import sys, numpy as np\n'
      'from gintrain.lib import (serialization, struct, errors, dynamic_scale,'
      ' prefetch_iterator)\n'
      'serialization.from_bytes({"a": [np.ones(2)]},'
      ' serialization.to_bytes({"a": [np.ones(2)]}))\n'
      'assert not [m for m in sys.modules if m.split(".")[0] == "flax"]\n')
  subprocess.run([sys.executable, '-c', code], check=True,
                 env={**__import__('os').environ, 'JAX_PLATFORMS': 'cpu'})


# ---------------------------------------------------------------------------
# Arrays are decoded compactly, and decoding memory is bounded.


def test_array_is_one_object_on_its_bytes():
  arr = np.arange(6, dtype=np.int16).reshape(2, 3)
  out = ser.msgpack_restore(ser.msgpack_serialize({'a': arr}))['a']
  assert_same(out, arr)
  assert type(out.base) is bytes and not out.flags.writeable
  assert out.flags.c_contiguous and out.flags.aligned
  # flax's layout quirks still decode as flax does: a -1 dim is inferred.
  odd = msgpack.packb({'a': msgpack.ExtType(1, msgpack.packb(
      ([-1, 2], 'int16', arr.tobytes()), use_bin_type=True))})
  assert_same(ser.msgpack_restore(odd), fser.msgpack_restore(odd))


def test_equal_empty_arrays_are_shared():
  tree = {'a': np.zeros((0, 3), np.float32), 'b': np.zeros((0, 3), np.float32),
          'c': np.zeros((3, 0), np.float32), 'd': np.zeros(0, np.int8),
          'e': [np.zeros((0, 3), np.float32)]}
  encoded = fser.to_bytes(tree)
  out = ser.msgpack_restore(encoded)
  assert_same(out, fser.msgpack_restore(encoded))
  assert out['a'] is out['b'] is out['e']['0']
  assert out['c'] is not out['a'] and out['d'] is not out['a']
  assert not out['a'].flags.writeable
  with pytest.raises(ValueError):
    out['a'].flags.writeable = True


def test_overhead_limit(monkeypatch):
  tree = {'layer': [np.float32(i) * np.ones(1) for i in range(100)]}
  encoded = ser.msgpack_serialize(tree)
  assert_same(ser.msgpack_restore(encoded), fser.msgpack_restore(encoded))
  monkeypatch.setattr(ser, 'DECODE_OVERHEAD_MIN', 0)
  monkeypatch.setattr(ser, 'DECODE_OVERHEAD_FACTOR', 1)
  with pytest.raises(errors.MsgpackDecodeError) as e:
    ser.msgpack_restore(encoded)
  assert 'bytes of memory for Python objects' in str(e.value)
  assert 'arrays' in str(e.value) and 'DECODE_OVERHEAD_FACTOR' in str(e.value)
  assert '\n' not in str(e.value)
  monkeypatch.setattr(ser, 'DECODE_OVERHEAD_FACTOR', None)  # no limit
  assert_same(ser.msgpack_restore(encoded), fser.msgpack_restore(encoded))


_MEASURE = '''
import resource, sys
from gintrain.lib import errors, serialization
data = open(sys.argv[1], 'rb').read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
  out = serialization.msgpack_restore(data)
  outcome = 'ok'
except errors.MsgpackDecodeError as e:
  outcome = 'rejected' if 'for Python objects' in str(e) else str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(outcome, (after - before) * 1024 / len(data))
'''


def _crafted(kind: str, size: int) -> bytes:
  if kind == 'empty arrays':
    ext = msgpack.ExtType(1, msgpack.packb(((0,), 'float32', b'')))
  elif kind == 'tiny arrays':
    ext = msgpack.ExtType(1, msgpack.packb(((), 'float32', b'abcd'),
                                           use_bin_type=True))
  else:  # empty dicts
    return msgpack.packb([{}] * (size - 5))
  return msgpack.packb([ext] * (size // len(msgpack.packb(ext))))


@pytest.mark.parametrize('kind,outcome', [
    ('empty arrays', 'ok'),           # flax/before: about 16x the file size
    ('tiny arrays', 'rejected'),      # about 16x
    ('empty dicts', 'rejected'),      # about 70x
])
def test_crafted_file_memory_is_bounded(tmp_path, kind, outcome):
  """Peak memory of decoding a 40 MB crafted file, in a fresh process."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'crafted.msgpack'
  path.write_bytes(_crafted(kind, 40_000_000))
  result = subprocess.run(
      [sys.executable, '-c', _MEASURE, str(path)], check=True,
      capture_output=True, text=True,
      env={**__import__('os').environ, 'JAX_PLATFORMS': 'cpu'})
  got, ratio = result.stdout.split()
  assert got == outcome
  # Measured: 0.5x (empty arrays), 4.5-4.7x (rejected ones).
  assert float(ratio) < 8, f'{kind}: peak extra memory {ratio} x file size'
