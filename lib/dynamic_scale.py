"""Dynamic loss scaling for low-precision (float16) gradients.

A drop-in for ``flax.training.dynamic_scale``: the same class, fields, pytree
layout, state dict and results.

Gradients computed in float16 underflow to zero when they are small and
overflow to ``inf`` when they are large. Dynamic loss scaling multiplies the
loss by a large ``scale`` before differentiating (so small gradients survive),
divides the gradients by it again in float32, and adapts ``scale``: it shrinks
by ``backoff_factor`` after any non-finite gradient and grows by
``growth_factor`` after ``growth_interval`` finite steps in a row. The caller
skips the update of a step whose gradients were not finite::

    >>> import jax, jax.numpy as jnp
    >>> from gintrain.lib.dynamic_scale import DynamicScale
    >>> def loss_fn(p):
    ...   return jnp.asarray(p, jnp.float16) ** 2
    >>> step = jax.jit(lambda ds, p: ds.value_and_grad(loss_fn)(p))
    >>> ds, p = DynamicScale(growth_interval=10), jnp.float32(1.)
    >>> for _ in range(3):
    ...   ds, is_fin, loss, grad = step(ds, p)
    ...   p = p - jnp.where(is_fin, 0.01 * grad, 0.)  # skip non-finite steps
    ...   print(bool(is_fin), float(ds.scale), int(ds.fin_steps))
    False 32768.0 0
    False 16384.0 0
    True 16384.0 1

The first two steps overflow float16, whose largest value is 65504 (the
scaled gradient ``2 * scale * p`` is 131072, then 65536), so the scale backs
off twice before the third step succeeds.
"""

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from gintrain.lib import struct

__all__ = ['DynamicScale', 'DynamicScaleResult']

_FLOAT32_MAX = jnp.finfo(jnp.float32).max


class DynamicScaleResult(NamedTuple):
  """What the function returned by ``DynamicScale.value_and_grad`` returns.

  Attributes:
    dynamic_scale: the updated :class:`DynamicScale` to use for the next step.
    finite: a boolean scalar array, True iff every gradient leaf is finite.
    aux: the unscaled value of ``fun``, or ``(value, aux)`` with ``has_aux``.
    grad: the unscaled gradients, as float32 (averaged over ``axis_name``).
  """
  dynamic_scale: 'DynamicScale'
  finite: Any
  aux: Any
  grad: Any


class DynamicScale(struct.PyTreeNode):
  """Dynamic loss scaling (a :mod:`lib.struct` pytree, as in flax).

  ``fin_steps`` and ``scale`` are the pytree leaves (and the state dict
  ``{'fin_steps': ..., 'scale': ...}`` that checkpoints store); the other
  fields are static (part of the treedef).

  Attributes:
    growth_factor: ``scale`` is multiplied by this after ``growth_interval``
      finite steps in a row (default 2.0); it never exceeds float32's max.
    backoff_factor: ``scale`` is multiplied by this after a step with a
      non-finite gradient (default 0.5).
    growth_interval: how many finite steps in a row make ``scale`` grow
      (default 2000).
    fin_steps: how many steps in a row have had finite gradients since the
      last change of ``scale`` (default 0).
    scale: the current factor the loss is multiplied by (default 65536.0).
    minimum_scale: ``scale`` never backs off below this (default: float32's
      smallest normal number); None means no lower bound.
  """

  growth_factor: float = struct.field(pytree_node=False, default=2.0)
  backoff_factor: float = struct.field(pytree_node=False, default=0.5)
  growth_interval: int = struct.field(pytree_node=False, default=2000)
  fin_steps: Any = 0
  scale: Any = 65536.0
  minimum_scale: float | None = struct.field(
      pytree_node=False, default=jnp.finfo(jnp.float32).tiny)

  def value_and_grad(
      self,
      fun: Callable[..., Any],
      argnums: int | Sequence[int] = 0,
      has_aux: bool = False,
      axis_name: str | None = None,
  ) -> Callable[..., DynamicScaleResult]:
    """Like ``jax.value_and_grad(fun, argnums, has_aux)``, with loss scaling.

    The returned function, called with ``fun``'s arguments:

    1. differentiates ``self.scale * fun(*args)`` (only the first output with
       ``has_aux``) with respect to the ``argnums`` arguments;
    2. divides the value by ``scale`` again, and each gradient leaf, cast to
       float32, by ``scale``;
    3. with ``axis_name``, averages the gradients over that mapped axis
       (``lax.pmean``; for ``pmap``/``shard_map``, not needed under SPMD jit);
    4. ``finite`` is True iff every gradient leaf is free of inf and NaN;
    5. the new state: if finite and ``fin_steps == growth_interval``, ``scale``
       grows by ``growth_factor`` (capped at float32's max) and ``fin_steps``
       restarts at 0; if finite otherwise, ``fin_steps`` counts up by one;
       if not finite, ``scale`` backs off by ``backoff_factor`` (down to
       ``minimum_scale``) and ``fin_steps`` restarts at 0.

    Args:
      fun: the function to differentiate; it returns a scalar, or
        ``(scalar, aux)`` with ``has_aux``.
      argnums: the positional argument(s) to differentiate (default 0).
      has_aux: whether ``fun`` returns ``(value, aux)``.
      axis_name: a ``pmap``/``shard_map`` axis to average the gradients over.

    Returns:
      A function of ``fun``'s arguments that returns a
      :class:`DynamicScaleResult` ``(dynamic_scale, finite, aux, grad)``,
      where ``aux`` is the unscaled value (or ``(value, aux)``).
    """
    scale = self.scale

    @functools.wraps(fun)
    def scaled_fun(*args):
      out = fun(*args)
      if has_aux:
        value, aux = out
        return scale * value, aux
      return scale * out

    scaled_value_and_grad = jax.value_and_grad(scaled_fun, argnums, has_aux)

    def value_and_unscaled_grad(*args) -> DynamicScaleResult:
      out, grad = scaled_value_and_grad(*args)
      if has_aux:
        out = (out[0] / scale, out[1])
      else:
        out = out / scale
      grad = jax.tree_util.tree_map(
          lambda g: jnp.asarray(g, jnp.float32) / scale, grad)
      if axis_name is not None:
        grad = lax.pmean(grad, axis_name)
      finite = jnp.array(True)
      for leaf in jax.tree_util.tree_leaves(grad):
        finite &= jnp.all(lax.is_finite(leaf))
      return DynamicScaleResult(self._next(finite), finite, out, grad)

    return value_and_unscaled_grad

  def _next(self, finite) -> 'DynamicScale':
    """The state after a step whose gradients were (not) ``finite``."""
    grow = self.fin_steps == self.growth_interval
    grown = jnp.minimum(self.scale * self.growth_factor, _FLOAT32_MAX)
    kept_or_grown = jnp.where(grow & finite, grown, self.scale)
    backed_off = self.scale * self.backoff_factor
    if self.minimum_scale is not None:
      backed_off = jnp.maximum(backed_off, self.minimum_scale)
    return self.replace(
        fin_steps=jnp.where(grow | ~finite, 0, self.fin_steps + 1),
        scale=jnp.where(finite, kept_or_grown, backed_off))
