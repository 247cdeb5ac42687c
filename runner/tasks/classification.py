"""Classification: softmax cross-entropy on integer labels, and accuracy.

Labels may be one per example (``(batch,)``, logits ``(batch, classes)``)
or one per position (``(batch, time)``, logits ``(batch, time, classes)``,
e.g. token labels); every labelled element counts once. An optional
``batch['weights']`` (same shape as the labels) weights the elements, e.g.
to mask padding in sequences.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gintrain.runner.errors import RunnerError
from gintrain.runner.tasks import base
from gintrain.runner.tasks import losses

__all__ = ['Classification', 'classification']


class Classification(base.Task):
  """Cross-entropy loss; ``accuracy`` in training and eval.

  Args:
    model: outputs logits ``(..., num_classes)``.
    input_key: the batch entry fed to the model.
    label_key: the batch entry holding integer labels.
  """

  def __init__(self, model: Any, input_key: str = 'x', label_key: str = 'y'):
    super().__init__(model, input_key)
    self.label_key = label_key

  def _labels(self, batch):
    if self.label_key not in batch:
      raise KeyError(f'{self.name}: the batch has no {self.label_key!r}'
                     f' entry (keys: {sorted(batch)}); set label_key.')
    return batch[self.label_key]

  def check(self, variables, batch, info: Mapping[str, Any]):
    num_classes = info.get('num_classes')
    logits = jax.eval_shape(self.apply_eval, variables['params'],
                            {k: v for k, v in variables.items()
                             if k != 'params'}, self.inputs(batch))
    labels = self._labels(batch)
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
      raise RunnerError(
          f'classification: the model outputs {tuple(logits.shape)} for'
          f' labels {tuple(labels.shape)}; logits must be the labels\' shape'
          ' plus one axis of classes.')
    if num_classes is not None and logits.shape[-1] != num_classes:
      raise RunnerError(
          f'classification: {self.caller.name} outputs {logits.shape[-1]}'
          f' logits but the data has {num_classes} classes; set the model\'s'
          f' number of classes to {num_classes} (e.g.'
          f' --gin.mlp.num_classes={num_classes}).')

  def loss(self, params, mutable, batch, rng):
    logits, new = self.apply_train(params, mutable, self.inputs(batch), rng)
    labels = self._labels(batch)
    weights = batch.get('weights')
    loss = losses.cross_entropy_loss(logits, labels, weights)
    return loss, {'accuracy': losses.accuracy(logits, labels, weights)}, new

  def eval(self, params, mutable, batch):
    logits = self.apply_eval(params, mutable, self.inputs(batch))
    labels = self._labels(batch)
    mask = batch['mask'].astype(jnp.float32)
    weights = jnp.reshape(mask, mask.shape + (1,) * (labels.ndim - 1))
    weights = jnp.broadcast_to(weights, labels.shape)
    if 'weights' in batch:
      weights = weights * batch['weights'].astype(jnp.float32)
    return {'count': jnp.sum(weights),
            'loss': jnp.sum(losses.cross_entropy(logits, labels) * weights),
            'accuracy': jnp.sum(losses.correct(logits, labels) * weights)}


def classification(model: Any, input_key: str = 'x',
                   label_key: str = 'y') -> Classification:
  """A :class:`Classification` task (the gin factory)."""
  return Classification(model, input_key=input_key, label_key=label_key)
