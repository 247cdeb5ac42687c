"""Packing: every token once per epoch, attention within documents, loss
weights, efficiency on the stdlib corpus."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.runner.data import packing
from gintrain.runner.data import sources
from gintrain.runner.data import text
from gintrain.runner.models import transformer
from gintrain.runner.tasks import lm


class Docs(sources.Documents):
  """Document d's token k is d * 1000 + k (so every token is unique)."""

  def __init__(self, lengths, prompts=None):
    self._lengths = np.asarray(lengths, np.int64)
    self.prompts = prompts or [0] * len(lengths)

  def __len__(self):
    return len(self._lengths)

  def __getitem__(self, i):
    return (np.arange(self._lengths[i], dtype=np.int32) + 1000 * i,
            self.prompts[i])


@pytest.mark.parametrize('mode', ['pack', 'pad'])
def test_every_token_exactly_once_per_epoch(mode):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 50, size=40)
  docs = Docs(lengths)
  rows = packing.Rows(docs, length=16, seed=3, mode=mode)
  for epoch in range(2):
    seen = collections.Counter()
    targets = collections.Counter()
    for r in range(len(rows)):
      row = rows[epoch * len(rows) + r]
      seg, w, tok = row['segment_ids'], row['weights'], row['tokens']
      last = r == len(rows) - 1
      span = len(tok) if (last or mode == 'pad') else len(tok) - 1
      seen.update(int(t) for t, s in zip(tok[:span], seg[:span]) if s)
      targets.update(int(t) for t in tok[w > 0])
      # positions count from 0 within each segment
      for s in set(seg[seg > 0].tolist()):
        assert (row['positions'][seg == s] == np.arange((seg == s).sum())
                ).all()
    if mode == 'pack':
      everything = {d * 1000 + k for d, n in enumerate(lengths)
                    for k in range(n)}
      assert set(seen) == everything and max(seen.values()) == 1
      # each token but a document's first is a target exactly once
      assert set(targets) == {d * 1000 + k for d, n in enumerate(lengths)
                              for k in range(1, n)}
      assert max(targets.values()) == 1
    else:
      assert set(targets) == {d * 1000 + k for d, n in enumerate(lengths)
                              for k in range(1, min(n, 17))}
  # a new order every epoch, and the same order for the same seed
  first = [rows[i]['tokens'].tolist() for i in range(len(rows))]
  second = [rows[len(rows) + i]['tokens'].tolist() for i in range(len(rows))]
  assert first != second
  again = packing.Rows(docs, length=16, seed=3, mode=mode)
  assert first == [again[i]['tokens'].tolist() for i in range(len(rows))]


def test_prompt_tokens_are_not_targets():
  docs = Docs([6, 5], prompts=[3, 0])
  rows = packing.Rows(docs, length=20, shuffle=False)
  row = rows[0]
  targets = row['tokens'][row['weights'] > 0].tolist()
  assert targets == [3, 4, 5, 1001, 1002, 1003, 1004]
  unmasked = packing.Rows(docs, length=20, shuffle=False, mask_prompt=False)
  assert unmasked[0]['tokens'][unmasked[0]['weights'] > 0].tolist() == [
      1, 2, 3, 4, 5, 1001, 1002, 1003, 1004]


def test_attention_stays_within_documents():
  model = transformer.transformer(vocab_size=64, width=32, depth=2, heads=4,
                                  max_len=24, positions='learned')
  task = lm.LanguageModel(model)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 64, size=(1, 25)).astype(np.int32)
  seg = np.array([[1] * 10 + [2] * 8 + [3] * 7], np.int32)
  pos = np.concatenate([np.arange(10), np.arange(8), np.arange(7)])[None]
  batch = {'tokens': tokens, 'segment_ids': seg, 'positions': pos.astype(
      np.int32), 'weights': np.ones((1, 25), np.float32)}
  variables = task.init(jax.random.key(0), batch)
  logits = lambda b: np.asarray(task.apply_eval(  # pylint: disable=unnecessary-lambda-assignment
      variables['params'], {}, task.inputs(b)))
  before = logits(batch)
  changed = dict(batch, tokens=tokens.copy())
  changed['tokens'][0, :10] = (changed['tokens'][0, :10] + 7) % 64  # doc 1
  after = logits(changed)
  np.testing.assert_array_equal(before[0, 10:], after[0, 10:])  # docs 2, 3
  assert not np.allclose(before[0, :10], after[0, :10])
  # document 2 alone (its own row, positions from 0) gives its logits
  alone = {k: v[:, 10:18] for k, v in batch.items()}
  np.testing.assert_allclose(logits(alone)[0], before[0, 10:17], atol=1e-5)
  # without segment ids, attention crosses documents
  plain = np.asarray(model.apply(variables, tokens[:, :-1]))
  plain_changed = np.asarray(model.apply(variables,
                                         changed['tokens'][:, :-1]))
  assert not np.allclose(plain[0, 10:], plain_changed[0, 10:])


def test_efficiency_on_the_stdlib():
  root = text.default_root()
  files = text.list_files(root)
  sizes = [s for _, s in files]

  class Sizes:
    def lengths(self):
      return np.asarray(sizes)
  packed = packing.Rows(Sizes(), length=128, shuffle=False).efficiency
  padded = packing.padded_share_of_windows(sizes, 128)
  print(f'stdlib non-padding share: packed {packed:.4%}, per-file windows'
        f' (text_files) {padded:.4%}')
  assert packed >= 0.95 and packed > padded
