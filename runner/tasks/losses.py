"""Classification losses and metrics on logits and integer labels.

Logits are ``(..., num_classes)`` and labels the leading shape ``(...)``:
``(batch,)`` for one label per example, ``(batch, time)`` for sequences.
The per-element functions return that leading shape; the ``*_loss`` /
``accuracy`` means take optional ``weights`` (e.g. a padding mask).

    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[2., 0.], [0., 2.]])
    >>> labels = jnp.array([0, 0])
    >>> float(accuracy(logits, labels))
    0.5
    >>> round(float(cross_entropy_loss(jnp.zeros((3, 4)), jnp.array([0, 1, 2]))), 4)
    1.3863
    >>> cross_entropy(jnp.zeros((2, 5, 4)), jnp.zeros((2, 5), int)).shape
    (2, 5)
"""

import jax
import jax.numpy as jnp
import optax

__all__ = ['cross_entropy', 'correct', 'cross_entropy_loss', 'accuracy',
           'weighted_mean']


def _check(logits, labels):
  if jnp.ndim(logits) < 2 or jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(
        f'logits must be (..., num_classes) and labels (...) with the same'
        f' leading shape; got logits {jnp.shape(logits)} and labels'
        f' {jnp.shape(labels)}.')


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per element (``labels.shape``), in float32 at
  least (``optax.softmax_cross_entropy_with_integer_labels``)."""
  _check(logits, labels)
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.asarray(labels).astype(jnp.int32))


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the arg-max logit is the label, else 0.0 (float32)."""
  _check(logits, labels)
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def weighted_mean(values: jax.Array, weights: jax.Array | None = None):
  """``sum(values * weights) / sum(weights)`` (the plain mean if None)."""
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(
      jnp.reshape(weights, jnp.shape(weights) + (1,) * (
          jnp.ndim(values) - jnp.ndim(weights))), jnp.shape(values))
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy (over ``weights`` if given)."""
  return weighted_mean(cross_entropy(logits, labels), weights)


def accuracy(logits: jax.Array, labels: jax.Array,
             weights: jax.Array | None = None) -> jax.Array:
  """Fraction of elements whose arg-max logit is the label (float32)."""
  return weighted_mean(correct(logits, labels), weights)
