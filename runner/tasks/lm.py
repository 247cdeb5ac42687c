"""Language modelling: next-token cross-entropy over ``tokens``.

The batch holds ``tokens`` ``(batch, length + 1)`` (ints) and optionally
``weights`` of the same shape (1.0 for real tokens, 0.0 for padding). The
model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; a target
counts where its weight is 1. Eval reports the mean ``loss`` (nats per
token), ``accuracy``, ``perplexity`` and ``bits_per_byte`` (``loss / ln 2``:
for byte-level tokens, bits per byte), and the data's unigram baseline
``unigram_bits_per_byte`` when the source reports one.

Packed rows (``runner.data.packing``) also hold ``segment_ids`` and
``positions``; a model whose ``apply`` takes ``segment_ids`` (and
``positions``) gets them, so attention stays within each document. When
the source's ``info`` has ``token_bytes`` (each token's length in bytes,
from a tokenizer other than bytes), eval also sums the predicted bytes and
``bits_per_byte`` is the loss per byte, not per token
(``bytes_per_token`` is reported too), so byte and BPE runs compare. A
model whose vocabulary is smaller than the tokenizer's is refused.
"""

import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gintrain.runner.errors import RunnerError
from gintrain.runner.models import calling
from gintrain.runner.tasks import base
from gintrain.runner.tasks import losses

__all__ = ['LanguageModel', 'language_model']


_PACKED_KEYS = ('segment_ids', 'positions')


def _takes(fn, name) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


class _Packed:
  """``model`` called with ``{'tokens', 'segment_ids', 'positions'}`` (or
  plain tokens): the dict is spread into its ``apply`` keywords. Keeps the
  signatures of ``model.init``/``apply`` for the ModelCaller."""

  def __init__(self, model):
    self.model = model
    self.name = getattr(model, 'name', None) or type(model).__name__
    keys = [k for k in _PACKED_KEYS if _takes(model.apply, k)]

    def apply(variables, x, *args, **kwargs):
      if isinstance(x, Mapping):
        extra = {k: x[k] for k in keys if k in x}
        return model.apply(variables, x['tokens'], *args, **extra, **kwargs)
      return model.apply(variables, x, *args, **kwargs)

    def init(rng, x, *args, **kwargs):
      if isinstance(x, Mapping):
        x = x['tokens']
      return model.init(rng, x, *args, **kwargs)
    apply.__signature__ = inspect.signature(model.apply)
    init.__signature__ = inspect.signature(model.init)
    self.apply, self.init = apply, init


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
    self._packed = _takes(model.apply, 'segment_ids')
    if self._packed:
      self.caller = calling.ModelCaller(_Packed(model))
    self._token_bytes = None

  def inputs(self, batch):
    tokens = super().inputs(batch)[:, :-1]
    if self._packed and 'segment_ids' in batch:
      return {'tokens': tokens, **{k: batch[k][:, :-1] for k in _PACKED_KEYS
                                   if k in batch}}
    return tokens

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
    if vocab is not None and logits.shape[-1] < vocab:
      raise RunnerError(
          f'language model: {self.caller.name} outputs {logits.shape[-1]}'
          f' logits per token but the data\'s tokenizer'
          f' ({info.get("tokenizer", "byte")}) has a vocabulary of {vocab};'
          f' set the model\'s vocab_size to at least {vocab}.')
    table = info.get('token_bytes')
    if table is not None and info.get('tokenizer', 'byte') != 'byte':
      table = jnp.zeros(logits.shape[-1], jnp.float32).at[:len(table)].set(
          jnp.asarray(table, jnp.float32))
      self._token_bytes = table

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
    out = {'count': jnp.sum(weights),
           'loss': jnp.sum(losses.cross_entropy(logits, targets) * weights),
           'accuracy': jnp.sum(losses.correct(logits, targets) * weights)}
    if self._token_bytes is not None:
      out['bytes_per_token'] = jnp.sum(self._token_bytes[targets] * weights)
    return out

  def summarize(self, means):
    out = dict(means)
    if 'loss' in out:
      out['perplexity'] = math.exp(min(out['loss'], 700.0))
      out['bits_per_byte'] = out['loss'] / math.log(2)
      if out.get('bytes_per_token'):
        out['bits_per_byte'] /= out['bytes_per_token']
    if 'unigram_bits_per_byte' in self.info:
      out['unigram_bits_per_byte'] = float(self.info['unigram_bits_per_byte'])
    return out


def language_model(model: Any, tokens_key: str = 'tokens') -> LanguageModel:
  """A :class:`LanguageModel` task (the gin factory)."""
  return LanguageModel(model, tokens_key=tokens_key)
