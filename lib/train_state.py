"""``TrainState``: ``flax.training.train_state`` without flax.

A frozen pytree holding the step counter, the parameters, one Optax
optimizer and its state. Its leaves, state dict and ``to_bytes`` encoding are
the same as flax's ``TrainState``, so checkpoints written by either restore
into the other.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

from gintrain.lib import struct

__all__ = ['TrainState', 'OVERWRITE_WITH_GRADIENT']

# Name of the params collection whose values are replaced by their
# "gradients" instead of being optimised (flax's fp8 ``OVERWRITE_WITH_GRADIENT``).
OVERWRITE_WITH_GRADIENT = '_overwrite_with_gradient'


def _has_overwrite_collection(tree) -> bool:
  return not isinstance(tree, jax.Array) and OVERWRITE_WITH_GRADIENT in tree


class TrainState(struct.PyTreeNode):
  """Simple train state for the common case of a single Optax optimizer.

  Example usage (a hand-written linear model in place of ``flax.linen``)::

    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> from gintrain.lib.train_state import TrainState

    >>> x = jnp.ones((1, 2))
    >>> y = jnp.ones((1, 2))
    >>> def apply_fn(variables, x):
    ...   p = variables['params']
    ...   return x @ p['kernel'] + p['bias']
    >>> params = {'kernel': jnp.array([[0.5, -1.0], [0.25, 2.0]]),
    ...           'bias': jnp.zeros((2,))}

    >>> state = TrainState.create(
    ...     apply_fn=apply_fn, params=params, tx=optax.adam(1e-3))

    >>> def loss_fn(params, x, y):
    ...   predictions = state.apply_fn({'params': params}, x)
    ...   return optax.l2_loss(predictions=predictions, targets=y).mean()
    >>> loss_fn(state.params, x, y)
    Array(0.015625, dtype=float32)

    >>> grads = jax.grad(loss_fn)(state.params, x, y)
    >>> state = state.apply_gradients(grads=grads)
    >>> state.step
    1
    >>> loss_fn(state.params, x, y)
    Array(0.01525225, dtype=float32)

  Subclass it to carry more data (e.g. other variable collections); extra
  fields are passed as keyword arguments to :meth:`create`. For more exotic
  uses (e.g. several optimizers) write your own class.

  Attributes:
    step: counter, starts at 0 and is incremented by every call to
      :meth:`apply_gradients`.
    apply_fn: usually ``model.apply``; kept here (static, not a leaf) so a
      ``train_step`` needs fewer arguments.
    params: the parameters updated by ``tx`` and used by ``apply_fn``.
    tx: an Optax gradient transformation (static, not a leaf).
    opt_state: the state of ``tx``.
  """

  step: int | jax.Array
  apply_fn: Callable = struct.field(pytree_node=False)
  params: Any = struct.field(pytree_node=True)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  opt_state: optax.OptState = struct.field(pytree_node=True)

  def apply_gradients(self, *, grads, **kwargs):
    """Returns the state after one optimizer step.

    Calls ``self.tx.update(grads, opt_state, params)`` and then
    ``optax.apply_updates``. If ``grads`` has a ``'_overwrite_with_gradient'``
    entry, only ``grads['params']`` is optimised (against
    ``params['params']``) and the new params are
    ``{'params': updated, '_overwrite_with_gradient':
    grads['_overwrite_with_gradient']}``.

    Args:
      grads: gradients with the same pytree structure as ``self.params``.
      **kwargs: other fields to replace (as with ``.replace()``).

    Returns:
      A copy of ``self`` with ``step`` incremented by one, new ``params`` and
      ``opt_state``, and the fields in ``kwargs`` replaced.
    """
    overwrite = OVERWRITE_WITH_GRADIENT in grads
    if overwrite:
      grads_to_opt, params_to_opt = grads['params'], self.params['params']
    else:
      grads_to_opt, params_to_opt = grads, self.params
    updates, new_opt_state = self.tx.update(grads_to_opt, self.opt_state,
                                            params_to_opt)
    optimised = optax.apply_updates(params_to_opt, updates)
    if overwrite:
      new_params = {
          'params': optimised,
          OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT],
      }
    else:
      new_params = optimised
    return self.replace(
        step=self.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        **kwargs,
    )

  @classmethod
  def create(cls, *, apply_fn, params, tx, **kwargs):
    """Creates a new instance with ``step=0`` and ``opt_state=tx.init(...)``.

    The optimizer state covers ``params['params']`` when ``params`` has a
    ``'_overwrite_with_gradient'`` collection (which needs no optimizer
    state), else all of ``params``. ``kwargs`` fill subclass fields.
    """
    to_opt = params['params'] if _has_overwrite_collection(params) else params
    return cls(
        step=0,
        apply_fn=apply_fn,
        params=params,
        tx=tx,
        opt_state=tx.init(to_opt),
        **kwargs,
    )
