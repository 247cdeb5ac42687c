"""Language modelling: next-token cross-entropy over ``tokens``.

The batch holds ``tokens`` ``(batch, length + 1)`` (ints) and optionally
``weights`` of the same shape (1.0 for real tokens, 0.0 for padding). The
model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; a target
counts where its weight is 1. Eval reports the mean ``loss`` (nats per
token), ``accuracy``, ``perplexity`` and ``bits_per_byte`` (``loss / ln 2``:
for byte-level tokens, bits per byte), and the data's unigram baseline
``unigram_bits_per_byte`` when the source reports one.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gintrain.runner.errors import RunnerError
from gintrain.runner.tasks import base
from gintrain.runner.tasks import losses

__all__ = ['LanguageModel', 'language_model']


class LanguageModel(base.Task):
  """Next-token prediction (see the module doc).

  Args:
    model: maps tokens ``(batch, length)`` to logits ``(batch, length,
      vocab)``.
    tokens_key: the batch entry holding the tokens.
  """

  def __init__(self, model: Any, tokens_key: str = 'tokens'):
    super().__init__(model, tokens_key)
    self.info: Mapping[str, Any] = {}

  def inputs(self, batch):
    return super().inputs(batch)[:, :-1]

  def _targets(self, batch):
    tokens = batch[self.input_key]
    weights = batch.get('weights')
    weights = (jnp.ones(tokens.shape, jnp.float32) if weights is None
               else weights.astype(jnp.float32))
    return tokens[:, 1:], weights[:, 1:]

  def check(self, variables, batch, info):
    self.info = dict(info)
    logits = jax.eval_shape(
        lambda v, b: self.apply_eval(
            v['params'], {k: x for k, x in v.items() if k != 'params'},
            self.inputs(b)), variables, batch)
    vocab = info.get('vocab_size')
    if vocab is not None and logits.shape[-1] != vocab:
      raise RunnerError(
          f'language model: {self.caller.name} outputs {logits.shape[-1]}'
          f' logits per token but the data has a vocabulary of {vocab}; set'
          f' the model\'s vocab_size to {vocab}.')

  def loss_weight(self, batch):
    return jnp.sum(self._targets(batch)[1])

  def loss(self, params, mutable, batch, rng):
    logits, new = self.apply_train(params, mutable, self.inputs(batch), rng)
    targets, weights = self._targets(batch)
    loss = losses.cross_entropy_loss(logits, targets, weights)
    return loss, {'accuracy': losses.accuracy(logits, targets, weights)}, new

  def eval(self, params, mutable, batch):
    logits = self.apply_eval(params, mutable, self.inputs(batch))
    targets, weights = self._targets(batch)
    weights = weights * batch['mask'].astype(jnp.float32)[:, None]
    return {'count': jnp.sum(weights),
            'loss': jnp.sum(losses.cross_entropy(logits, targets) * weights),
            'accuracy': jnp.sum(losses.correct(logits, targets) * weights)}

  def summarize(self, means):
    out = dict(means)
    if 'loss' in out:
      out['perplexity'] = math.exp(min(out['loss'], 700.0))
      out['bits_per_byte'] = out['loss'] / math.log(2)
    if 'unigram_bits_per_byte' in self.info:
      out['unigram_bits_per_byte'] = float(self.info['unigram_bits_per_byte'])
    return out


def language_model(model: Any, tokens_key: str = 'tokens') -> LanguageModel:
  """A :class:`LanguageModel` task (the gin factory)."""
  return LanguageModel(model, tokens_key=tokens_key)
