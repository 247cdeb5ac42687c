"""Mixtures of data sources with fixed weights, deterministic and resumable.

``data.mixture(sources=[(source_a, 0.7), (source_b, 0.3)])`` serves rows
from several packed sources (``data.jsonl``, ``data.parquet``,
``data.array_record``, ``data.packed_text_files``; same row length). The
endless stream of examples is cut into blocks of ``block`` examples; block
``b`` holds exactly ``n_k`` examples of source ``k`` (the weights times the
block, rounded by largest remainder), in an order shuffled by ``(seed,
b)``. Example ``i`` of the mixture is therefore a pure function of ``i``:
source ``k`` and its example ``b * n_k + (rank within the block)``, read
from that source's own endless, per-epoch shuffled rows. Over any
``block`` consecutive examples the proportions are exact to ``1/block``.

The position is the run's global example index (the grain iterator
state), saved in every checkpoint with the weights. Resuming with other
weights is allowed, with a warning naming the change: from the resumed
step on, example ``i`` is what the *new* weights give for ``i``, so each
source continues from the position the new weights assign it at ``i``
(some of a source's examples are skipped or seen again; the run does not
restart any source from its beginning). Eval batches are the first
source's held-out rows.
"""

import json
from collections.abc import Sequence

import numpy as np
from absl import logging

from gintrain.runner.data import grain_source
from gintrain.runner.errors import RunnerError

__all__ = ['Mixture', 'mixture', 'block_counts']


def block_counts(weights: Sequence[float], block: int) -> np.ndarray:
  """Examples of each source per block: ``weights / sum * block``,
  rounded by largest remainder (sums to ``block``)."""
  w = np.asarray(weights, np.float64)
  exact = w / w.sum() * block
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind='stable')
  counts[order[:block - counts.sum()]] += 1
  return counts


class Mixture:
  """The endless mixed rows (random access; see the module doc)."""
  endless = True

  def __init__(self, parts: Sequence, weights: Sequence[float],
               block: int = 1000, seed: int = 0):
    self.parts, self.weights = list(parts), [float(w) for w in weights]
    self.block, self.seed = int(block), int(seed)
    self.counts = block_counts(self.weights, self.block)
    self.rows_per_epoch = sum(getattr(p, 'rows_per_epoch', 0)
                              for p in self.parts)
    self._cache = (None, None)

  def _block(self, b):
    """(source of each slot, rank of the slot among its source's)."""
    if self._cache[0] == b:
      return self._cache[1]
    labels = np.repeat(np.arange(len(self.parts)), self.counts)
    rng = np.random.default_rng([self.seed, b, 0x313])
    labels = labels[rng.permutation(self.block)]
    ranks = np.zeros(self.block, np.int64)
    for k in range(len(self.parts)):
      where = labels == k
      ranks[where] = np.arange(where.sum())
    self._cache = (b, (labels, ranks))
    return labels, ranks

  def source_of(self, index: int) -> tuple[int, int]:
    """``(source, its example index)`` of mixture example ``index``."""
    b, slot = divmod(int(index), self.block)
    labels, ranks = self._block(b)
    k = int(labels[slot])
    return k, b * int(self.counts[k]) + int(ranks[slot])

  def __getitem__(self, index):
    k, j = self.source_of(index)
    return self.parts[k][j]

  def __len__(self):
    return self.rows_per_epoch


class _MixtureSource(grain_source.GrainSource):
  """A GrainSource over a :class:`Mixture`; the weights are in its state."""

  def __init__(self, sources, weights, block, seed, worker_count, name):
    self.sources = sources
    first = sources[0]
    self._parts_seed = seed
    super().__init__(_Deferred(), first._eval, shuffle=False,  # pylint: disable=protected-access
                     worker_count=worker_count, info=dict(first.info),
                     name=name)
    self._weights, self._block = list(weights), block

  def bind(self, spec):
    for s in self.sources:
      s.bind(spec)  # each source's own rows take the run's seed
    seed = spec.seed if self._parts_seed is None else self._parts_seed
    self._train = Mixture([s._train for s in self.sources],  # pylint: disable=protected-access
                          self._weights, self._block, seed)
    super().bind(spec)

  def sample(self):
    return self.sources[0].sample()

  def get_state(self):
    return {**super().get_state(), 'mixture': json.dumps(
        {'weights': self._weights, 'block': self._block})}

  def set_state(self, state):
    saved = json.loads(state.get('mixture') or '{}')
    if saved and (saved.get('weights') != self._weights or
                  saved.get('block') != self._block):
      logging.warning(
          'data.mixture: resuming with weights %s (block %d) where the'
          ' checkpoint has %s (block %s): from this step on the examples'
          ' follow the new weights (each source continues where the new'
          ' weights place it; see runner.data.mixture).', self._weights,
          self._block, saved.get('weights'), saved.get('block'))
    super().set_state(state)


class _Deferred:
  """Placeholder train data until bind (the parts need the run's spec)."""

  def __len__(self):
    return 1


def mixture(sources: Sequence, block: int = 1000, seed: int | None = None,
            worker_count: int = 0) -> grain_source.GrainSource:
  """A mixture of ``[(source, weight), ...]`` (see the module doc).

  Raises:
    RunnerError: no sources, a bad weight, sources of different row
      lengths or vocabularies.
  """
  if not sources:
    raise RunnerError('data.mixture.sources is empty.')
  parts, weights = [], []
  for i, item in enumerate(sources):
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise RunnerError(f'data.mixture.sources[{i}] must be (source,'
                        f' weight), got {item!r}.')
    source, weight = item
    if not getattr(getattr(source, '_train', None), 'endless', False):
      raise RunnerError(f'data.mixture.sources[{i}]: {source!r} is not a'
                        ' packed source (data.jsonl, data.parquet,'
                        ' data.array_record, data.packed_text_files).')
    if not isinstance(weight, (int, float)) or weight < 0:
      raise RunnerError(f'data.mixture.sources[{i}]: the weight must be a'
                        f' number >= 0, got {weight!r}.')
    parts.append(source)
    weights.append(float(weight))
  if sum(weights) <= 0:
    raise RunnerError('data.mixture: the weights add up to 0.')
  lengths = {p.info.get('tokens_per_example') for p in parts}
  vocabs = {p.info.get('tokenizer') for p in parts}
  if len(lengths) > 1 or len(vocabs) > 1:
    raise RunnerError('data.mixture: the sources differ in row length or'
                      f' tokenizer ({sorted(map(str, lengths))},'
                      f' {sorted(map(str, vocabs))}).')
  name = 'mixture(' + ', '.join(f'{w:g} x {p.name}' for p, w in
                                zip(parts, weights)) + ')'
  return _MixtureSource(parts, weights, block, seed, worker_count, name)
