"""Documents on disk with random access: JSONL, Parquet, ArrayRecord, text.

Each source here is a sequence of *documents*: ``docs[i]`` is ``(tokens,
prompt_length)``, the int32 token ids of document ``i`` and how many of its
first tokens are a prompt (0 unless a ``prompt_field`` is named), and
``docs.lengths()`` is every document's token count (what packing needs to
lay documents into rows; see :mod:`runner.data.packing`). Documents are read
when asked for, so memory does not grow with the corpus.

* :class:`JsonlDocs`: one JSON object per line; an index of line offsets is
  built once (bad lines skipped with a count, or an error, as
  ``on_bad_line`` says) and cached beside the file, or under ``cache_dir``
  when the data folder is read-only. A record found bad when read (a
  missing field, or a line changed since it was indexed) is, with
  ``'skip'``, an empty document and a warning naming it (file:line) with
  the running count of bad records, once per record; with ``'error'``,
  an error naming it.
* :class:`ParquetDocs`: one row per document; only the named columns of the
  row group holding a row are read (row groups are read lazily, a few kept).
* :class:`ArrayRecordDocs`: shards written by ``gintrain data prepare``
  (records of little-endian uint32: the prompt length, then the tokens) with
  their ``manifest.json``; or any ArrayRecord file of UTF-8 text records.
* :class:`TextFileDocs`: whole text files, one document each.

Paths may be object-store URLs (``s3://...``, through
:mod:`gintrain.lib.storage`): Parquet row groups are read through the store
when needed; JSONL and ArrayRecord files are copied once into a local cache
(:func:`local_copy`).

A named ``field`` holds text (tokenized with the ``tokenizer``) or a list of
ints (already tokens). Faults in the input (a missing file, a field that is
not there, a corrupt shard, a line that is not JSON with
``on_bad_line='error'``) raise :class:`~runner.errors.RunnerError` naming the
file, before any training.
"""

import collections
import hashlib
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

from gintrain.lib import storage
from gintrain.runner.data import staging
from gintrain.runner.data import tokenizer as tokenizer_lib
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['Documents', 'JsonlDocs', 'ParquetDocs', 'ArrayRecordDocs',
           'TextFileDocs', 'ConcatDocs', 'MANIFEST', 'read_manifest',
           'decode_record', 'encode_record', 'local_copy']

MANIFEST = 'manifest.json'
_INDEX_VERSION = 3
# Bad records met when read: each warned about once, the first _WARN_EACH of
# a file one by one, then every _WARN_EVERY-th.
_WARN_EACH, _WARN_EVERY = 20, 100
# Sources are read from grain's prefetch thread and the main thread (eval)
# at once: file positions are never shared (os.pread), caches are locked.


def encode_record(tokens: np.ndarray, prompt_length: int = 0) -> bytes:
  """A prepared record: uint32 little-endian ``[prompt_length, *tokens]``."""
  out = np.empty(len(tokens) + 1, '<u4')
  out[0] = prompt_length
  out[1:] = tokens
  return out.tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  values = np.frombuffer(record, '<u4')
  return values[1:].astype(np.int32), int(values[0])


class Documents:
  """Random access to documents (see the module doc).

  Attributes:
    name: for logs and errors.
    tokenizer: what the documents' text was or is tokenized with.
  """
  name: str = 'documents'
  tokenizer: tokenizer_lib.Tokenizer

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    raise NotImplementedError

  def lengths(self) -> np.ndarray:
    """int64 token count of every document (computed once)."""
    if getattr(self, '_lengths', None) is None:
      self._lengths = self._compute_lengths()
    return self._lengths

  def _compute_lengths(self) -> np.ndarray:
    return np.asarray([len(self[i][0]) for i in range(len(self))], np.int64)


def _check_file(path: str, what: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise RunnerError(f'{what}: {path}: no such file.')
  return path


def _url_info(url: str, what: str) -> dict:
  try:
    entry = storage.info(url)
  except (FileNotFoundError, OSError) as e:
    raise RunnerError(f'{what}: {url}: no such file ({e}).') from e
  if entry['type'] != 'file':
    raise RunnerError(f'{what}: {url}: not a file.')
  return entry


def local_copy(path: str, what: str, cache_dir: str | None = None) -> str:
  """A local file with ``path``'s bytes: a local path itself (checked); an
  object-store URL copied once into ``cache_dir`` (default
  ``~/.cache/gintrain/data``) and copied again only when its size or
  modification time changes (for readers that need a local file: JSONL
  offsets, ArrayRecord).

  Raises:
    RunnerError: nothing at ``path``, naming it.
  """
  local = storage.local_file(path)
  if local is not None:
    return _check_file(local, what)
  entry = _url_info(path, what)
  folder = cache_dir or os.path.join(os.path.expanduser('~'), '.cache',
                                     'gintrain', 'data')
  key = f'{path}|{entry["size"]}|{entry["mtime"]}'
  digest = hashlib.sha1(key.encode('utf-8')).hexdigest()[:16]
  target = os.path.join(folder, f'{digest}-{path.rstrip("/").rsplit("/", 1)[-1]}')
  if os.path.isfile(target) and os.path.getsize(target) == entry['size']:
    return target
  os.makedirs(folder, exist_ok=True)
  tmp = f'{target}.{os.getpid()}.tmp'
  storage.download(path, tmp)
  os.replace(tmp, target)
  return target


class _Tokenize:
  """A field's value -> tokens: text through the tokenizer, int lists as
  they are."""

  def __init__(self, tok, path, field, prompt_field):
    self.tok, self.path = tok, path
    self.field, self.prompt_field = field, prompt_field

  def value(self, value, field, where):
    if isinstance(value, (bytes, str)):
      return self.tok.encode(value)
    if isinstance(value, (list, tuple, np.ndarray)):
      try:
        ids = np.asarray(value, np.int64)
      except (TypeError, ValueError) as e:
        raise RunnerError(f'{self.path}{where}: field {field!r} is neither'
                          ' text nor a list of ints.') from e
      if ids.ndim != 1 or (ids.size and (ids.min() < 0 or
                                         ids.max() >= self.tok.vocab_size)):
        raise RunnerError(f'{self.path}{where}: field {field!r} has token'
                          f' ids outside 0..{self.tok.vocab_size - 1}.')
      return ids.astype(np.int32)
    raise RunnerError(f'{self.path}{where}: field {field!r} is'
                      f' {type(value).__name__}, not text or a list of'
                      ' ints.')

  def __call__(self, row: dict, where: str = '') -> tuple[np.ndarray, int]:
    for f in (self.field, self.prompt_field):
      if f is not None and f not in row:
        raise RunnerError(f'{self.path}{where}: no field {f!r} (fields:'
                          f' {", ".join(sorted(map(str, row)))}).')
    tokens = self.value(row[self.field], self.field, where)
    if self.prompt_field is None:
      return tokens, 0
    prompt = self.value(row[self.prompt_field], self.prompt_field, where)
    return np.concatenate([prompt, tokens]).astype(np.int32), len(prompt)


def _cache_path(path: str, suffix: str, cache_dir: str | None) -> list[str]:
  """Where an index of ``path`` may live: beside it, then ``cache_dir``."""
  out = [path + suffix]
  folder = cache_dir or os.path.join(os.path.expanduser('~'), '.cache',
                                     'gintrain', 'index')
  digest = hashlib.sha1(path.encode('utf-8')).hexdigest()[:16]
  out.append(os.path.join(folder, f'{os.path.basename(path)}.{digest}'
                          f'{suffix}'))
  return out


class JsonlDocs(Documents):
  """Documents from a JSONL file (see the module doc).

  Args:
    path: the ``.jsonl`` file.
    field: the entry holding the text (or token ids).
    tokenizer: a :mod:`~runner.data.tokenizer` spec or instance.
    prompt_field: an entry holding a prompt put before ``field`` (its tokens
      are a prompt, left out of the loss when packing says so).
    on_bad_line: ``'skip'`` (a line that is not a JSON object is left out;
      ``skipped`` counts them, and a warning names the first) or
      ``'error'`` (one error naming the file and line).
    cache_dir: where the offsets index goes when the file's folder is not
      writable.
  """

  def __init__(self, path: str, field: str = 'text', tokenizer='byte',
               prompt_field: str | None = None, on_bad_line: str = 'skip',
               cache_dir: str | None = None):
    validation.check_choice('jsonl.on_bad_line', on_bad_line,
                            ('skip', 'error'))
    self.path = local_copy(path, 'jsonl', cache_dir)
    self.url = self.path if storage.local_file(path) is not None else path
    self.tokenizer = tokenizer_lib.load(tokenizer)
    self.field, self.prompt_field = field, prompt_field
    self.on_bad_line, self.cache_dir = on_bad_line, cache_dir
    self.name = f'jsonl({self.path if path == self.path else path},' \
                f' field={field!r})'
    self._convert = _Tokenize(self.tokenizer, self.url, field, prompt_field)
    (self._offsets, self._lines, self.skipped,
     self.first_bad) = self._index()
    self._lengths = None
    self._fh = None
    self.bad_records = 0  # records found bad when read (on_bad_line='skip')
    self._warned = set()
    self._bad_lock = threading.Lock()
    self._check_first()

  def _index(self):
    st = os.stat(self.path)
    key = f'{_INDEX_VERSION}:{st.st_size}:{st.st_mtime_ns}'
    for cached in _cache_path(self.path, '.gintrain-index.npz',
                              self.cache_dir):
      try:
        with np.load(cached) as z:
          if str(z['key']) == key:
            bad = int(z['skipped'])
            if bad and self.on_bad_line == 'error':
              break  # rebuild to name the line
            return z['offsets'], z['lines'], bad, str(z['first_bad'])
      except (OSError, KeyError, ValueError):
        continue
    offsets, ends, lines, skipped, first_bad = [], [], [], 0, ''
    with open(self.path, 'rb') as f:
      pos = 0
      for number, line in enumerate(f, 1):
        start, pos = pos, pos + len(line)
        if not line.strip():
          continue
        try:
          ok = isinstance(json.loads(line), dict)
        except ValueError:
          ok = False
        if ok:
          offsets.append(start)
          ends.append(pos)
          lines.append(number)
          continue
        if self.on_bad_line == 'error':
          raise RunnerError(f'{self.path}:{number}: not a JSON object'
                            ' (jsonl.on_bad_line=\'error\').')
        skipped += 1
        first_bad = first_bad or f'{self.path}:{number}'
    offsets = np.stack([np.asarray(offsets, np.int64),
                        np.asarray(ends, np.int64)], axis=1).reshape(-1, 2)
    for cached in _cache_path(self.path, '.gintrain-index.npz',
                              self.cache_dir):
      try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f'{cached}.{os.getpid()}.tmp.npz'
        np.savez(tmp, key=key, offsets=offsets, skipped=skipped,
                 first_bad=first_bad, lines=lines)
        os.replace(tmp, cached)
        break
      except OSError:
        continue
    lines = np.asarray(lines, np.int64)
    return offsets, lines, skipped, first_bad

  def _check_first(self):
    if not len(self._offsets):
      raise RunnerError(f'{self.path}: no JSON lines to read'
                        f' ({self.skipped} bad).')
    self._convert(self._row(0), self._where(0))  # a missing field fails
    # now, naming the file and line

  def __getstate__(self):
    return {**self.__dict__, '_fh': None, '_bad_lock': None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._bad_lock = threading.Lock()

  def _where(self, index):
    return f':{int(self._lines[index])}'

  def _bad(self, index, reason):
    """A record found bad when read: an error (``on_bad_line='error'``),
    or a warning naming it (file:line) with the running count of bad
    records, once per record (rate-limited past the first few), and an
    empty document in its place."""
    where = f'{self.url}{self._where(index)}'
    if self.on_bad_line == 'error':
      raise RunnerError(f'{where}: {reason} (jsonl.on_bad_line=\'error\').')
    with self._bad_lock:
      if index in self._warned:
        return
      self._warned.add(index)
      self.bad_records += 1
      count = self.bad_records
    if count <= _WARN_EACH or count % _WARN_EVERY == 0:
      from absl import logging  # pylint: disable=import-outside-toplevel
      logging.warning('jsonl: %s: %s; skipped (%d bad record(s) so far in'
                      ' this file).', where, reason, count)

  def __len__(self):
    return len(self._offsets)

  def _row(self, index):
    if self._fh is None:
      self._fh = open(self.path, 'rb')  # pylint: disable=consider-using-with
    start, end = (int(x) for x in self._offsets[index])
    return json.loads(os.pread(self._fh.fileno(), end - start, start))

  def _checked_row(self, index):
    """The record's JSON object, or None when it is bad (see _bad): the
    file changed since it was indexed."""
    try:
      row = self._row(index)
    except ValueError:
      row = None
    if isinstance(row, dict):
      return row
    self._bad(index, 'not a JSON object (the file changed since it was'
              ' indexed?)')
    return None

  def _tokens(self, index, row):
    if row is not None:
      try:
        return self._convert(row)
      except RunnerError as e:
        self._bad(index, str(e).removeprefix(f'{self.url}: ').rstrip('.'))
    return np.zeros(0, np.int32), 0

  def __getitem__(self, index):
    index = int(index)
    return self._tokens(index, self._checked_row(index))

  def _compute_lengths(self):
    out = np.empty(len(self), np.int64)
    for start in range(0, len(self), 1024):
      index = range(start, min(start + 1024, len(self)))
      rows = [self._checked_row(i) for i in index]
      if self.prompt_field is None and all(
          isinstance(r, dict) and isinstance(r.get(self.field), (str, bytes))
          for r in rows):
        ids = self.tokenizer.encode_batch([r[self.field] for r in rows])
        out[start:start + len(rows)] = [len(x) for x in ids]
      else:
        out[start:start + len(rows)] = [len(self._tokens(i, r)[0])
                                        for i, r in zip(index, rows)]
    return out


class ParquetDocs(Documents):
  """Documents from a Parquet file, one per row (see the module doc).

  Args:
    path: the ``.parquet`` file.
    field, tokenizer, prompt_field: as :class:`JsonlDocs`.
    cached_row_groups: row groups kept in memory (least recently used out).
  """

  def __init__(self, path: str, field: str = 'text', tokenizer='byte',
               prompt_field: str | None = None, cached_row_groups: int = 2):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    if storage.local_file(path) is not None:
      self.path = _check_file(storage.local_file(path), 'parquet')
    else:
      self.path = path  # row groups read through the store, when needed
      _url_info(path, 'parquet')
    self.tokenizer = tokenizer_lib.load(tokenizer)
    self.field, self.prompt_field = field, prompt_field
    self.name = f'parquet({self.path}, field={field!r})'
    try:
      meta = self._open().metadata
    except Exception as e:  # pylint: disable=broad-except
      raise RunnerError(f'{self.path}: not a readable Parquet file'
                        f' ({type(e).__name__}: {e}).') from e
    names = set(meta.schema.names)
    for f in (field, prompt_field):
      if f is not None and f not in names:
        raise RunnerError(f'{self.path}: no column {f!r} (columns:'
                          f' {", ".join(sorted(names))}).')
    counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    self._ends = np.cumsum(counts).astype(np.int64)
    if not len(self._ends) or not self._ends[-1]:
      raise RunnerError(f'{self.path}: the Parquet file has no rows.')
    self._convert = _Tokenize(self.tokenizer, self.path, field, prompt_field)
    self._cached = max(1, cached_row_groups)
    self._groups = collections.OrderedDict()
    self._file = None
    self._lengths = None
    self._lock = threading.Lock()

  def _open(self):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    if storage.local_file(self.path) is not None:
      return pq.ParquetFile(self.path)
    return pq.ParquetFile(storage.open_read(self.path))

  def __getstate__(self):
    return {**self.__dict__, '_file': None, '_lock': None,
            '_groups': collections.OrderedDict()}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return int(self._ends[-1])

  def _group(self, g):
    if g in self._groups:
      self._groups.move_to_end(g)
      return self._groups[g]
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    if self._file is None:
      self._file = self._open()
    columns = [c for c in (self.field, self.prompt_field) if c is not None]
    table = self._file.read_row_group(g, columns=columns)
    data = {c: table.column(c).to_pylist() for c in columns}
    self._groups[g] = data
    while len(self._groups) > self._cached:
      self._groups.popitem(last=False)
    return data

  def __getitem__(self, index):
    index = int(index)
    g = int(np.searchsorted(self._ends, index, side='right'))
    k = index - (int(self._ends[g - 1]) if g else 0)
    with self._lock:
      data = self._group(g)
    return self._convert({c: v[k] for c, v in data.items()},
                         f' (row {index})')


class ArrayRecordDocs(Documents):
  """Documents from ArrayRecord files (see the module doc).

  Args:
    paths: ``.array_record`` files, or one folder written by ``gintrain
      data prepare`` (its manifest lists the shards).
    tokenizer: the model's tokenizer; prepared data made with another one
      (by hash) is refused. None: take the manifest's (prepared data).
    text: the records are UTF-8 text (tokenized when read), not prepared
      token records.
    cache_dir: where a prepared folder on an object store is staged
      (:mod:`runner.data.staging`; default ``~/.cache/gintrain/data``).
  """

  def __init__(self, paths, tokenizer=None, text: bool = False,
               cache_dir: str | None = None):
    from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
    if isinstance(paths, str):
      paths = [paths]
    if len(paths) == 1 and staging.is_remote_folder(paths[0]):
      paths = [staging.stage_prepared(paths[0], cache_dir)]
    paths = [local_copy(p, 'array_record') if storage.local_file(p) is None
             else os.path.abspath(os.path.expanduser(storage.local_file(p)))
             for p in paths]
    self.manifest = None
    lengths = None
    if len(paths) == 1 and os.path.isdir(paths[0]):
      folder = paths[0]
      self.manifest = read_manifest(folder)
      paths = [os.path.join(folder, s['file'])
               for s in self.manifest['shards']]
      lengths = []
    self.text = bool(text)
    self.name = (f'array_record({os.path.dirname(paths[0])},'
                 f' {len(paths)} file(s))')
    if self.manifest is not None:
      self.tokenizer = self._check_tokenizer(tokenizer, folder)
    else:
      self.tokenizer = tokenizer_lib.load(tokenizer or 'byte')
    counts = []
    for i, path in enumerate(paths):
      _check_file(path, 'array_record')
      try:
        source = array_record_data_source.ArrayRecordDataSource([path])
        n = len(source)
        if n:
          source[n - 1]  # reads the last chunk: a truncated file fails here
      except Exception as e:  # pylint: disable=broad-except
        raise RunnerError(f'{path}: corrupt or not an ArrayRecord file'
                          f' ({type(e).__name__}: {str(e) or "unreadable"}).'
                          ) from e
      if self.manifest is not None:
        shard = self.manifest['shards'][i]
        if n != shard['documents']:
          raise RunnerError(f'{path}: {n} records, but {MANIFEST} says'
                            f' {shard["documents"]}.')
        try:
          lengths.append(np.load(path + '.lengths.npy'))
        except (OSError, ValueError) as e:
          raise RunnerError(f'{path}.lengths.npy: cannot read it'
                            f' ({e}).') from e
      counts.append(n)
    self.paths = paths
    self._lengths = (np.concatenate(lengths).astype(np.int64)
                     if lengths is not None else None)
    self._source = None
    self._len = int(sum(counts))
    if not self._len:
      raise RunnerError(f'{self.name}: no records.')

  def _check_tokenizer(self, tokenizer, folder):
    recorded = self.manifest.get('tokenizer', {})
    if tokenizer is None:
      if recorded.get('hash') == 'byte':
        return tokenizer_lib.load('byte')
      path = recorded.get('path')
      if path and os.path.exists(path):
        tok = tokenizer_lib.load(path)
        if tok.hash == recorded.get('hash'):
          return tok
      raise RunnerError(f'{folder}/{MANIFEST}: made with tokenizer'
                        f' {recorded.get("path")} ({recorded.get("hash")}),'
                        ' which is not there; name it'
                        ' (array_record.tokenizer).')
    tok = tokenizer_lib.load(tokenizer)
    if tok.hash != recorded.get('hash'):
      raise RunnerError(
          f'{folder}/{MANIFEST}: the data was tokenized with'
          f' {recorded.get("path") or recorded.get("hash")}'
          f' ({recorded.get("hash")}) but the model\'s tokenizer is'
          f' {tok.name} ({tok.hash}); prepare the data again with it.')
    return tok

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    if self._source is None:
      from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
      self._source = array_record_data_source.ArrayRecordDataSource(
          self.paths)
    record = self._source[int(index)]
    if self.text:
      return self.tokenizer.encode(record), 0
    return decode_record(record)


class TextFileDocs(Documents):
  """Whole files as documents.

  Args:
    root: the folder ``paths`` are relative to.
    paths: the files.
    tokenizer: byte (lengths are the file sizes) or a tokenizer.json
      (lengths come from tokenizing every file once).
    sizes: the file sizes, if known.
  """

  def __init__(self, root: str, paths: Sequence[str], tokenizer='byte',
               sizes: Sequence[int] | None = None):
    self.root, self.paths = root, list(paths)
    self.tokenizer = tokenizer_lib.load(tokenizer)
    self.name = f'text_files({root})'
    self._sizes = sizes
    self._lengths = None
    self._recent = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, '_recent': collections.OrderedDict(),
            '_lock': None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.paths)

  def _read(self, index):
    with open(os.path.join(self.root, self.paths[index]), 'rb') as f:
      return f.read()

  def __getitem__(self, index):
    index = int(index)
    with self._lock:
      if index in self._recent:
        return self._recent[index], 0
    tokens = self.tokenizer.encode(self._read(index))
    with self._lock:
      self._recent[index] = tokens
      while len(self._recent) > 8:
        self._recent.popitem(last=False)
    return tokens, 0

  def _compute_lengths(self):
    if self.tokenizer.hash == 'byte':
      if self._sizes is not None:
        return np.asarray(self._sizes, np.int64)
      return np.asarray([os.path.getsize(os.path.join(self.root, p))
                         for p in self.paths], np.int64)
    out = []
    for start in range(0, len(self), 64):
      data = [self._read(i) for i in range(start, min(start + 64, len(self)))]
      out += [len(x) for x in self.tokenizer.encode_batch(data)]
    return np.asarray(out, np.int64)


class ConcatDocs(Documents):
  """Several :class:`Documents` as one (same tokenizer)."""

  def __init__(self, parts: Sequence[Documents]):
    if not parts:
      raise RunnerError('no data files given.')
    hashes = {p.tokenizer.hash for p in parts}
    if len(hashes) > 1:
      raise RunnerError(f'{parts[0].name} and others use different'
                        ' tokenizers.')
    self.parts = list(parts)
    self.tokenizer = parts[0].tokenizer
    self._ends = np.cumsum([len(p) for p in parts]).astype(np.int64)
    self.name = (parts[0].name if len(parts) == 1 else
                 f'{parts[0].name} and {len(parts) - 1} more')
    self._lengths = None

  def __len__(self):
    return int(self._ends[-1])

  def __getitem__(self, index):
    index = int(index)
    f = int(np.searchsorted(self._ends, index, side='right'))
    return self.parts[f][index - (int(self._ends[f - 1]) if f else 0)]

  def _compute_lengths(self):
    return np.concatenate([p.lengths() for p in self.parts])


def read_manifest(folder: str) -> dict:
  """The ``manifest.json`` of a prepared folder.

  Raises:
    RunnerError: missing or unreadable, naming it.
  """
  path = os.path.join(folder, MANIFEST)
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError as e:
    raise RunnerError(f'{path}: no such file (not a folder written by'
                      ' gintrain data prepare?).') from e
  except (OSError, ValueError) as e:
    raise RunnerError(f'{path}: cannot read it ({e}).') from e
  if not isinstance(manifest, dict) or 'shards' not in manifest:
    raise RunnerError(f'{path}: not a data manifest (no "shards").')
  return manifest
