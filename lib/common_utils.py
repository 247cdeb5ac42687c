"""Helpers for ``pmap`` data-parallel loops: ``flax.training.common_utils``.

``shard`` splits a host batch across the local devices, ``shard_prng_key``
gives each device its own key, ``get_metrics`` gathers per-step metrics of a
pmapped function back to the host, ``stack_forest`` stacks matching pytrees
and ``onehot`` encodes labels. Same names and results as flax's.

  >>> import jax, numpy as np
  >>> from gintrain.lib import common_utils
  >>> n = jax.local_device_count()
  >>> batch = {'x': np.zeros((4 * n, 3)), 'y': np.zeros((4 * n,))}
  >>> sharded = common_utils.shard(batch)
  >>> sharded['x'].shape == (n, 4, 3), sharded['y'].shape == (n, 4)
  (True, True)
"""

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ['shard', 'shard_prng_key', 'stack_forest', 'get_metrics', 'onehot']


def shard(xs):
  """Splits the leading axis of every leaf across the local devices.

  Each leaf ``x`` becomes ``x.reshape((n, -1) + x.shape[1:])`` with
  ``n = jax.local_device_count()``: numpy arrays stay numpy, jax arrays stay
  jax. A leading dimension not divisible by ``n`` raises the array library's
  reshape error (``ValueError`` for numpy, ``TypeError`` for jax).

  Args:
    xs: a pytree of arrays.

  Returns:
    A matching pytree whose arrays have a new leading axis of size ``n``.
  """
  n = jax.local_device_count()
  return jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), xs)


def shard_prng_key(prng_key):
  """Splits a PRNG key into one key per local device, for pmapped functions.

  Random modules such as dropout need different random numbers on each
  device, hence a different key each.

  Args:
    prng_key: a JAX PRNG key, raw (``jax.random.PRNGKey``) or typed
      (``jax.random.key``).

  Returns:
    ``jax.random.split(prng_key, jax.local_device_count())``: a ``(n, 2)``
    uint32 array for a raw key, a ``(n,)`` key array for a typed key.

  Example::

    >>> import jax
    >>> from gintrain.lib.common_utils import shard_prng_key
    >>> keys = shard_prng_key(jax.random.key(0))
    >>> keys.shape == (jax.local_device_count(),)
    True
  """
  return jax.random.split(prng_key, num=jax.local_device_count())


def stack_forest(forest):
  """Stacks the leaves of a sequence of pytrees of matching structure.

  Args:
    forest: a sequence (e.g. tuple or list) of pytrees with the same
      structure whose corresponding leaves have matching shapes.

  Returns:
    One pytree of that structure whose leaves are ``jnp.stack`` of the
    corresponding leaves (a new leading axis of size ``len(forest)``; Python
    floats become float32 arrays).

  Example::

    >>> from gintrain.lib.common_utils import stack_forest
    >>> stacked = stack_forest([{'loss': 1.0}, {'loss': 0.5}])
    >>> stacked['loss'].tolist(), stacked['loss'].dtype
    ([1.0, 0.5], dtype('float32'))
  """
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *forest)


def _first_replica(x):
  """The first local device's slice of a pmapped output, without its axis."""
  return x.addressable_shards[0].data.squeeze(0)


def get_metrics(device_metrics):
  """Gathers replicated per-step metrics of a pmapped function to the host.

  Takes the first local replica of every leaf (the outputs of a pmapped
  function are replicated, e.g. after ``lax.pmean``), copies it to the host
  and stacks over time.

  Args:
    device_metrics: a sequence of replicated, device-resident pytrees of
      metrics, one per step (leaves have a leading device axis).

  Returns:
    A pytree of host-local arrays stacked over time: shape ``(T, ...)``, the
    per-step dtype kept.
  """
  first = jax.tree_util.tree_map(_first_replica, device_metrics)
  return stack_forest(jax.device_get(first))


def onehot(labels, num_classes, on_value=1.0, off_value=0.0):
  """Creates a dense one-hot version of an array of indices.

  NB: consider the more standard ``jax.nn.one_hot`` instead.

  Args:
    labels: an n-dim array of integer indices.
    num_classes: the number of classes (one more than the largest index).
    on_value: value at the index, defaults to 1.0.
    off_value: value elsewhere, defaults to 0.0.

  Returns:
    A float32 array of shape ``labels.shape + (num_classes,)``. A label
    outside ``[0, num_classes)`` (negative included) gives a row of
    ``off_value``.

  Example::

    >>> import jax.numpy as jnp
    >>> from gintrain.lib.common_utils import onehot
    >>> onehot(jnp.array([0, 2, 5]), 3).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
  """
  classes = jnp.arange(num_classes).reshape((1,) * labels.ndim + (-1,))
  is_on = labels[..., None] == classes
  values = lax.select(is_on, jnp.full(is_on.shape, on_value),
                      jnp.full(is_on.shape, off_value))
  return values.astype(jnp.float32)
