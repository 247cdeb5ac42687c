"""Documents into fixed-length rows: packed, or truncated and padded.

``Rows(docs, length)`` lays the documents of each epoch, in an order
shuffled anew every epoch (seeded), end to end into one token stream and
cuts it into rows of ``length + 1`` tokens every ``length`` tokens (the
model reads ``tokens[:-1]`` and predicts ``tokens[1:]``; consecutive rows
share one token, so each token is predicted exactly once). Every row says
where its documents are::

    tokens       int32[length + 1]
    segment_ids  int32[length + 1]  1, 2, ... per document piece; 0 padding
    positions    int32[length + 1]  0, 1, ... within each piece
    weights      float32[length + 1] 1 where the token is a target: inside
                 the same piece as the token before it, not padding and
                 (``mask_prompt``) not a prompt token

Models attend only within a segment (``runner.models.transformer``), so a
document never sees another. A document cut by a row boundary continues in
the next row as a new segment (its first token there is not a target: it
was the last target of the row before). ``mode='pad'`` gives one row per
document instead: its first ``length + 1`` tokens, padded with zeros.

Rows are computed from the row index alone (random access): row ``i`` of
the endless stream is row ``i % R`` of epoch ``i // R``, ``R`` the rows per
epoch; only the document lengths are held in memory. ``efficiency`` is the
share of target positions that are not padding.

Consecutive rows mostly cut the same document, and a source reads a whole
document at a time (an ArrayRecord record, a JSONL line), so the documents
read last are kept, least recently used out: at most ``CACHED_DOCUMENTS``
of them and ``CACHED_TOKENS`` tokens (the one just read is always kept).
Without it a row of 128 tokens read its whole document (17,600 tokens on
average in the standard library) every time.

    >>> import numpy as np
    >>> class Docs:
    ...   def __len__(self): return 2
    ...   def __getitem__(self, i): return np.arange(5) + 10 * i, 0
    ...   def lengths(self): return np.array([5, 5])
    >>> rows = Rows(Docs(), length=4, shuffle=False)
    >>> row = rows[0]
    >>> row['tokens'].tolist(), row['segment_ids'].tolist()
    ([0, 1, 2, 3, 4], [1, 1, 1, 1, 1])
    >>> rows[1]['tokens'].tolist(), rows[1]['segment_ids'].tolist()
    ([4, 10, 11, 12, 13], [1, 2, 2, 2, 2])
    >>> rows[1]['weights'].tolist(), rows[1]['positions'].tolist()
    ([0.0, 0.0, 1.0, 1.0, 1.0], [0, 0, 1, 2, 3])
    >>> len(rows), rows.efficiency
    (3, 0.75)
"""

import collections
import math
import threading

import numpy as np

from gintrain.runner import validation

__all__ = ['Rows', 'padded_share_of_windows', 'CACHED_DOCUMENTS',
           'CACHED_TOKENS']

# Decoded documents kept per Rows (per process): a count and a token budget.
CACHED_DOCUMENTS = 32
CACHED_TOKENS = 1 << 23


class Rows:
  """Rows of packed (or padded) documents (see the module doc).

  Args:
    docs: :class:`~runner.data.sources.Documents` (``len``, ``docs[i] ->
      (tokens, prompt_length)``, ``lengths()``).
    length: tokens the model reads per row.
    seed: the document order's seed (each epoch its own order).
    shuffle: shuffle the documents every epoch (False: file order).
    mode: ``'pack'`` or ``'pad'``.
    mask_prompt: prompt tokens are not targets.
    endless: index past the first epoch (training); False: one epoch
      (``len`` rows; evaluation).
  """

  def __init__(self, docs, length: int, seed: int = 0, shuffle: bool = True,
               mode: str = 'pack', mask_prompt: bool = True,
               endless: bool = True):
    validation.check_choice('packing mode', mode, ('pack', 'pad'))
    self.docs, self.length, self.seed = docs, int(length), int(seed)
    self.shuffle, self.mode, self.mask_prompt = shuffle, mode, mask_prompt
    self.endless = endless
    lengths = np.asarray(docs.lengths(), np.int64)
    self.num_docs = len(lengths)
    self.total_tokens = int(lengths.sum())
    if self.mode == 'pack':
      self.rows_per_epoch = max(1, math.ceil((self.total_tokens - 1) /
                                             self.length))
      real = max(self.total_tokens - 1, 0)
    else:
      keep = np.minimum(lengths, self.length + 1)
      self.rows_per_epoch = self.num_docs
      real = int(np.maximum(keep - 1, 0).sum())
    self.efficiency = real / (self.rows_per_epoch * self.length)
    self._lengths = lengths
    self._epochs = collections.OrderedDict()
    self._lock = threading.Lock()
    self.cached_documents, self.cached_tokens = CACHED_DOCUMENTS, CACHED_TOKENS
    self._docs = collections.OrderedDict()  # document index -> (tokens, p)
    self._docs_tokens = 0

  def __getstate__(self):
    return {**self.__dict__, '_epochs': collections.OrderedDict(),
            '_lock': None, '_docs': collections.OrderedDict(),
            '_docs_tokens': 0}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return self.rows_per_epoch

  def _order(self, epoch):
    """(document order, start offsets in the stream) of ``epoch``."""
    with self._lock:
      if epoch in self._epochs:
        return self._epochs[epoch]
    if self.shuffle:
      rng = np.random.default_rng([self.seed, epoch, 0x9ac7])
      order = rng.permutation(self.num_docs)
    else:
      order = np.arange(self.num_docs)
    starts = np.zeros(self.num_docs + 1, np.int64)
    np.cumsum(self._lengths[order], out=starts[1:])
    with self._lock:
      self._epochs[epoch] = (order, starts)
      while len(self._epochs) > 2:
        self._epochs.popitem(last=False)
    return order, starts

  def _document(self, d):
    """``docs[d]``, from the cache of recent documents (module doc)."""
    with self._lock:
      hit = self._docs.get(d)
      if hit is not None:
        self._docs.move_to_end(d)
        return hit
    doc = self.docs[d]
    if self.cached_documents < 1:
      return doc
    with self._lock:
      if d not in self._docs:
        self._docs[d] = doc
        self._docs_tokens += len(doc[0])
      while len(self._docs) > 1 and (
          len(self._docs) > self.cached_documents or
          self._docs_tokens > self.cached_tokens):
        _, (old, _) = self._docs.popitem(last=False)
        self._docs_tokens -= len(old)
    return doc

  def __getitem__(self, index):
    index = int(index)
    if not self.endless and not 0 <= index < self.rows_per_epoch:
      raise IndexError(index)
    epoch, row = divmod(index, self.rows_per_epoch)
    order, starts = self._order(epoch)
    n = self.length + 1
    out = {'tokens': np.zeros(n, np.int32),
           'segment_ids': np.zeros(n, np.int32),
           'positions': np.zeros(n, np.int32),
           'weights': np.zeros(n, np.float32)}
    prompt = np.zeros(n, bool)
    if self.mode == 'pad':
      tokens, p = self._document(int(order[row]))
      tokens = tokens[:n]
      pieces = [(0, tokens, 0, p)]
    else:
      lo = row * self.length
      hi = min(lo + n, self.total_tokens)
      pieces = []
      k = int(np.searchsorted(starts, lo, side='right')) - 1
      while k < self.num_docs and starts[k] < hi:
        a, b = max(lo, starts[k]), min(hi, starts[k + 1])
        if b > a:
          tokens, p = self._document(int(order[k]))
          off = a - starts[k]
          pieces.append((a - lo, tokens[off:off + b - a], off, p))
        k += 1
    for seg, (at, tokens, off, p) in enumerate(pieces, 1):
      m = len(tokens)
      out['tokens'][at:at + m] = tokens
      out['segment_ids'][at:at + m] = seg
      out['positions'][at:at + m] = np.arange(m)
      prompt[at:at + m] = np.arange(off, off + m) < p
    seg = out['segment_ids']
    target = np.zeros(n, bool)
    target[1:] = (seg[1:] != 0) & (seg[1:] == seg[:-1])
    if self.mask_prompt:
      target &= ~prompt
    out['weights'][target] = 1.0
    return out


def padded_share_of_windows(sizes, length: int) -> float:
  """The non-padding share of the targets when each file is cut into its
  own windows (``runner.data.text.Chunks``, the unpacked layout)."""
  sizes = np.asarray(sizes, np.int64)
  windows = np.maximum(1, -(-(sizes - 1) // length))
  return float((sizes - 1).sum() / (windows.sum() * length))
