"""Eval masking, for every data source and every task (issue 26, item 3).

Eval batches are padded to whole batches and masked: the data sources set
``mask`` (1.0 real row, 0.0 padding) and the tasks sum each metric over the
real elements only (rows with mask 1, and, where the batch has per-element
``weights``, elements of weight 1). Shown here, with models defined in this
file whose outputs the test chooses (so every metric has an exact numpy
oracle):

* each data source's eval batches, for an eval set that is not a multiple
  of the eval batch (on 1 and 2 processes), hold every eval example exactly
  once among the rows of mask 1, and the mask sums to the set's size;
* each task's eval sums on a padded batch equal the oracle's sums over the
  real elements, for every metric, whatever the padding holds (padding made
  of right answers and of wrong ones), and ``count`` is the number of real
  elements (for the language model: the real next-token targets);
* the language model's ``bits_per_byte`` is ``loss / ln 2``.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.runner.data import base
from gintrain.runner.data import datasets
from gintrain.runner.data.arrays import ArraySource
from gintrain.runner.data.grain_source import GrainSource
from gintrain.runner.tasks.classification import Classification
from gintrain.runner.tasks.lm import LanguageModel
from gintrain.runner.tasks.regression import Regression


# --- data sources ---------------------------------------------------------------


def _sources(n_eval):
  x_test = np.arange(n_eval, dtype=np.float32)[:, None] * np.ones(
      (1, 3), np.float32)
  y_test = np.arange(n_eval, dtype=np.int32) % 3
  dataset = datasets.Dataset(np.zeros((8, 3), np.float32),
                             np.zeros((8,), np.int32), x_test, y_test, 3)
  examples = [{'x': x_test[i], 'y': y_test[i]} for i in range(n_eval)]
  return {'arrays': lambda: ArraySource(dataset),
          'grain': lambda: GrainSource(examples[:1] * 8, examples,
                                       shuffle=False)}


@pytest.mark.parametrize('kind', ['arrays', 'grain'])
@pytest.mark.parametrize('n_eval,eval_batch', [(7, 4), (9, 4), (5, 2),
                                               (3, 8)])
@pytest.mark.parametrize('processes', [1, 2])
def test_eval_batches_cover_the_set_once(kind, n_eval, eval_batch, processes):
  real, total_mask, rows = [], 0.0, 0
  for p in range(processes):
    source = _sources(n_eval)[kind]()
    source.bind(base.Spec(batch_size=4, eval_batch_size=eval_batch, seed=0,
                          process_index=p, process_count=processes))
    for batch in source.eval_batches():
      mask = np.asarray(batch['mask'])
      assert mask.shape == (eval_batch // processes,)
      assert set(mask.tolist()) <= {0.0, 1.0}
      total_mask += float(mask.sum())
      rows += len(mask)
      real += [int(v) for v in np.asarray(batch['x'])[mask == 1, 0]]
  assert total_mask == n_eval
  assert sorted(real) == list(range(n_eval))
  assert rows == -(-n_eval // eval_batch) * eval_batch  # whole batches


# --- tasks -----------------------------------------------------------------------


class Outputs:
  """A model whose output is its input (plus a zero parameter): the test
  chooses the logits / predictions."""

  def init(self, rng, x):
    del rng, x
    return {'params': {'b': jnp.zeros((), jnp.float32)}}

  def apply(self, variables, x):
    return jnp.asarray(x, jnp.float32) + variables['params']['b']


class Lookup:
  """A language model whose logits at a position are row ``token`` of a
  fixed table (so the test knows every logit)."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def init(self, rng, tokens):
    del rng, tokens
    return {'params': {'b': jnp.zeros((), jnp.float32)}}

  def apply(self, variables, tokens):
    return self.table[tokens] + variables['params']['b']


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _oracle(logits, labels, weights):
  """Cross-entropy and accuracy sums, and the count, over ``weights``."""
  ce = -np.take_along_axis(_log_softmax(logits.astype(np.float64)),
                           labels[..., None], -1)[..., 0]
  correct = (logits.argmax(-1) == labels).astype(np.float64)
  return {'count': weights.sum(), 'loss': (ce * weights).sum(),
          'accuracy': (correct * weights).sum()}


def _eval(task, batch):
  variables = task.init(None, batch)
  sums = task.eval(variables['params'], {}, batch)
  return {k: float(v) for k, v in sums.items()}


def _check(got, want):
  assert set(got) == set(want), (got, want)
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-4), (
        key, got, want)


# Padding made of right answers ('right') and of wrong ones ('wrong'): a
# metric that counts padding differs from the oracle for one of them.
PADDING = ['right', 'wrong']


def _pad_labels(logits, rng, padding):
  best = logits.argmax(-1)
  if padding == 'right':
    return best
  return (best + rng.integers(1, logits.shape[-1], best.shape)) % (
      logits.shape[-1])


@pytest.mark.parametrize('padding', PADDING)
def test_classification_per_example(padding):
  rng = np.random.default_rng(0)
  rows, real, classes = 8, 5, 4
  logits = rng.normal(size=(rows, classes)).astype(np.float32) * 3
  labels = rng.integers(0, classes, rows)
  labels[real:] = _pad_labels(logits, rng, padding)[real:]
  mask = (np.arange(rows) < real).astype(np.float32)
  got = _eval(Classification(Outputs()), {'x': logits, 'y': labels,
                                          'mask': mask})
  _check(got, _oracle(logits, labels, mask))
  assert got['count'] == real


@pytest.mark.parametrize('padding', PADDING)
def test_classification_per_token_weights(padding):
  """Sequence labels with per-element ``weights`` (padding tokens) inside
  real rows, and padded rows: only real tokens of real rows count."""
  rng = np.random.default_rng(1)
  rows, time, classes = 6, 7, 5
  logits = rng.normal(size=(rows, time, classes)).astype(np.float32) * 3
  lengths = np.array([7, 3, 5, 1, 7, 4])
  weights = (np.arange(time)[None] < lengths[:, None]).astype(np.float32)
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  real = weights * mask[:, None]
  labels = rng.integers(0, classes, (rows, time))
  labels = np.where(real > 0, labels, _pad_labels(logits, rng, padding))
  got = _eval(Classification(Outputs()), {'x': logits, 'y': labels,
                                          'weights': weights, 'mask': mask})
  _check(got, _oracle(logits, labels, real))
  assert got['count'] == 7 + 3 + 5 + 1


@pytest.mark.parametrize('padding', ['near', 'far'])
@pytest.mark.parametrize('width', [1, 3])
def test_regression(padding, width):
  rng = np.random.default_rng(2)
  rows, real = 8, 3
  pred = rng.normal(size=(rows, width)).astype(np.float32)
  target = pred + rng.normal(size=(rows, width)).astype(np.float32)
  target[real:] = pred[real:] + (0.0 if padding == 'near' else 10.0)
  if width == 1:
    target = target[:, 0]
  mask = (np.arange(rows) < real).astype(np.float32)
  got = _eval(Regression(Outputs()), {'x': pred, 'y': target, 'mask': mask})
  err = pred.astype(np.float64) - target.reshape(rows, width)
  want = {'count': float(real),
          'loss': ((err ** 2).mean(-1) * mask).sum(),
          'mae': (np.abs(err).mean(-1) * mask).sum()}
  _check(got, want)


@pytest.mark.parametrize('padding', PADDING)
def test_language_model(padding):
  """Tokens ``(rows, length + 1)`` with trailing padding (weight 0) and
  padded rows: the targets are ``tokens[:, 1:]``, a target counts where its
  own weight is 1 and its row is real."""
  rng = np.random.default_rng(3)
  vocab, rows, length = 6, 5, 8
  table = rng.normal(size=(vocab, vocab)).astype(np.float32) * 3
  tokens = rng.integers(0, vocab, (rows, length + 1))
  lengths = np.array([9, 4, 6, 2, 9])  # real tokens per row (inputs too)
  weights = (np.arange(length + 1)[None] < lengths[:, None]).astype(
      np.float32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)
  # Padding targets: the next token is the model's arg-max (or not).
  best = table.argmax(-1)
  for r in range(rows):
    for t in range(1, length + 1):
      if weights[r, t] == 0 or mask[r] == 0:
        tokens[r, t] = best[tokens[r, t - 1]] if padding == 'right' else (
            best[tokens[r, t - 1]] + 1) % vocab
  task = LanguageModel(Lookup(table))
  got = _eval(task, {'tokens': tokens, 'weights': weights, 'mask': mask})
  real = weights[:, 1:] * mask[:, None]
  want = _oracle(table[tokens[:, :-1]], tokens[:, 1:], real)
  _check(got, want)
  assert got['count'] == (9 - 1) + (4 - 1) + (6 - 1) + (2 - 1)
  # The train loss weights the same targets (gradient accumulation's
  # microbatch weight) and averages over them.
  assert float(task.loss_weight({'tokens': tokens, 'weights': weights})) == (
      weights[:, 1:].sum())


def test_language_model_summary_bits_per_byte():
  task = LanguageModel(Lookup(np.zeros((4, 4))))
  out = task.summarize({'loss': 1.5, 'accuracy': 0.25})
  assert out['bits_per_byte'] == pytest.approx(1.5 / math.log(2), rel=1e-12)
  assert out['perplexity'] == pytest.approx(math.exp(1.5), rel=1e-12)
  assert out['loss'] == 1.5 and out['accuracy'] == 0.25
  # A uniform model over 256 bytes costs exactly 8 bits per byte.
  assert task.summarize({'loss': math.log(256)})['bits_per_byte'] == (
      pytest.approx(8.0, rel=1e-12))
