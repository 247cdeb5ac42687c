"""Small classifiers in plain JAX, with flax.linen's parameter layout.

A :class:`Model` is a frozen (hashable) list of layers with ``init`` and
``apply``, like a flax module::

    >>> import jax, jax.numpy as jnp
    >>> model = mlp(features=(32,), num_classes=10)
    >>> x = jnp.zeros((4, 64))
    >>> variables = model.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'Dense_0': {'bias': (32,), 'kernel': (64, 32)}, 'Dense_1': {'bias': (10,), 'kernel': (32, 10)}}}
    >>> model.apply(variables, x).shape
    (4, 10)

Parameter names (``Dense_0``, ``Conv_0``, ... each with ``kernel`` and
``bias``), shapes and initializers (LeCun normal kernels, zero biases) are the
ones ``flax.linen`` gives the same architecture written with ``nn.Dense`` /
``nn.Conv``, so checkpoints of either can be restored into the other.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gintrain.runner import validation

__all__ = ['Model', 'mlp', 'cnn', 'param_shapes', 'Dense', 'Conv',
           'Activation', 'Pool', 'Flatten', 'ACTIVATIONS']

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'gelu': jax.nn.gelu,
    'silu': jax.nn.silu,
    'elu': jax.nn.elu,
    'tanh': jnp.tanh,
    'sigmoid': jax.nn.sigmoid,
}

_PARAM_DTYPE = jnp.float32
# jax.random.truncated_normal(-2, 2) has std 0.8796...; lecun_normal divides
# by it so that kernels have std exactly 1/sqrt(fan_in).
_TRUNCATED_STD = .87962566103423978


def _promote(x, params):
  dtype = jnp.result_type(x.dtype, *(p.dtype for p in params.values()))
  return x.astype(dtype), {k: v.astype(dtype) for k, v in params.items()}


@dataclasses.dataclass(frozen=True)
class Dense:
  """``y = x @ kernel + bias`` on the last axis (``flax.linen.Dense``)."""
  features: int
  kind = 'Dense'

  def shapes(self, in_shape):
    params = {'kernel': (in_shape[-1], self.features),
              'bias': (self.features,)}
    return params, in_shape[:-1] + (self.features,)

  def __call__(self, params, x):
    x, p = _promote(x, params)
    y = jax.lax.dot_general(x, p['kernel'], (((x.ndim - 1,), (0,)), ((), ())))
    return y + p['bias']


@dataclasses.dataclass(frozen=True)
class Conv:
  """2-D convolution, stride 1, ``'SAME'`` padding, NHWC (``flax.linen.Conv``).

  The kernel has shape ``(kh, kw, in_features, features)`` (HWIO).
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  kind = 'Conv'

  def shapes(self, in_shape):
    params = {'kernel': tuple(self.kernel_size) + (in_shape[-1], self.features),
              'bias': (self.features,)}
    return params, in_shape[:-1] + (self.features,)

  def __call__(self, params, x):
    x, p = _promote(x, params)
    y = jax.lax.conv_general_dilated(
        x, p['kernel'], window_strides=(1, 1), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + p['bias']


@dataclasses.dataclass(frozen=True)
class Activation:
  """An elementwise non-linearity, by name (a key of ``ACTIVATIONS``)."""
  name: str
  kind = None

  def shapes(self, in_shape):
    return None, in_shape

  def __call__(self, params, x):
    del params
    return ACTIVATIONS[self.name](x)


@dataclasses.dataclass(frozen=True)
class Pool:
  """2-D pooling over H and W with window = stride = ``window``, no padding.

  ``'avg'`` is ``flax.linen.avg_pool``, ``'max'`` is ``flax.linen.max_pool``
  (both with ``strides=window_shape`` and ``'VALID'`` padding): a trailing odd
  row/column is dropped.
  """
  op: str = 'avg'
  window: tuple[int, int] = (2, 2)
  kind = None

  def shapes(self, in_shape):
    n, h, w, c = in_shape
    if h < self.window[0] or w < self.window[1]:
      raise ValueError(
          f'Pool{self.window}: the input is only {h}x{w} here; use fewer'
          ' conv/pool stages (features) or larger images.')
    return None, (n, h // self.window[0], w // self.window[1], c)

  def __call__(self, params, x):
    del params
    dims = (1,) + tuple(self.window) + (1,)
    if self.op == 'max':
      return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims,
                                   'VALID')
    summed = jax.lax.reduce_window(x, 0., jax.lax.add, dims, dims, 'VALID')
    return summed / (self.window[0] * self.window[1])


@dataclasses.dataclass(frozen=True)
class Flatten:
  """Reshapes ``(batch, ...)`` to ``(batch, features)``."""
  kind = None

  def shapes(self, in_shape):
    return None, (in_shape[0], math.prod(in_shape[1:]))

  def __call__(self, params, x):
    del params
    return x.reshape((x.shape[0], -1))


@dataclasses.dataclass(frozen=True)
class Model:
  """A sequence of layers with flax-style ``init`` and ``apply``.

  Frozen and hashable, so it can be a static argument of ``jax.jit`` and be
  compared by value. Layers with parameters are named ``<kind>_<i>``, counted
  per kind in order (``Dense_0``, ``Dense_1``, ``Conv_0``, ...), as flax names
  the submodules of a compact module.

  A layer is a frozen dataclass with a class attribute ``kind`` (``None``
  for layers without parameters), ``shapes(in_shape) -> (param shapes or
  None, out_shape)`` and ``__call__(params, x)``.

  Attributes:
    layers: the layers, applied in order.
    input_ndim: the rank of the input ``x``, batch axis included (``None``:
      any rank of at least 2).
    name: a short description, for logs.
  """
  layers: tuple[Any, ...]
  input_ndim: int | None = None
  name: str = 'model'

  def _names(self):
    counts: dict[str, int] = {}
    names = []
    for layer in self.layers:
      if layer.kind is None:
        names.append(None)
        continue
      i = counts.get(layer.kind, 0)
      counts[layer.kind] = i + 1
      names.append(f'{layer.kind}_{i}')
    return names

  def _check_input(self, x):
    ndim = jnp.ndim(x)
    if self.input_ndim is None:
      ok = ndim >= 2
      want = 'at least 2 (batch, features...)'
    else:
      ok = ndim == self.input_ndim
      want = str(self.input_ndim)
    if not ok:
      raise ValueError(
          f'{self.name}: input x has shape {jnp.shape(x)} (rank {ndim}); the'
          f' model needs rank {want}, batch axis first. Reshape the input (for'
          ' images: NHWC).')

  def init(self, rng: jax.Array, x) -> dict:
    """Returns fresh ``{'params': {...}}`` for inputs shaped like ``x``.

    Only ``x``'s shape is used. ``rng`` is a JAX PRNG key (new-style
    ``jax.random.key`` or raw ``PRNGKey``). Same key and shape, same values.
    """
    self._check_input(x)
    return _init(self, rng, tuple(jnp.shape(x)))

  def apply(self, variables: dict, x) -> jax.Array:
    """Returns the logits for the batch ``x`` (jit-able, pure)."""
    self._check_input(x)
    if not isinstance(variables, dict) and not hasattr(variables, 'keys'):
      raise TypeError(f'{self.name}: variables must be a mapping with a'
                      f" 'params' entry, got {type(variables).__name__}.")
    if 'params' not in variables:
      raise KeyError(f"{self.name}: variables has no 'params' entry (keys:"
                     f' {sorted(variables)}); pass what init() returned.')
    params = variables['params']
    x = jnp.asarray(x)
    for layer, name in zip(self.layers, self._names()):
      if name is not None and name not in params:
        raise KeyError(f"{self.name}: params has no '{name}' (has"
                       f' {sorted(params)}); was it made for another model?')
      x = layer(None if name is None else params[name], x)
    return x


def param_shapes(model: 'Model', in_shape) -> dict:
  """``{'Dense_0': {'kernel': shape, 'bias': shape}, ...}`` for an input shape
  (batch axis included); raises ValueError if the input does not fit."""
  shapes = {}
  shape = tuple(in_shape)
  names = model._names()  # pylint: disable=protected-access
  for layer, name in zip(model.layers, names):
    layer_shapes, shape = layer.shapes(shape)
    if name is not None:
      shapes[name] = layer_shapes
  return shapes


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model, rng, in_shape):
  """LeCun-normal kernels and zero biases (flax.linen's defaults).

  Compiled once per (model, input shape), and inlined when init is itself
  traced. All kernels are cut from ONE truncated-normal draw (in layer order)
  because every separate draw adds a PRNG kernel to compile, which costs
  seconds on CPU; the distribution is that of
  ``jax.nn.initializers.lecun_normal()``: truncated at +-2 std, std
  ``1/sqrt(fan_in)``, ``fan_in = prod(kernel.shape[:-1])``.
  """
  shapes = param_shapes(model, in_shape)
  sizes = [math.prod(s['kernel']) for s in shapes.values()]
  draw = jax.random.truncated_normal(rng, -2., 2., (sum(sizes),), _PARAM_DTYPE)
  params, start = {}, 0
  for (name, s), size in zip(shapes.items(), sizes):
    fan_in = math.prod(s['kernel'][:-1])
    std = (1. / math.sqrt(fan_in)) / _TRUNCATED_STD
    kernel = draw[start:start + size].reshape(s['kernel']) * std
    start += size
    params[name] = {'kernel': kernel.astype(_PARAM_DTYPE),
                    'bias': jnp.zeros(s['bias'], _PARAM_DTYPE)}
  return {'params': params}


def _check_positive_ints(name, values):
  if isinstance(values, int):
    values = (values,)
  values = tuple(values)
  for v in values:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f'{name} must be positive integers, got {values!r}.')
  return values


def _check_activation(activation):
  validation.check_choice('activation', activation, sorted(ACTIVATIONS))


def mlp(features=(128,), num_classes: int = 10,
        activation: str = 'relu') -> Model:
  """A multi-layer perceptron: flatten, ``Dense -> activation`` per entry of
  ``features``, then ``Dense(num_classes)`` (logits).

  ``features=()`` is a linear (softmax regression) model.

  The flax.linen equivalent::

      x = x.reshape((x.shape[0], -1))
      for f in features:
        x = activation(nn.Dense(f)(x))
      return nn.Dense(num_classes)(x)
  """
  features = _check_positive_ints('features', features)
  (num_classes,) = _check_positive_ints('num_classes', num_classes)
  _check_activation(activation)
  layers = [Flatten()]
  for f in features:
    layers += [Dense(f), Activation(activation)]
  layers.append(Dense(num_classes))
  return Model(tuple(layers), input_ndim=None,
               name=f'mlp(features={features}, num_classes={num_classes})')


def cnn(features=(16, 32), dense: int = 64, num_classes: int = 10,
        pool: str = 'avg', kernel_size: int = 3,
        activation: str = 'relu') -> Model:
  """A small convnet for NHWC images.

  For each entry of ``features``: ``Conv(f, (kernel_size, kernel_size),
  'SAME') -> activation -> 2x2 pool`` (``pool`` is ``'avg'`` or ``'max'``,
  stride 2); then flatten, ``Dense(dense) -> activation`` (skipped when
  ``dense=0``), ``Dense(num_classes)``.

  The flax.linen equivalent::

      for f in features:
        x = nn.Conv(f, (3, 3), padding='SAME')(x)
        x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(dense)(x))
      return nn.Dense(num_classes)(x)
  """
  features = _check_positive_ints('features', features)
  (num_classes,) = _check_positive_ints('num_classes', num_classes)
  (kernel_size,) = _check_positive_ints('kernel_size', kernel_size)
  dense = validation.check_int('dense', dense, 0)
  validation.check_choice('pool', pool, ('avg', 'max'))
  _check_activation(activation)
  layers = []
  for f in features:
    layers += [Conv(f, (kernel_size, kernel_size)), Activation(activation),
               Pool(pool)]
  layers.append(Flatten())
  if dense:
    layers += [Dense(dense), Activation(activation)]
  layers.append(Dense(num_classes))
  return Model(tuple(layers), input_ndim=4,
               name=(f'cnn(features={features}, dense={dense},'
                     f' num_classes={num_classes}, pool={pool!r})'))
