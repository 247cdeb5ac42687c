"""Classification loss and accuracy on logits and integer labels.

    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[2., 0.], [0., 2.]])
    >>> labels = jnp.array([0, 0])
    >>> float(accuracy(logits, labels))
    0.5
    >>> round(float(cross_entropy_loss(jnp.zeros((3, 4)), jnp.array([0, 1, 2]))), 4)
    1.3863
"""

import jax
import jax.numpy as jnp

__all__ = ['cross_entropy_loss', 'accuracy']


def _check(logits, labels):
  if jnp.ndim(logits) != 2 or jnp.shape(labels) != jnp.shape(logits)[:1]:
    raise ValueError(
        f'logits must be (batch, num_classes) and labels (batch,); got'
        f' logits {jnp.shape(logits)} and labels {jnp.shape(labels)}.')


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``logits`` (batch, classes) against
  integer ``labels`` (batch,); computed in float32 at least."""
  _check(logits, labels)
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32),
                               axis=-1)
  return -jnp.mean(picked)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max logit is the label (float32 scalar)."""
  _check(logits, labels)
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
