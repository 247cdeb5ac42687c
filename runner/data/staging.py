"""Prepared data on an object store: written through, read from a local cache.

ArrayRecord's reader needs local files (it cannot read ``s3://`` or
``gs://``), so a folder written by ``gintrain data prepare`` on an object
store is used through a local copy:

* **Writing** (``data prepare --out=s3://bucket/prepared``): the shards are
  written into a local staging folder (``stage_dir_for``; a rerun after a
  kill resumes there, as a local ``--out`` does), then uploaded, each file
  skipped when the store already holds it at the same size, and
  ``manifest.json`` last: a folder with a manifest is complete.
* **Reading** (``data.array_record.paths = 's3://bucket/prepared'``):
  :func:`stage_prepared` copies the manifest's shards into the cache
  ``~/.cache/gintrain/data/<hash of the URL>-<folder name>/`` (or
  ``cache_dir``) and checks every file's SHA-256 against the manifest (a
  mismatch: one error naming the URL and both digests, nothing kept). A
  file already in the cache is not downloaded again: its verified digest is
  kept beside it (``<file>.verified``, with its size and modification time)
  so a restart hashes nothing. The manifest is copied last, so a cache
  folder with a manifest is complete. Each process stages its own copy
  (several on one host share the cache: files appear by rename).

Folders prepared before the manifest held digests are copied when missing
or of another size, without a digest check (said in a warning).
"""

import hashlib
import json
import os

from gintrain.lib import storage
from gintrain.runner.errors import RunnerError

__all__ = ['sha256_of', 'stage_dir_for', 'stage_prepared', 'upload_prepared',
           'is_remote_folder', 'shard_files', 'remote_manifest']

MANIFEST = 'manifest.json'
_CHUNK = 1 << 22


def sha256_of(path: str) -> str:
  """The SHA-256 (hex) of a local file."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(_CHUNK), b''):
      h.update(block)
  return h.hexdigest()


def shard_files(shard: dict) -> list[tuple[str, str | None]]:
  """``(file name, its SHA-256 or None)`` of a manifest's shard entry."""
  return [(shard['file'], shard.get('sha256')),
          (shard['file'] + '.lengths.npy', shard.get('lengths_sha256'))]


def _cache_root(cache_dir):
  return cache_dir or os.path.join(os.path.expanduser('~'), '.cache',
                                   'gintrain', 'data')


def _folder_key(url: str) -> str:
  url = url.rstrip('/')
  digest = hashlib.sha1(url.encode('utf-8')).hexdigest()[:16]
  return f'{digest}-{url.rsplit("/", 1)[-1] or "data"}'


def stage_dir_for(url: str, cache_dir: str | None = None,
                  kind: str = 'data') -> str:
  """The local folder standing for ``url`` (``kind``: ``'data'`` for the
  read cache, ``'prepare'`` for ``data prepare``'s staging)."""
  root = _cache_root(cache_dir)
  if kind != 'data':
    root = os.path.join(os.path.dirname(root.rstrip('/')), kind)
  return os.path.join(root, _folder_key(url))


def is_remote_folder(path) -> bool:
  """Whether ``path`` is an object-store URL (not a pattern) holding a
  ``manifest.json``."""
  if not isinstance(path, str) or storage.local_file(path) is not None:
    return False
  if any(c in path for c in '*?['):
    return False  # a pattern of files
  return storage.isfile(storage.join(path, MANIFEST))  # a store's failure
  # is its own one-line error


def _verified(local: str, digest: str | None) -> bool:
  """Whether ``local`` holds ``digest`` (its sidecar says so for its size
  and mtime, or hashing it says so; then the sidecar is written)."""
  try:
    st = os.stat(local)
  except FileNotFoundError:
    return False
  mark = local + '.verified'
  stamp = {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'sha256': digest}
  try:
    with open(mark, encoding='utf-8') as f:
      if json.load(f) == stamp:
        return True
  except (OSError, ValueError):
    pass
  if sha256_of(local) != digest:
    return False
  _write_json(mark, stamp)
  return True


def _write_json(path, value):
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, sort_keys=True)
  os.replace(tmp, path)


def _fetch(url: str, local: str, digest: str | None, warn) -> None:
  """``url`` into ``local``, its SHA-256 checked against ``digest``."""
  if digest is not None:
    if _verified(local, digest):
      return
  else:
    try:
      size = storage.info(url)['size']
    except FileNotFoundError as e:
      raise RunnerError(f'{url}: no such file (listed in {MANIFEST}).'
                        ) from e
    if os.path.isfile(local) and os.path.getsize(local) == size:
      return
    warn()
  tmp = f'{local}.{os.getpid()}.tmp'
  try:
    storage.download(url, tmp)
  except FileNotFoundError as e:
    raise RunnerError(f'{url}: no such file (listed in {MANIFEST}).') from e
  if digest is not None:
    got = sha256_of(tmp)
    if got != digest:
      os.remove(tmp)
      raise RunnerError(f'{url}: SHA-256 {got[:16]}... differs from the'
                        f' {digest[:16]}... {MANIFEST} gives (a corrupt or'
                        ' replaced shard); prepare the data again.')
  os.replace(tmp, local)
  if digest is not None:
    _verified(local, digest)


def stage_prepared(url: str, cache_dir: str | None = None) -> str:
  """A local folder holding the prepared folder ``url``'s shards, verified
  against its manifest (see the module doc); returns its path.

  Raises:
    RunnerError: no readable manifest, a missing shard or one whose digest
      differs, naming the URL.
  """
  url = url.rstrip('/')
  where = storage.join(url, MANIFEST)
  try:
    raw = storage.read_bytes(where)
    manifest = json.loads(raw)
  except FileNotFoundError as e:
    raise RunnerError(f'{where}: no such file (not a folder written by'
                      ' gintrain data prepare?).') from e
  except ValueError as e:
    raise RunnerError(f'{where}: cannot read it ({e}).') from e
  if not isinstance(manifest, dict) or not isinstance(
      manifest.get('shards'), list):
    raise RunnerError(f'{where}: not a data manifest (no "shards").')
  local = stage_dir_for(url, cache_dir)
  os.makedirs(local, exist_ok=True)
  warned = []

  def warn():
    if not warned:
      warned.append(1)
      from absl import logging  # pylint: disable=import-outside-toplevel
      logging.warning('%s has no SHA-256 digests (prepared by an older'
                      ' gintrain): its shards are copied without a check.',
                      where)
  for shard in manifest['shards']:
    for name, digest in shard_files(shard):
      _fetch(storage.join(url, name), os.path.join(local, name), digest, warn)
  target = os.path.join(local, MANIFEST)
  tmp = f'{target}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    f.write(raw)
  os.replace(tmp, target)
  return local


def remote_manifest(url: str):
  """The parsed ``manifest.json`` under ``url``; None when there is none
  (``{}`` when it is not JSON). A store's failure raises its own error."""
  try:
    raw = storage.read_bytes(storage.join(url, MANIFEST))
  except FileNotFoundError:
    return None
  try:
    return json.loads(raw)
  except ValueError:
    return {}


def upload_prepared(local: str, url: str, manifest: dict) -> None:
  """Uploads a prepared folder's shards (each skipped when ``url`` holds it
  at the same size), then its manifest (last).

  Raises:
    RunnerError: ``url`` holds the manifest of another preparation.
  """
  there = remote_manifest(url)
  if there is not None:
    if there == manifest:
      return
    raise RunnerError(f'{url} holds another preparation (its {MANIFEST}'
                      ' differs); give a new --out.')
  for shard in manifest['shards']:
    for name in [n for n, _ in shard_files(shard)] + [
        shard['file'].removesuffix('.array_record') + '.json']:
      src, dst = os.path.join(local, name), storage.join(url, name)
      try:
        if storage.info(dst)['size'] == os.path.getsize(src):
          continue
      except FileNotFoundError:
        pass
      storage.upload_file(src, dst)
  storage.upload_file(os.path.join(local, MANIFEST),
                      storage.join(url, MANIFEST))
