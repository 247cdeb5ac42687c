"""Regression: mean squared error on real-valued targets.

Targets ``(batch,)`` or ``(batch, k)``; the model outputs ``(batch, k)``
(``(batch, 1)`` for scalar targets). The loss is the squared error averaged
over examples and outputs; ``mae`` is the mean absolute error.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gintrain.runner.errors import RunnerError
from gintrain.runner.tasks import base

__all__ = ['Regression', 'regression']


class Regression(base.Task):
  """Mean squared error (``loss``) and mean absolute error (``mae``).

  Args:
    model: outputs ``(batch, k)``.
    input_key: the batch entry fed to the model.
    target_key: the batch entry holding the targets.
  """

  def __init__(self, model: Any, input_key: str = 'x',
               target_key: str = 'y'):
    super().__init__(model, input_key)
    self.target_key = target_key

  def _pair(self, out, batch):
    target = batch[self.target_key].astype(jnp.float32)
    if target.ndim == 1:
      target = target[:, None]
    return out.astype(jnp.float32), target

  def check(self, variables, batch, info: Mapping[str, Any]):
    out = jax.eval_shape(self.apply_eval, variables['params'],
                         {k: v for k, v in variables.items()
                          if k != 'params'}, self.inputs(batch))
    target = batch[self.target_key]
    width = 1 if len(target.shape) == 1 else target.shape[-1]
    if len(out.shape) != 2 or out.shape[-1] != width:
      raise RunnerError(
          f'regression: {self.caller.name} outputs {tuple(out.shape)} but the'
          f' targets are {tuple(target.shape)}; the model needs {width}'
          f' output(s) per example (e.g. --gin.mlp.num_classes={width}).')

  def loss(self, params, mutable, batch, rng):
    out, new = self.apply_train(params, mutable, self.inputs(batch), rng)
    out, target = self._pair(out, batch)
    err = out - target
    return jnp.mean(err ** 2), {'mae': jnp.mean(jnp.abs(err))}, new

  def eval(self, params, mutable, batch):
    out = self.apply_eval(params, mutable, self.inputs(batch))
    out, target = self._pair(out, batch)
    mask = batch['mask'].astype(jnp.float32)
    err = out - target
    return {'count': jnp.sum(mask),
            'loss': jnp.sum(jnp.mean(err ** 2, axis=-1) * mask),
            'mae': jnp.sum(jnp.mean(jnp.abs(err), axis=-1) * mask)}


def regression(model: Any, input_key: str = 'x',
               target_key: str = 'y') -> Regression:
  """A :class:`Regression` task (the gin factory)."""
  return Regression(model, input_key=input_key, target_key=target_key)
