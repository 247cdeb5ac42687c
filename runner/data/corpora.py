"""Language-model data sources from documents on disk (the gin factories).

``jsonl``, ``parquet`` and ``array_record`` read documents
(:mod:`runner.data.sources`), pack them into rows
(:mod:`runner.data.packing`) and serve them through a
:class:`~runner.data.grain_source.GrainSource`: globally shuffled, each
process reading only its rows of each global batch, resumable mid-epoch on
any process count. Held-out data is ``eval_paths`` when given, else a
``holdout_fraction`` of the documents chosen by a hash of their index.
The source's ``info`` carries the vocabulary size, the tokens' lengths in
bytes (so the language-model task reports bits per byte for any
tokenizer), the tokenizer hash and the packing efficiency; its name shows
the efficiency (``--dry_run`` and the run's first log line).

In gin (with ``lm.gin``; ``transformer.vocab_size`` at least the
tokenizer's, ``transformer.max_len`` at least ``length``)::

    train.dataset = @data.jsonl()       # or @data.parquet()
    data.jsonl.paths = '/data/*.jsonl'
    data.jsonl.field = 'text'           # text, or a list of token ids
    data.jsonl.tokenizer = 'byte'       # or a tokenizer.json / model folder
    data.jsonl.prompt_field = None      # fine-tuning: 'prompt' (masked)
    data.jsonl.on_bad_line = 'skip'     # or 'error'

    # gintrain data prepare --tokenizer=PATH --out=/data/prepared FILES...
    train.dataset = @data.array_record()
    data.array_record.paths = '/data/prepared'
    data.array_record.tokenizer = 'PATH'  # None: the manifest's

    train.dataset = @data.mixture()
    data.mixture.sources = [(@web/data.jsonl(), 0.7), (@code/data.array_record(), 0.3)]
    web/data.jsonl.paths = '/data/web.jsonl'
    code/data.array_record.paths = '/data/code'
"""

import glob
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from gintrain.lib import storage
from gintrain.runner.data import grain_source
from gintrain.runner.data import packing
from gintrain.runner.data import sources
from gintrain.runner.data import staging
from gintrain.runner.data import text as text_lib
from gintrain.runner.errors import RunnerError
from gintrain.runner import validation
from gintrain.runner.validation import check_fraction

__all__ = ['jsonl', 'parquet', 'array_record', 'packed_text_files',
           'lm_source', 'Subset', 'expand']


class Subset(sources.Documents):
  """Some documents of ``docs``, by index."""

  def __init__(self, docs, indices):
    self.docs, self.indices = docs, np.asarray(indices, np.int64)
    self.tokenizer, self.name = docs.tokenizer, docs.name
    self._lengths = None

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.docs[int(self.indices[int(index)])]

  def _compute_lengths(self):
    return docs_lengths(self.docs)[self.indices]


def docs_lengths(docs) -> np.ndarray:
  return np.asarray(docs.lengths(), np.int64)


def expand(paths, what: str) -> list[str]:
  """Paths with ``*`` patterns expanded (sorted); each must exist.

  Raises:
    RunnerError: a missing file or a pattern matching nothing.
  """
  if isinstance(paths, str):
    paths = [paths]
  out = []
  for path in paths:
    if storage.local_file(path) is None:
      out += _expand_url(path, what)
      continue
    path = os.path.expanduser(storage.local_file(path))
    if any(c in path for c in '*?['):
      found = sorted(glob.glob(path))
      if not found:
        raise RunnerError(f'{what}: no file matches {path}.')
      out += found
    elif not os.path.exists(path):
      raise RunnerError(f'{what}: {os.path.abspath(path)}: no such file.')
    else:
      out.append(path)
  if not out:
    raise RunnerError(f'{what}: no files given.')
  return out


def _expand_url(url: str, what: str) -> list[str]:
  """An object-store URL, or its ``*`` pattern's matches (sorted)."""
  if not any(c in url for c in '*?['):
    return [url]  # checked when read
  fs, fs_path = storage.filesystem(url)
  scheme = url.split('://', 1)[0]
  found = sorted(f'{scheme}://{p}' for p in fs.glob(fs_path))
  if not found:
    raise RunnerError(f'{what}: no file matches {url}.')
  return found


def _split(docs, holdout_fraction):
  n = len(docs)
  keys = [hashlib.sha1(str(i).encode()).digest()[:8] for i in range(n)]
  held = np.asarray([int.from_bytes(k, 'big') / 2 ** 64 < holdout_fraction
                     for k in keys])
  train, test = np.flatnonzero(~held), np.flatnonzero(held)
  if not len(train) or not len(test):
    raise RunnerError(f'{docs.name}: {n} document(s) give {len(train)} to'
                      f' train and {len(test)} to hold out; add data, give'
                      ' eval_paths or change holdout_fraction.')
  return Subset(docs, train), Subset(docs, test)


def lm_source(train_docs, eval_docs, length: int, packing_mode: str = 'pack',
              mask_prompt: bool = True, shuffle: bool = True,
              worker_count: int = 0, max_eval_examples: int | None = 2048,
              name: str = 'documents', seed: int | None = None,
              extra_info: dict | None = None, prefetch: int | None = None
              ) -> grain_source.GrainSource:
  """A GrainSource of packed rows of ``train_docs`` (eval: ``eval_docs``;
  ``prefetch``: batches read ahead, see ``GrainSource``)."""
  validation.check_int('length', length, 1)
  validation.check_int('worker_count', worker_count, 0)
  tok = train_docs.tokenizer
  train = _SeededRows(train_docs, length, shuffle, packing_mode, mask_prompt,
                      seed)
  held = packing.Rows(eval_docs, length, shuffle=False, mode=packing_mode,
                      mask_prompt=mask_prompt, endless=False)
  eval_rows = held
  if max_eval_examples is not None and len(held) > max_eval_examples:
    eval_rows = [held[i] for i in range(max_eval_examples)]
  info = {'vocab_size': tok.vocab_size, 'tokens_per_example': length,
          'token_bytes': tok.token_bytes(), 'tokenizer': tok.hash,
          'packing_efficiency': train.efficiency,
          'documents': len(train_docs), 'heldout_documents': len(eval_docs),
          **(extra_info or {})}
  return _LMSource(
      train, eval_rows, shuffle=shuffle, worker_count=worker_count, info=info,
      prefetch=prefetch,
      name=(f'{name} ({len(train_docs)} train / {len(eval_docs)} held-out'
            f' documents, {packing_mode} length={length}, tokenizer'
            f' {tok.name}, packing efficiency {train.efficiency:.2%})'))


class _SeededRows(packing.Rows):
  """Rows whose seed is the run's, set when the source is bound."""
  endless = True

  def __init__(self, docs, length, shuffle, mode, mask_prompt, seed):
    super().__init__(docs, length, seed=seed or 0, shuffle=shuffle,
                     mode=mode, mask_prompt=mask_prompt)
    self.fixed_seed = seed


class _LMSource(grain_source.GrainSource):

  def bind(self, spec):
    rows = self._train
    if rows.fixed_seed is None and rows.seed != spec.seed:
      rows.seed = spec.seed
      rows._epochs.clear()  # pylint: disable=protected-access
    super().bind(spec)


def _docs(make, paths, what):
  return sources.ConcatDocs([make(p) for p in expand(paths, what)])


def _build(kind, make, paths, eval_paths, holdout_fraction, **kwargs):
  docs = _docs(make, paths, kind)
  if eval_paths:
    train, held = docs, _docs(make, eval_paths, f'{kind}.eval_paths')
  else:
    check_fraction(f'{kind}.holdout_fraction', holdout_fraction)
    train, held = _split(docs, holdout_fraction)
  return lm_source(train, held, name=f'{kind}({docs.name})', **kwargs)


def jsonl(paths: str | Sequence[str], field: str = 'text',
          tokenizer: str = 'byte', length: int = 128,
          prompt_field: str | None = None, mask_prompt: bool = True,
          on_bad_line: str = 'skip', eval_paths=None,
          holdout_fraction: float = 0.05, packing: str = 'pack',  # pylint: disable=redefined-outer-name
          shuffle: bool = True, worker_count: int = 0,
          max_eval_examples: int | None = 2048, cache_dir: str | None = None
          ) -> grain_source.GrainSource:
  """Language-model rows from JSONL files (see the module doc).

  Args:
    paths: files or ``*`` patterns.
    field: the entry with the text (or token ids).
    tokenizer: ``'byte'``, a tokenizer.json or a model folder.
    length: tokens per row (the model's sequence length).
    prompt_field: an entry with a prompt placed before ``field``.
    mask_prompt: prompt tokens are not trained on.
    on_bad_line: ``'skip'`` (counted) or ``'error'``.
    eval_paths: held-out files (None: ``holdout_fraction`` of documents).
    packing: ``'pack'`` (documents end to end) or ``'pad'`` (one per row).
    cache_dir: where offsets indexes go if the data folder is read-only.
  """
  skipped = []

  def make(path):
    docs = sources.JsonlDocs(path, field, tokenizer, prompt_field,
                             on_bad_line, cache_dir)
    if docs.skipped:
      skipped.append((docs.first_bad, docs.skipped))
    return docs
  source = _build('jsonl', make, paths, eval_paths, holdout_fraction,
                  length=length, packing_mode=packing,
                  mask_prompt=mask_prompt, shuffle=shuffle,
                  worker_count=worker_count,
                  max_eval_examples=max_eval_examples)
  if skipped:
    from absl import logging  # pylint: disable=import-outside-toplevel
    total = sum(n for _, n in skipped)
    logging.warning('jsonl: skipped %d line(s) that are not JSON objects'
                    ' (first at %s); jsonl.on_bad_line=\'error\' stops'
                    ' instead.', total, skipped[0][0])
    source.info['skipped_lines'] = total
  return source


def parquet(paths: str | Sequence[str], field: str = 'text',
            tokenizer: str = 'byte', length: int = 128,
            prompt_field: str | None = None, mask_prompt: bool = True,
            eval_paths=None, holdout_fraction: float = 0.05,
            packing: str = 'pack', shuffle: bool = True,  # pylint: disable=redefined-outer-name
            worker_count: int = 0, max_eval_examples: int | None = 2048
            ) -> grain_source.GrainSource:
  """Language-model rows from Parquet files (arguments as :func:`jsonl`)."""
  return _build('parquet', lambda p: sources.ParquetDocs(
      p, field, tokenizer, prompt_field), paths, eval_paths,
                holdout_fraction, length=length, packing_mode=packing,
                mask_prompt=mask_prompt, shuffle=shuffle,
                worker_count=worker_count,
                max_eval_examples=max_eval_examples)


def array_record(paths: str | Sequence[str], tokenizer: str | None = None,
                 length: int = 128, text: bool = False,
                 mask_prompt: bool = True, eval_paths=None,
                 holdout_fraction: float = 0.05, packing: str = 'pack',  # pylint: disable=redefined-outer-name
                 shuffle: bool = True, worker_count: int = 0,
                 max_eval_examples: int | None = 2048,
                 cache_dir: str | None = None
                 ) -> grain_source.GrainSource:
  """Language-model rows from ArrayRecord data: a folder written by
  ``gintrain data prepare`` (its manifest; ``tokenizer``, when given, must
  be the one it was made with), or files of UTF-8 text records
  (``text=True``). A prepared folder on an object store is staged into
  ``cache_dir`` (default ``~/.cache/gintrain/data``), each shard checked
  against the manifest's SHA-256 (:mod:`runner.data.staging`). Other
  arguments as :func:`jsonl`."""
  def make(paths_):
    return sources.ArrayRecordDocs(paths_, tokenizer, text, cache_dir)
  if isinstance(paths, str) and (
      os.path.isdir(os.path.expanduser(paths)) or
      staging.is_remote_folder(paths)):
    docs = make(paths)
    if eval_paths:
      held = make(eval_paths)
      train = docs
    else:
      check_fraction('array_record.holdout_fraction', holdout_fraction)
      train, held = _split(docs, holdout_fraction)
    return lm_source(train, held, length, packing, mask_prompt, shuffle,
                     worker_count, max_eval_examples,
                     name=f'array_record({paths})')
  return _build('array_record', make, paths, eval_paths, holdout_fraction,
                length=length, packing_mode=packing, mask_prompt=mask_prompt,
                shuffle=shuffle, worker_count=worker_count,
                max_eval_examples=max_eval_examples)


def packed_text_files(root: str | None = None, pattern: str = '*.py',
                      tokenizer: str = 'byte', length: int = 128,
                      holdout_fraction: float = 0.05, packing: str = 'pack',  # pylint: disable=redefined-outer-name
                      shuffle: bool = True, worker_count: int = 0,
                      max_eval_examples: int | None = 2048
                      ) -> grain_source.GrainSource:
  """Text files (one document each) packed into rows; the same files and
  held-out split as ``text_files``, with any tokenizer."""
  root = os.path.abspath(os.path.expanduser(root or text_lib.default_root()))
  files = text_lib.list_files(root, pattern)
  paths = [p for p, _ in files]
  train, held = text_lib.split_by_hash(paths, holdout_fraction)
  if not train or not held:
    raise RunnerError(f'packed_text_files: {len(files)} file(s) under {root}'
                      f' give {len(train)} to train and {len(held)} to hold'
                      ' out.')

  def docs(idx):
    return sources.TextFileDocs(root, [paths[i] for i in idx], tokenizer,
                                [files[i][1] for i in idx])
  train_docs, held_docs = docs(train), docs(held)
  info = {}
  if train_docs.tokenizer.hash == 'byte':
    info['unigram_bits_per_byte'] = text_lib.unigram_bits_per_byte(
        root, held_docs.paths)
  return lm_source(train_docs, held_docs, length, packing, True, shuffle,
                   worker_count, max_eval_examples,
                   name=f'packed_text_files({root}, {pattern!r})',
                   extra_info=info)
