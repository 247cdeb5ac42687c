"""``gintrain data prepare``: tokenize documents into ArrayRecord shards.

Inputs are text files (one document each; folders are walked for
``pattern``), ``.jsonl`` files and ``.parquet`` files (one document per
line or row, from ``field``, with an optional ``prompt_field``). They are
planned into shards once, in sorted order: each JSONL or Parquet file is a
shard, and consecutive text files are grouped up to ``shard_mb`` megabytes.
Worker processes tokenize the shards; each shard is written as::

    shard-00003.array_record             records: uint32 [prompt_length, *tokens]
    shard-00003.array_record.lengths.npy tokens per document
    shard-00003.json                     its counts and the SHA-256 of the
                                         two files above (written last: done)

under temporary names, renamed when complete. A rerun of the same command
(after a kill, say) keeps the finished shards and does the rest; the output
is byte for byte what an uninterrupted run writes (nothing depends on time
or worker count). ``manifest.json`` comes last: documents, tokens, the
tokenizer (path, hash, vocabulary size), and every shard with its source
files and their sizes. Training on the folder (``data.array_record``)
refuses a tokenizer whose hash differs from the manifest's. ``--out`` may
be an object-store URL (``s3://...``): see :mod:`runner.data.staging`.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

from gintrain.runner.data import packing
from gintrain.lib import storage
from gintrain.runner.data import sources
from gintrain.runner.data import staging
from gintrain.runner.data import tokenizer as tokenizer_lib
from gintrain.runner.errors import RunnerError

__all__ = ['Options', 'plan', 'prepare', 'FORMAT']

FORMAT = 'gintrain-prepared-v1'
PLAN_FILE = 'plan.json'
_WRITER_OPTIONS = 'group_size:1'


@dataclasses.dataclass(frozen=True)
class Options:
  """What ``data prepare`` does (the command's flags)."""
  inputs: tuple
  out: str
  tokenizer: str = 'byte'
  field: str = 'text'
  prompt_field: str | None = None
  pattern: str = '*'
  shard_mb: float = 64.0
  workers: int = 1
  on_bad_line: str = 'skip'
  dry_run: bool = False
  length: int = 128
  progress: bool = True


def _kind(path):
  if path.endswith(('.jsonl', '.jsonl.txt', '.ndjson')):
    return 'jsonl'
  if path.endswith('.parquet'):
    return 'parquet'
  return 'text'


def plan(options: Options) -> list[list[tuple[str, int, str]]]:
  """Shards as lists of ``(path, size, kind)``.

  Raises:
    RunnerError: a missing input or nothing to read.
  """
  files = []
  for path in options.inputs:
    if os.path.isdir(path):
      files += tokenizer_lib.expand_files([path], options.pattern)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise RunnerError(f'data prepare: {path}: no such file or folder.')
  if not files:
    raise RunnerError('data prepare: no input files.')
  shards, group, group_bytes = [], [], 0
  limit = options.shard_mb * 2 ** 20
  for path in files:
    path = os.path.abspath(path)
    size, kind = os.path.getsize(path), _kind(path)
    if kind != 'text':
      shards.append([(path, size, kind)])
      continue
    if group and group_bytes + size > limit:
      shards.append(group)
      group, group_bytes = [], 0
    group.append((path, size, kind))
    group_bytes += size
  if group:
    shards.append(group)
  return shards


def _documents(entry, options, tok):
  """Yields ``(tokens, prompt_length)`` of one input; returns bad lines."""
  path, _, kind = entry
  if kind == 'text':
    with open(path, 'rb') as f:
      data = f.read()
    return [(tok.encode(data), 0)], 0
  if kind == 'jsonl':
    docs = sources.JsonlDocs(path, options.field, tok, options.prompt_field,
                             options.on_bad_line)
  else:
    docs = sources.ParquetDocs(path, options.field, tok,
                               options.prompt_field)
  return (docs[i] for i in range(len(docs))), getattr(docs, 'skipped', 0)


def _shard_name(i):
  return f'shard-{i:05d}'


def _work(args):
  """Tokenizes and writes shard ``i`` (in a worker process)."""
  i, shard, options = args
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.load(options.tokenizer)
  base = os.path.join(options.out, _shard_name(i))
  lengths, skipped = [], 0
  writer = None
  if not options.dry_run:
    writer = array_record_module.ArrayRecordWriter(
        base + '.array_record.tmp', _WRITER_OPTIONS)
  try:
    for entry in shard:
      docs, bad = _documents(entry, options, tok)
      skipped += bad
      for tokens, prompt in docs:
        lengths.append(len(tokens))
        if writer is not None:
          writer.write(sources.encode_record(tokens, prompt))
  finally:
    if writer is not None:
      writer.close()
  lengths = np.asarray(lengths, np.int64)
  stats = {'file': _shard_name(i) + '.array_record',
           'documents': int(len(lengths)), 'tokens': int(lengths.sum()),
           'skipped_lines': int(skipped),
           'sources': [{'path': p, 'size': s} for p, s, _ in shard]}
  if options.dry_run:
    return i, stats, lengths
  with open(base + '.array_record.lengths.npy.tmp', 'wb') as f:
    np.save(f, lengths)
  stats['sha256'] = staging.sha256_of(base + '.array_record.tmp')
  stats['lengths_sha256'] = staging.sha256_of(
      base + '.array_record.lengths.npy.tmp')
  os.replace(base + '.array_record.tmp', base + '.array_record')
  os.replace(base + '.array_record.lengths.npy.tmp',
             base + '.array_record.lengths.npy')
  _write_json(base + '.json', stats)
  delay = float(os.environ.get('GINTRAIN_PREPARE_DELAY_S', '0') or 0)
  if delay:  # tests: a window to kill the command between shards
    time.sleep(delay)
  return i, stats, None


def _write_json(path, value):
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, sort_keys=True, indent=1)
    f.write('\n')
  os.replace(path + '.tmp', path)


def _read_done(path):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class _Progress:
  """One status line: shards, documents, tokens, input MB/s, ETA."""

  def __init__(self, total_bytes, total_shards, enabled):
    self.total_bytes, self.total_shards = total_bytes, total_shards
    self.enabled, self.start = enabled, time.perf_counter()
    self.bytes = self.shards = self.docs = self.tokens = 0
    self.done_before = 0

  def update(self, nbytes, stats, resumed=False):
    self.shards += 1
    self.docs += stats['documents']
    self.tokens += stats['tokens']
    if resumed:
      self.done_before += nbytes
    self.bytes += nbytes
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.start
    fresh = self.bytes - self.done_before
    rate = fresh / max(elapsed, 1e-9)
    left = (self.total_bytes - self.bytes) / rate if rate > 0 else 0
    eta = time.strftime('%H:%M:%S', time.gmtime(left)) if fresh else '?'
    print(f'\r[{self.shards}/{self.total_shards} shards]'
          f' {self.docs} docs {self.tokens} tokens'
          f' {rate / 2 ** 20:.1f} MB/s ETA {eta}   ', end='',
          file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      print(file=sys.stderr, flush=True)


def prepare(options: Options) -> dict:
  """Runs the preparation (see the module doc); returns the manifest
  (``--dry_run``: the counts, nothing written). An object-store ``out``
  (``s3://...``) is written through a local staging folder
  (:mod:`runner.data.staging`), uploaded with the manifest last.

  Raises:
    RunnerError: bad inputs, a bad tokenizer, or an output folder holding
      another preparation.
  """
  if not isinstance(options.workers, int) or options.workers < 1:
    raise RunnerError(f'--workers must be >= 1, got {options.workers!r}.')
  if (options.dry_run or not options.out or
      storage.local_file(options.out) is not None):
    return _prepare(options, *_plan_value(options))
  url = options.out.rstrip('/')
  tok, shards, plan_value = _plan_value(options)
  there = staging.remote_manifest(url)
  if there is not None:
    if _same_plan(there, plan_value):
      return there  # already prepared and uploaded
    raise RunnerError(f'{url} holds another preparation (its'
                      f' {sources.MANIFEST} lists other inputs, sizes or'
                      ' tokenizer); give a new --out.')
  local = staging.stage_dir_for(url, kind='prepare')
  # the staging folder is a cache: one of another preparation is replaced
  previous = _read_done(os.path.join(local, PLAN_FILE))
  if previous is not None and previous != plan_value:
    shutil.rmtree(local, ignore_errors=True)
  manifest = _prepare(dataclasses.replace(options, out=local), tok, shards,
                      plan_value)
  staging.upload_prepared(local, url, manifest)
  return manifest


def _plan_value(options):
  """(tokenizer, shards, the plan.json value) of ``options``."""
  tok = tokenizer_lib.load(options.tokenizer)
  shards = plan(options)
  tok_info = {'hash': tok.hash, 'vocab_size': tok.vocab_size,
              'path': None if tok.hash == 'byte' else os.path.abspath(
                  tok.path)}
  plan_value = {'format': FORMAT, 'tokenizer': tok_info,
                'field': options.field, 'prompt_field': options.prompt_field,
                'on_bad_line': options.on_bad_line,
                'shards': [[{'path': p, 'size': s} for p, s, _ in shard]
                           for shard in shards]}
  return tok, shards, plan_value


def _same_plan(manifest, plan_value) -> bool:
  """Whether ``manifest`` was written for ``plan_value``."""
  if not isinstance(manifest, dict) or not isinstance(
      manifest.get('shards'), list):
    return False
  keys = ('format', 'tokenizer', 'field', 'prompt_field')
  return ({k: manifest.get(k) for k in keys} ==
          {k: plan_value[k] for k in keys} and
          [s.get('sources') for s in manifest['shards']] ==
          plan_value['shards'])


def _prepare(options: Options, tok, shards, plan_value) -> dict:
  del tok  # each worker loads its own
  todo, done = list(range(len(shards))), {}
  if not options.dry_run:
    os.makedirs(options.out, exist_ok=True)
    plan_path = os.path.join(options.out, PLAN_FILE)
    previous = _read_done(plan_path)
    if previous is not None and previous != plan_value:
      raise RunnerError(f'{options.out} holds another preparation (its'
                        f' {PLAN_FILE} differs: other inputs, sizes or'
                        ' tokenizer); give a new --out.')
    _write_json(plan_path, plan_value)
    for i in range(len(shards)):
      stats = _read_done(os.path.join(options.out, _shard_name(i) + '.json'))
      if stats is not None:
        done[i] = stats
    todo = [i for i in todo if i not in done]
  sizes = [sum(s for _, s, _ in shard) for shard in shards]
  progress = _Progress(sum(sizes), len(shards), options.progress)
  for i in sorted(done):
    progress.update(sizes[i], done[i], resumed=True)
  all_lengths = {}
  jobs = [(i, shards[i], options) for i in todo]
  if options.workers > 1 and len(jobs) > 1:
    context = multiprocessing.get_context('spawn')
    with context.Pool(min(options.workers, len(jobs))) as pool:
      for i, stats, lengths in pool.imap_unordered(_work, jobs):
        done[i] = stats
        all_lengths[i] = lengths
        progress.update(sizes[i], stats)
  else:
    for job in jobs:
      i, stats, lengths = _work(job)
      done[i] = stats
      all_lengths[i] = lengths
      progress.update(sizes[i], stats)
  progress.close()
  stats = [done[i] for i in range(len(shards))]
  manifest = {'format': FORMAT, 'tokenizer': plan_value['tokenizer'],
              'field': options.field, 'prompt_field': options.prompt_field,
              'documents': sum(s['documents'] for s in stats),
              'tokens': sum(s['tokens'] for s in stats),
              'skipped_lines': sum(s['skipped_lines'] for s in stats),
              'shards': stats}
  if options.dry_run:
    lengths = np.concatenate([all_lengths[i] for i in range(len(shards))])
    manifest['packing_efficiency'] = packing.Rows(
        _Lengths(lengths), options.length, shuffle=False).efficiency
    return manifest
  _write_json(os.path.join(options.out, sources.MANIFEST), manifest)
  return manifest


class _Lengths:
  def __init__(self, lengths):
    self._lengths = lengths

  def lengths(self):
    return self._lengths


def hash_of(folder: str) -> str:
  """The SHA-256 of a prepared folder's files (for comparing outputs)."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      h.update(name.encode() + b'\0' + f.read())
  return h.hexdigest()
