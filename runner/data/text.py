"""Text files on disk as byte-level language-model data, read lazily.

The files under ``root`` matching ``pattern`` are listed (sizes only, never
read up front) and split into train and held-out by a hash of their path
relative to ``root``, so the split is the same on every machine and does
not move when files are added. Each file is cut into windows of
``length + 1`` bytes every ``length`` bytes (consecutive windows share one
byte, so every byte but a file's first is predicted exactly once); the last
window of a file is padded with zeros and its ``weights`` are 0 there.
Examples are ``{'tokens': int32[length + 1], 'weights': float32[length +
1]}``, read from disk when asked for, so memory does not grow with the
corpus. The default corpus is the running interpreter's standard library
(``sysconfig.get_paths()['stdlib']``), present wherever Python is.

    >>> import tempfile, os
    >>> root = tempfile.mkdtemp()
    >>> with open(os.path.join(root, 'a.txt'), 'wb') as f:
    ...   _ = f.write(b'hello world')
    >>> chunks = Chunks(root, ['a.txt'], [11], length=4)
    >>> len(chunks), bytes(chunks[0]['tokens'].astype('uint8'))
    (3, b'hello')
    >>> chunks[2]['tokens'].tolist(), chunks[2]['weights'].tolist()
    ([114, 108, 100, 0, 0], [1.0, 1.0, 1.0, 0.0, 0.0])
"""

import fnmatch
import hashlib
import math
import os
import sysconfig

import numpy as np

from gintrain.runner.data import grain_source
from gintrain.runner import validation
from gintrain.runner.validation import check_fraction

__all__ = ['Chunks', 'list_files', 'split_by_hash', 'text_files',
           'unigram_bits_per_byte', 'default_root']


_PACKAGE_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def default_root() -> str:
  """The standard library folder of the running interpreter."""
  return sysconfig.get_paths()['stdlib']


def list_files(root: str, pattern: str = '*.py') -> list[tuple[str, int]]:
  """``[(relative path, size)]`` of the non-empty files matching ``pattern``
  under ``root``, sorted; symlinks are not followed, and installed packages
  (``site-packages``, ``dist-packages``, which sit inside the standard
  library folder) are left out.

  Raises:
    ValueError: ``root`` is not a directory, or nothing matches.
  """
  if not os.path.isdir(root):
    raise ValueError(f'text_files.root={root!r} is not a directory.')
  out = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _PACKAGE_DIRS)
    for name in sorted(files):
      if not fnmatch.fnmatch(name, pattern):
        continue
      path = os.path.join(folder, name)
      try:
        st = os.stat(path, follow_symlinks=False)
      except OSError:
        continue
      if st.st_size > 1 and os.path.isfile(path) and not os.path.islink(path):
        out.append((os.path.relpath(path, root), st.st_size))
  if not out:
    raise ValueError(f'text_files: no file matching {pattern!r} under'
                     f' {root}.')
  return out


def split_by_hash(paths, holdout_fraction: float) -> tuple[list, list]:
  """(train, held-out) indices: a path is held out when the first 8 bytes
  of its SHA-1, as a fraction of 2**64, are below ``holdout_fraction``."""
  train, held = [], []
  for i, path in enumerate(paths):
    digest = hashlib.sha1(path.encode('utf-8')).digest()
    value = int.from_bytes(digest[:8], 'big') / 2 ** 64
    (held if value < holdout_fraction else train).append(i)
  return train, held


class Chunks:
  """Random access to the byte windows of some files (see the module doc).

  Args:
    root: the folder the paths are relative to.
    paths, sizes: the files and their sizes in bytes.
    length: tokens the model reads per example (windows are one longer).
    repeat: the corpus repeated this many times (a bigger corpus for
      memory tests; repeats are read again from disk).
  """

  def __init__(self, root, paths, sizes, length: int, repeat: int = 1):
    self.root, self.paths, self.length = root, list(paths), length
    counts = np.array([max(1, math.ceil((s - 1) / length)) for s in sizes],
                      np.int64)
    self._ends = np.cumsum(counts)
    self._total = int(self._ends[-1]) if len(counts) else 0
    self.repeat = repeat

  def __len__(self):
    return self._total * self.repeat

  def __getitem__(self, index):
    index = int(index) % self._total
    f = int(np.searchsorted(self._ends, index, side='right'))
    k = index - (int(self._ends[f - 1]) if f else 0)
    with open(os.path.join(self.root, self.paths[f]), 'rb') as fh:
      fh.seek(k * self.length)
      data = fh.read(self.length + 1)
    tokens = np.zeros(self.length + 1, np.int32)
    weights = np.zeros(self.length + 1, np.float32)
    tokens[:len(data)] = np.frombuffer(data, np.uint8)
    weights[:len(data)] = 1.0
    return {'tokens': tokens, 'weights': weights}


def unigram_bits_per_byte(root, paths) -> float:
  """The entropy (bits) of the byte frequencies of the predicted bytes of
  ``paths`` (all but each file's first): a unigram model fitted on that
  very split, a lower bound for any unigram model there."""
  counts = np.zeros(256, np.int64)
  for path in paths:
    with open(os.path.join(root, path), 'rb') as f:
      data = np.frombuffer(f.read(), np.uint8)[1:]
    counts += np.bincount(data, minlength=256)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def text_files(root: str | None = None, pattern: str = '*.py',
               length: int = 128, holdout_fraction: float = 0.05,
               repeat: int = 1, shuffle: bool = True,
               worker_count: int = 0,
               max_eval_examples: int | None = 2048
               ) -> grain_source.GrainSource:
  """A byte-level language-model :class:`~.grain_source.GrainSource`.

  Args:
    root: the folder of text files (None: the Python standard library).
    pattern: file names to take (``fnmatch``), e.g. ``'*.py'``, ``'*.txt'``.
    length: tokens per example (the model's sequence length).
    holdout_fraction: the share of files held out for evaluation.
    repeat: repeat the training corpus this many times.
    shuffle: shuffle the training windows (every epoch anew).
    worker_count: grain worker processes reading ahead.
    max_eval_examples: evaluate on at most this many held-out windows (the
      first ones, in file order; None: all).
  """
  root = os.path.abspath(os.path.expanduser(root or default_root()))
  for name, value, low in (('length', length, 1), ('repeat', repeat, 1),
                           ('worker_count', worker_count, 0)):
    validation.check_int(f'text_files.{name}', value, low)
  check_fraction('text_files.holdout_fraction', holdout_fraction)
  files = list_files(root, pattern)
  paths = [p for p, _ in files]
  train, held = split_by_hash(paths, holdout_fraction)
  if not train or not held:
    raise ValueError(f'text_files: {len(files)} file(s) under {root} give'
                     f' {len(train)} to train and {len(held)} to hold out;'
                     ' add files or change holdout_fraction.')
  pick = lambda idx: ([paths[i] for i in idx], [files[i][1] for i in idx])  # pylint: disable=unnecessary-lambda-assignment
  train_chunks = Chunks(root, *pick(train), length=length, repeat=repeat)
  held_chunks = Chunks(root, *pick(held), length=length)
  eval_examples = held_chunks
  if max_eval_examples is not None and len(held_chunks) > max_eval_examples:
    eval_examples = [held_chunks[i] for i in range(max_eval_examples)]
    held_paths = _paths_of_first(held_chunks, max_eval_examples)
  else:
    held_paths = held_chunks.paths
  info = {'vocab_size': 256, 'tokens_per_example': length,
          'unigram_bits_per_byte': unigram_bits_per_byte(root, held_paths),
          'train_files': len(train), 'heldout_files': len(held)}
  return grain_source.GrainSource(
      train_chunks, eval_examples, shuffle=shuffle, worker_count=worker_count,
      info=info, name=(f'text_files({root}, {pattern!r}, {len(train)} train /'
                       f' {len(held)} held-out files, length={length},'
                       f' repeat={repeat})'))


def _paths_of_first(chunks: Chunks, n: int) -> list[str]:
  """The files whose windows make up the first ``n`` windows."""
  last = int(np.searchsorted(chunks._ends, n - 1, side='right'))  # pylint: disable=protected-access
  return chunks.paths[:last + 1]
