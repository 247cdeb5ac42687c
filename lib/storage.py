"""Object stores: checkpoint and run paths given as URLs (``s3://``, ``gs://``).

Every function takes a local path or a URL alike. A path with a URL scheme
goes through `fsspec <https://filesystem-spec.readthedocs.io>`_
(``memory://`` for tests, ``s3://`` with s3fs, ``gs://`` with gcsfs, any
other protocol fsspec knows); a local path takes the ``os`` fast path
(no fsspec import). ``file://`` URLs are local paths (:func:`local_path`).
Callers never branch on the kind of path; code with a faster local route
(file descriptors, fsync, rename) asks :func:`local_file` for the local
path, which is None on an object store.

Rules this module enforces:

* A URL never becomes a local folder: an unknown scheme (``foo://bar``) or
  a store whose package is missing (``gs://`` without gcsfs) raises
  :class:`StorageError` at once, with one line saying what to install.
* Credentials and endpoints come only from each store's own environment
  variables and config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``GOOGLE_APPLICATION_CREDENTIALS`` ...); nothing here reads or logs them.
* Writes appear under their final name only when complete
  (:class:`Upload`): on S3 and GCS a multipart / resumable upload completed
  by its last request, elsewhere an upload to a hidden temporary name moved
  into place. Data is streamed in blocks; the whole file is never held.
* Listings are never cached (``use_listings_cache=False``): a checkpoint
  written by another process is seen at once.
* A store that fails under a call (endpoint unreachable, bucket deleted,
  access denied, a 5xx) raises :class:`StoreError`, an ``OSError`` carrying
  the URL and a short reason (``ConnectionError`` / ``FileNotFoundError`` /
  ``PermissionError`` by kind), never a botocore/aiohttp exception. A
  transient failure (unreachable, timeout, 5xx, throttling) is retried
  :data:`RETRIES_ENV` times (default :data:`DEFAULT_RETRIES`) with a
  doubling wait (1, 2, 4 s ...), on top of botocore's own retries
  (``AWS_MAX_ATTEMPTS``); once a store failed after its retries, later calls
  to it fail at once until one succeeds (the run's cleanup does not wait
  again).
* A local file call here that fails says what it was doing:
  :func:`operation_of` gives ``'create the directory'``, ``'remove'``,
  ``'rename'``, ``'read'``, ``'write to'`` ... for the caller's message
  (``cannot <operation> <path>: <reason>``); the error is unchanged
  otherwise.

  >>> is_url('s3://b/run'), is_url('/tmp/run'), is_url('file:///tmp/run')
  (True, False, False)
  >>> local_file('file:///tmp/run'), local_file('s3://b/run')
  ('/tmp/run', None)
  >>> join('s3://b/run', 'checkpoints')
  's3://b/run/checkpoints'
"""

import concurrent.futures
import contextlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from typing import Any, Iterator

from gintrain.lib import errors

__all__ = [
    'StorageError',
    'StoreError',
    'StoreUnreachableError',
    'StoreNotFoundError',
    'StorePermissionError',
    'translate_error',
    'call',
    'RETRIES_ENV',
    'DEFAULT_RETRIES',
    'is_url',
    'local_path',
    'local_file',
    'listdir',
    'read_text',
    'write_text',
    'open_read',
    'check',
    'filesystem',
    'join',
    'list_entries',
    'exists',
    'isdir',
    'isfile',
    'size',
    'info',
    'makedirs',
    'remove',
    'rmtree',
    'read_bytes',
    'write_bytes',
    'move',
    'Upload',
    'download',
    'staged_download',
    'upload_file',
    'upload_tree',
    'tensorstore_kvstore_spec',
    'EXTRAS',
    'operation_of',
]

logger = logging.getLogger(__name__)

# '<scheme>://<rest>' (a Windows drive 'C:\' has no '//').
_URL_RE = re.compile(r'^(?P<scheme>[a-zA-Z][a-zA-Z0-9.+-]*)://(?P<rest>.*)$',
                     re.S)
# The gintrain extra that brings each store's fsspec package.
EXTRAS = {'gs': 'gcs', 'gcs': 'gcs', 's3': 's3', 's3a': 's3'}
# Stores whose writes stay invisible until the upload is completed.
_ATOMIC_UPLOAD = frozenset({'s3', 's3a', 'gs', 'gcs'})
# Upload block (S3 part) size: 5 MiB is S3's minimum part size.
UPLOAD_BLOCK_BYTES = 32 << 20
# S3 parts uploaded at once (memory: this many blocks, plus the one filling).
UPLOAD_PARTS_IN_FLIGHT = 4


class StorageError(errors.GintrainError, ValueError):
  """A URL that cannot be used: unknown scheme, or its package is missing
  (or, as :class:`StoreError`, a store that failed under a call)."""

  def __init__(self, url, reason, hint=''):
    self.url, self.reason = url, reason
    errors.GintrainError.__init__(self, f'{url}: {reason}', hint)


# -- store failures -----------------------------------------------------------

# The environment variable holding how many times a transient store failure
# is retried (an integer >= 0; see the module docstring).
RETRIES_ENV = 'GINTRAIN_STORE_RETRIES'
DEFAULT_RETRIES = 3
RETRY_FIRST_WAIT_S = 1.0  # doubled after each retry ...
RETRY_MAX_WAIT_S = 8.0  # ... up to this
# (scheme, bucket) of stores that failed after their retries: later calls
# are tried once, until one succeeds.
_FAILED_STORES = set()
_FAILED_LOCK = threading.Lock()


class StoreError(StorageError, OSError):
  """An object store failed under a call: ``url`` is the object (or
  folder) the call was about, ``reason`` says what failed, in a few words;
  ``transient`` whether waiting may help (retried first)."""

  transient = False
  errno_value = None
  _HINT = ''

  def __init__(self, url, reason, hint=None):
    StorageError.__init__(self, url, reason,
                          self._HINT if hint is None else hint)
    # (strerror/filename unset: str() is the message, naming the URL)
    self.errno = self.errno_value

  def __reduce__(self):
    return (type(self), (self.url, self.reason, self.hint))


class StoreUnreachableError(StoreError, ConnectionError):
  """The store's endpoint cannot be reached (refused, reset, timed out) or
  answers with a server error (5xx, throttling)."""

  transient = True
  errno_value = 111  # ECONNREFUSED
  _HINT = ('(the run stops; what is already saved is kept: relaunch when'
           ' the store is back and it resumes from its last checkpoint)')


class StoreNotFoundError(StoreError, FileNotFoundError):
  """The bucket is not there (never created, or deleted)."""

  errno_value = 2  # ENOENT
  _HINT = '(create the bucket, or use another --workdir)'


class StorePermissionError(StoreError, PermissionError):
  """The store refused the credentials or the call (access denied)."""

  errno_value = 13  # EACCES
  _HINT = ('(check the credentials: AWS_ACCESS_KEY_ID / AWS_PROFILE,'
           ' GOOGLE_APPLICATION_CREDENTIALS, and the bucket\'s policy)')


# Error codes of S3 / GCS answers, by what they mean here.
_UNREACHABLE_CODES = frozenset({
    'InternalError', 'ServiceUnavailable', 'SlowDown', 'RequestTimeout',
    'Throttling', 'ThrottlingException', 'RequestLimitExceeded',
    '500', '502', '503', '504'})
_NO_BUCKET_CODES = frozenset({'NoSuchBucket'})
_DENIED_CODES = frozenset({
    'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
    'ExpiredToken', 'InvalidToken', 'AllAccessDisabled', 'AccountProblem',
    '403'})
# tensorstore's (absl status) messages: 'UNAVAILABLE: ...'.
_TS_STATUS_RE = re.compile(
    r'^(UNAVAILABLE|DEADLINE_EXCEEDED|PERMISSION_DENIED|UNAUTHENTICATED|'
    r'RESOURCE_EXHAUSTED)\b')


def _short(text, limit=160) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _bucket(url) -> str:
  match = _URL_RE.match(url) if isinstance(url, str) else None
  return match.group('rest').split('/', 1)[0] if match else ''


def _endpoint(error) -> str | None:
  """``scheme://host[:port]`` of the endpoint a client error names."""
  for value in (getattr(error, 'kwargs', None) or {}).values():
    match = re.match(r'^(https?://[^/\s"]+)', str(value))
    if match:
      return match.group(1)
  match = re.search(r'https?://[^/\s"]+', str(error))
  if match:
    return match.group(0)
  match = re.search(r'host ([^\s:]+:\d+)', str(error))  # aiohttp's
  return f'http://{match.group(1)}' if match else None


def _unreachable(url, error) -> StoreUnreachableError:
  where = _endpoint(error) or os.environ.get(
      'AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
  text = str(error).lower()
  why = ('connection refused' if 'refused' in text or 'connect call failed'
         in text or 'could not connect' in text else
         'timed out' if 'timeout' in text or 'timed out' in text else
         _short(error, 100))
  at = f' at {where}' if where else ''
  return StoreUnreachableError(url, f'cannot reach the object store{at}'
                               f' ({why})')


def _client_code(error) -> str | None:
  """The S3/GCS error code of ``error`` or of the error it wraps."""
  seen = 0
  while error is not None and seen < 5:
    response = getattr(error, 'response', None)
    if isinstance(response, dict):
      code = (response.get('Error') or {}).get('Code')
      status = (response.get('ResponseMetadata') or {}).get('HTTPStatusCode')
      return str(code or status or '') or None
    code = getattr(error, 'code', None)  # gcsfs HttpError
    if isinstance(code, int) and code >= 400:
      return str(code)
    error = error.__cause__ or error.__context__
    seen += 1
  return None


def translate_error(url: str, error: BaseException) -> StoreError | None:
  """``error`` (raised by a store's client under a call about ``url``) as a
  :class:`StoreError`, or None when it is not a failure of the store (a
  missing object stays ``FileNotFoundError``; errors of the library's own
  stay as they are).

  Knows botocore / aiobotocore / s3fs, aiohttp, gcsfs and tensorstore
  errors (tensorstore's ``ValueError('UNAVAILABLE: ...')``).
  """
  if isinstance(error, errors.GintrainError) or not isinstance(
      error, Exception):
    return None
  module = type(error).__module__ or ''
  name = type(error).__name__
  code = _client_code(error)
  if code in _NO_BUCKET_CODES or (
      isinstance(error, FileNotFoundError) and
      'bucket does not exist' in str(error).lower()):
    return StoreNotFoundError(
        url, f"the bucket '{_bucket(url)}' does not exist (deleted?)")
  if code in _DENIED_CODES or name in ('NoCredentialsError',
                                       'PartialCredentialsError'):
    reason = ('no credentials found' if 'Credentials' in name else
              f'access denied ({code}: {_short(error, 100)})')
    return StorePermissionError(url, reason)
  if code in _UNREACHABLE_CODES or (code or '').startswith('5'):
    return StoreUnreachableError(
        url, f'the object store failed ({code}: {_short(error, 100)})')
  if module.startswith(('botocore', 'aiobotocore', 'aiohttp', 'urllib3',
                        'requests')) and (
                            'Connect' in name or 'Timeout' in name or
                            'Connection' in name or 'ServerDisconnected' in
                            name or name == 'ClientOSError'):
    return _unreachable(url, error)
  if isinstance(error, (ConnectionError, TimeoutError)) or name in (
      'FSTimeoutError',):
    return _unreachable(url, error)
  if isinstance(error, ValueError) and _TS_STATUS_RE.match(str(error)):
    status = _TS_STATUS_RE.match(str(error)).group(1)
    if status in ('PERMISSION_DENIED', 'UNAUTHENTICATED'):
      return StorePermissionError(url, f'access denied ({_short(error)})')
    return StoreUnreachableError(
        url, f'the object store failed ({_short(error)})')
  return None


def _store_key(url):
  return (_scheme(url), _bucket(url))


def _retries(url) -> int:
  with _FAILED_LOCK:
    if _store_key(url) in _FAILED_STORES:
      return 0
  text = os.environ.get(RETRIES_ENV, '').strip()
  if not text:
    return DEFAULT_RETRIES
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise StorageError(f'{RETRIES_ENV}={text}', 'must be an integer >= 0'
                       ' (how many times a failing object store is retried)')
  return value


def _call_once(url: str, fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` with store failures raised as
  :class:`StoreError`, not retried (a call that is not safe to repeat, such
  as a write into a buffered file)."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    error = translate_error(url, e)
    if error is None:
      raise
    raise error from e


def call(url: str, fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` (a store call about ``url``, safe to repeat):
  store failures raised as :class:`StoreError`, transient ones retried
  first."""
  attempt = 0
  while True:
    try:
      out = fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      error = translate_error(url, e)
      if error is None:
        raise
      retries = _retries(url) if error.transient else 0
      if attempt < retries:
        wait = min(RETRY_FIRST_WAIT_S * 2 ** attempt, RETRY_MAX_WAIT_S)
        attempt += 1
        logger.warning('%s: %s; retry %d of %d in %g s (%s).', error.url,
                       error.reason, attempt, retries, wait, RETRIES_ENV)
        time.sleep(wait)
        continue
      if error.transient:
        with _FAILED_LOCK:
          _FAILED_STORES.add(_store_key(url))
      raise error from e
    if attempt or _FAILED_STORES:
      with _FAILED_LOCK:
        _FAILED_STORES.discard(_store_key(url))
    return out


# --- What a failed local call was doing --------------------------------------

# Where an OSError keeps the operation that raised it (operation_of).
_OPERATION = '_gintrain_operation'


class _Doing:
  """``with _Doing('remove'):`` an OSError leaving the block keeps the
  operation, unless a block inside named one (the innermost wins)."""

  __slots__ = ('operation',)

  def __init__(self, operation: str):
    self.operation = operation

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind, error, traceback) -> bool:
    if isinstance(error, OSError) and not hasattr(error, _OPERATION):
      setattr(error, _OPERATION, self.operation)
    return False


_CREATING_DIR = _Doing('create the directory')
_REMOVING = _Doing('remove')
_RENAMING = _Doing('rename')
_READING = _Doing('read')
_WRITING = _Doing('write to')
_COPYING = _Doing('copy')


def operation_of(error: BaseException) -> str | None:
  """What the local file call of this module that raised ``error`` was
  doing (``'create the directory'``, ``'remove'``, ``'rename'``,
  ``'read'``, ``'write to'``, ``'copy'``), or None: not raised by one.

    >>> try:
    ...   remove('/nonexistent/file')
    ... except OSError as e:
    ...   operation_of(e)
    'remove'
  """
  return getattr(error, _OPERATION, None)


def _scheme(path) -> str | None:
  if not isinstance(path, str):
    return None
  match = _URL_RE.match(path)
  return match.group('scheme').lower() if match else None


def is_url(path) -> bool:
  """Whether ``path`` is an object-store URL (``file://`` is local)."""
  scheme = _scheme(path)
  return scheme is not None and scheme != 'file'


def local_path(path):
  """``path`` with a ``file://`` scheme removed (others unchanged)."""
  if _scheme(path) == 'file':
    return _URL_RE.match(path).group('rest') or '/'
  return path


def join(url: str, *names: str) -> str:
  """``url`` and ``names`` joined with ``/`` (for URLs and local paths)."""
  if not is_url(url):
    return os.path.join(url, *names)
  out = url.rstrip('/')
  for name in names:
    out = f'{out}/{name.strip("/")}' if name else out
  return out


def filesystem(url: str):
  """``(fsspec filesystem, path inside it)`` of ``url``.

  Raises:
    StorageError: an unknown scheme, or the store's package is not
      installed (one line naming the extra to install).
  """
  scheme = _scheme(url)
  if scheme is None:
    raise StorageError(url, 'not a URL')
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    extra = EXTRAS.get(scheme, 's3')
    raise StorageError(
        url, f'{scheme}:// paths need fsspec, which is not installed;'
        f" run: pip install 'gintrain[{extra}]'") from None
  try:
    cls = fsspec.get_filesystem_class(scheme)
  except ValueError:
    raise StorageError(
        url, f'unknown storage scheme "{scheme}://" (use a local path, or a'
        ' URL fsspec knows: s3://, gs://, memory://, ...)') from None
  except ImportError:
    extra = EXTRAS.get(scheme)
    how = (f"pip install 'gintrain[{extra}]'" if extra else
           f'install the fsspec implementation of {scheme}://')
    raise StorageError(
        url, f'{scheme}:// needs a package that is not installed; run:'
        f' {how}') from None
  # Endpoints and credentials: the store's own environment and config
  # (fsspec caches the instance per process and thread).
  fs = cls(use_listings_cache=False)
  return fs, cls._strip_protocol(url)  # pylint: disable=protected-access


def check(path):
  """Returns ``path`` (``file://`` made local) if it can be used.

  Local paths are returned as they are; a URL must name a store fsspec
  knows and whose package is installed.

  Raises:
    StorageError: see :func:`filesystem`.
  """
  path = local_path(os.fspath(path) if isinstance(path, os.PathLike)
                    else path)
  if is_url(path):
    filesystem(path)
  return path


def local_file(path) -> str | None:
  """The local filesystem path of ``path`` (``file://`` removed), or None
  when it is on an object store: for code with a faster local route."""
  path = os.fspath(path) if isinstance(path, os.PathLike) else path
  return None if is_url(path) else local_path(path)


def list_entries(path: str) -> dict[str, str]:
  """``{name: 'file' | 'directory'}`` of the entries of ``path`` ({} if
  nothing is there; a local file raises NotADirectoryError). Locally, a symlink or special file is listed as ``'file'``
  (``os.path.isdir`` decides; links are not followed)."""
  local = local_file(path)
  if local is not None:
    try:
      with os.scandir(local) as it:
        return {e.name: ('directory' if e.is_dir(follow_symlinks=False)
                         else 'file') for e in it}
    except FileNotFoundError:
      return {}
  fs, fs_path = filesystem(path)
  try:
    entries = call(path, fs.ls, fs_path, detail=True)
  except FileNotFoundError:  # a missing bucket too: nothing there
    return {}
  out = {}
  base = fs_path.rstrip('/')
  for entry in entries:
    name = entry['name'].rstrip('/')
    if name == base:  # a file, listed as itself
      continue
    out[name.rsplit('/', 1)[-1]] = entry.get('type', 'file')
  return out


def listdir(path: str) -> list[str]:
  """The sorted names in the directory ``path`` ([] if it does not exist)."""
  return sorted(list_entries(path))


def exists(path: str, follow_symlinks: bool = True) -> bool:
  """Whether anything is at ``path`` (``follow_symlinks=False``: a local
  dangling symlink counts too)."""
  local = local_file(path)
  if local is not None:
    return (os.path.exists if follow_symlinks else os.path.lexists)(local)
  fs, fs_path = filesystem(path)
  return bool(call(path, fs.exists, fs_path))


def isdir(path: str) -> bool:
  local = local_file(path)
  if local is not None:
    return os.path.isdir(local)
  fs, fs_path = filesystem(path)
  return bool(call(path, fs.isdir, fs_path))


def isfile(path: str) -> bool:
  local = local_file(path)
  if local is not None:
    return os.path.isfile(local)
  fs, fs_path = filesystem(path)
  return bool(call(path, fs.isfile, fs_path))


def size(path: str) -> int:
  local = local_file(path)
  if local is not None:
    return os.path.getsize(local)
  fs, fs_path = filesystem(path)
  return int(call(path, fs.size, fs_path))


def info(path: str) -> dict:
  """``{'type', 'size', 'mtime'}`` of ``path`` (not following a local
  symlink): ``type`` is ``'file'``, ``'directory'`` or, locally, what else
  it is (``'fifo'``, ``'link'``, ``'other'``); ``mtime`` is None where the
  store has none. A directory's size is that of its files, recursively.

  Raises:
    FileNotFoundError: nothing at ``path``.
  """
  local = local_file(path)
  if local is not None:
    st = os.lstat(local)
    kind = ('file' if stat.S_ISREG(st.st_mode) else
            'directory' if stat.S_ISDIR(st.st_mode) else
            'fifo' if stat.S_ISFIFO(st.st_mode) else
            'link' if stat.S_ISLNK(st.st_mode) else 'other')
    size = st.st_size
    if kind == 'directory':
      size = sum(os.lstat(os.path.join(root, name)).st_size
                 for root, _, names in os.walk(local) for name in names)
    return {'type': kind, 'size': size, 'mtime': st.st_mtime}
  fs, fs_path = filesystem(path)
  entry = call(path, fs.info, fs_path)
  kind = 'directory' if entry.get('type') == 'directory' else 'file'
  size = int(call(path, fs.du, fs_path) if kind == 'directory' else
             entry.get('size') or 0)
  mtime = entry.get('LastModified') or entry.get('mtime') or entry.get(
      'updated') or entry.get('created')
  if hasattr(mtime, 'timestamp'):
    mtime = mtime.timestamp()
  elif not isinstance(mtime, (int, float)):
    mtime = None
  return {'type': kind, 'size': size, 'mtime': mtime}


def makedirs(path: str) -> None:
  """Creates ``path`` as a directory (on S3/GCS: nothing, or the bucket)."""
  local = local_file(path)
  if local is not None:
    with _CREATING_DIR:
      os.makedirs(local, exist_ok=True)
    return
  fs, fs_path = filesystem(path)
  call(path, fs.makedirs, fs_path, exist_ok=True)


def remove(path: str) -> None:
  """Removes the file ``path`` (FileNotFoundError if there is none)."""
  local = local_file(path)
  if local is not None:
    with _REMOVING:
      os.remove(local)
    return
  fs, fs_path = filesystem(path)
  call(path, fs.rm_file, fs_path)


def rmtree(path: str) -> None:
  """Removes ``path`` and everything under it (a file too); nothing there
  is not an error."""
  local = local_file(path)
  if local is not None:
    if os.path.isdir(local) and not os.path.islink(local):
      shutil.rmtree(local, ignore_errors=True)
    elif os.path.lexists(local):
      with _REMOVING:
        os.remove(local)
    return
  fs, fs_path = filesystem(path)
  try:
    call(path, fs.rm, fs_path, recursive=True)
  except FileNotFoundError:
    pass


def read_bytes(path: str, limit: int | None = None) -> bytes:
  """The file's bytes (at most ``limit`` of them)."""
  local = local_file(path)
  if local is not None:
    with _READING, open(local, 'rb') as f:
      return f.read() if limit is None else f.read(limit)
  fs, fs_path = filesystem(path)
  if limit is None:
    return call(path, fs.cat_file, fs_path)
  return call(path, fs.cat_file, fs_path, start=0, end=limit)


def read_text(path: str) -> str:
  """The file's text (UTF-8)."""
  return read_bytes(path).decode('utf-8')


def open_read(path: str):
  """A binary file object reading ``path`` (local: ``open(path, 'rb')``)."""
  local = local_file(path)
  if local is not None:
    with _READING:
      return open(local, 'rb')  # pylint: disable=consider-using-with
  fs, fs_path = filesystem(path)
  return call(path, fs.open, fs_path, 'rb')


def write_bytes(path: str, data: bytes) -> None:
  """Writes a small file that appears complete or not at all (locally a
  temporary file renamed into place; on S3/GCS one request)."""
  if _scheme(path) in _ATOMIC_UPLOAD:
    fs, fs_path = filesystem(path)
    call(path, fs.pipe_file, fs_path, bytes(data))
    return
  with Upload(path) as up:
    up.write(data)


def write_text(path: str, text: str) -> None:
  """:func:`write_bytes` of ``text`` in UTF-8."""
  write_bytes(path, text.encode('utf-8'))


def move(src: str, dst: str) -> None:
  """Renames ``src`` to ``dst`` (on object stores: copies, then deletes);
  locally the destination's folder is created."""
  local_src, local_dst = local_file(src), local_file(dst)
  if local_src is not None and local_dst is not None:
    parent = os.path.dirname(local_dst)
    if parent:
      with _CREATING_DIR:
        os.makedirs(parent, exist_ok=True)
    with _RENAMING:
      os.rename(local_src, local_dst)
    return
  fs, src_path = filesystem(src)
  _, dst_path = filesystem(dst)
  recursive = call(src, fs.isdir, src_path)
  call(dst, fs.mv, src_path, dst_path, recursive=recursive)


class _S3MultipartUpload:
  """An S3 multipart upload with parts sent by a few threads at once.

  The object appears when :meth:`commit` completes the upload (one
  ``put_object`` if it fits in a single block); :meth:`abort` aborts it.
  """

  def __init__(self, fs, path: str, block: int, in_flight: int,
               url: str = ''):
    self.fs = fs
    self.url = url
    self.bucket, self.key, _ = fs.split_path(path)
    self.block = block
    self.buf = bytearray()
    self.upload_id = None
    self.futures = []
    self.pool = concurrent.futures.ThreadPoolExecutor(in_flight)
    self.slots = threading.BoundedSemaphore(in_flight)

  def _call(self, method, **kwargs):
    # each request alone is safe to repeat (a part, the whole object, the
    # completion with the parts' ETags)
    return call(self.url, self.fs.call_s3, method, Bucket=self.bucket,
                Key=self.key, **kwargs)

  def _upload_part(self, number: int, data: bytes) -> dict:
    try:
      out = self._call('upload_part', UploadId=self.upload_id,
                       PartNumber=number, Body=data)
      return {'PartNumber': number, 'ETag': out['ETag']}
    finally:
      self.slots.release()

  def _send(self) -> None:
    for future in self.futures:  # fail early: a part already failed
      if future.done() and future.exception() is not None:
        raise future.exception()
    if self.upload_id is None:
      self.upload_id = self._call('create_multipart_upload')['UploadId']
    data, self.buf = bytes(self.buf), bytearray()
    self.slots.acquire()  # at most in_flight parts in memory
    self.futures.append(self.pool.submit(
        self._upload_part, len(self.futures) + 1, data))

  def write(self, view: memoryview) -> None:
    pos = 0
    while pos < view.nbytes:
      take = min(self.block - len(self.buf), view.nbytes - pos)
      self.buf += view[pos:pos + take]
      pos += take
      if len(self.buf) >= self.block:
        self._send()

  def commit(self) -> None:
    try:
      if self.upload_id is None:
        self._call('put_object', Body=bytes(self.buf))
        return
      if self.buf:
        self._send()
      parts = [future.result() for future in self.futures]
      self._call('complete_multipart_upload', UploadId=self.upload_id,
                 MultipartUpload={'Parts': parts})
    finally:
      self.pool.shutdown(wait=True)
      self.fs.invalidate_cache()

  def abort(self) -> None:
    for future in self.futures:
      future.cancel()
    self.pool.shutdown(wait=True)
    if self.upload_id is not None:
      self._call('abort_multipart_upload', UploadId=self.upload_id)


class Upload:
  """Writes one object that appears under ``url`` only when committed.

  ``write`` takes bytes-like objects of any size and feeds the store in
  blocks of ``block_bytes`` (never copying a large buffer whole);
  ``commit`` completes the upload; ``abort`` (or an exception inside a
  ``with`` block) discards it and nothing appears. On S3 the blocks are the
  parts of a multipart upload, :data:`UPLOAD_PARTS_IN_FLIGHT` of them sent
  at once. A killed process leaves an S3 multipart upload that is never
  completed (the bucket's lifecycle rule for incomplete uploads removes its
  parts) or, on other stores, a hidden ``.<name>.part-<random>``
  temporary.
  """

  def __init__(self, url: str, block_bytes: int = UPLOAD_BLOCK_BYTES):
    self.url = url
    self.block = block_bytes
    self._tmp = None
    self._s3 = None
    self.done = False
    local = local_file(url)
    if local is not None:  # a hidden temporary, fsynced and renamed
      self.fs, self._path = None, local
      parent, name = os.path.split(os.path.abspath(local))
      with _CREATING_DIR:
        os.makedirs(parent, exist_ok=True)
      self._tmp = os.path.join(parent, f'.{name}.part-{secrets.token_hex(4)}')
      with _WRITING:
        self._file = open(self._tmp, 'xb')  # pylint: disable=consider-using-with
      return
    self.fs, path = filesystem(url)
    self._path = path
    if _scheme(url) in ('s3', 's3a') and hasattr(self.fs, 'call_s3'):
      self._s3 = _S3MultipartUpload(self.fs, path, block_bytes,
                                    UPLOAD_PARTS_IN_FLIGHT, url)
      return
    if _scheme(url) not in _ATOMIC_UPLOAD:
      parent, _, name = path.rpartition('/')
      self._tmp = f'{parent}/.{name}.part-{secrets.token_hex(4)}'
    call(url, self.fs.makedirs, self.fs._parent(path), exist_ok=True)  # pylint: disable=protected-access
    self._file = call(url, self.fs.open, self._tmp or self._path, 'wb',
                       block_size=block_bytes)

  def write(self, data) -> None:
    view = memoryview(data).cast('B')
    if self._s3 is not None:
      self._s3.write(view)
      return
    with _WRITING:
      for start in range(0, view.nbytes, self.block):
        _call_once(self.url, self._file.write, view[start:start + self.block])

  def commit(self) -> None:
    self.done = True
    if self._s3 is not None:
      self._s3.commit()
      return
    if self.fs is None:
      with _WRITING:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
      with _RENAMING:
        os.replace(self._tmp, self._path)
      return
    _call_once(self.url, self._file.close)
    if self._tmp is not None:
      call(self.url, self.fs.mv, self._tmp, self._path)

  def abort(self) -> None:
    if self.done:
      return
    self.done = True
    if self._s3 is not None:
      self._s3.abort()
      return
    if self.fs is None:
      self._file.close()
      try:
        os.remove(self._tmp)
      except OSError:
        pass
      return
    try:
      discard = getattr(self._file, 'discard', None)
      if discard is not None:
        discard()
    finally:
      try:
        self._file.closed = True  # never committed by close() or __del__
      except AttributeError:
        pass
      if self._tmp is not None:
        try:
          self.fs.rm_file(self._tmp)
        except OSError:
          pass

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *unused):
    if exc_type is None:
      self.commit()
    else:
      self.abort()


def download(url: str, local: str) -> None:
  """Copies the file ``url`` (a URL or local path) to the local file
  ``local``."""
  source = local_file(url)
  if source is not None:
    with _COPYING:
      shutil.copyfile(source, local)
    return
  fs, path = filesystem(url)
  call(url, fs.get_file, path, local)


def upload_file(local: str, url: str) -> None:
  """Copies the local file ``local`` to ``url`` (appears when complete)."""
  if local_file(url) is not None:
    with open(local, 'rb') as f, Upload(url) as up:
      shutil.copyfileobj(f, up)
    return
  fs, path = filesystem(url)
  call(url, fs.put_file, local, path)


def upload_tree(local: str, url: str) -> None:
  """Copies the local folder ``local`` under ``url`` (each file appears
  when complete); nothing to do when ``url`` is ``local`` itself."""
  target = local_file(url)
  if target is not None and os.path.abspath(target) == os.path.abspath(
      local):
    return
  for root, _, names in os.walk(local):
    rel = os.path.relpath(root, local)
    for name in names:
      parts = [] if rel == '.' else rel.split(os.sep)
      upload_file(os.path.join(root, name), join(url, *parts, name))


@contextlib.contextmanager
def staged_download(url: str) -> Iterator[str]:
  """A local file holding ``url``'s bytes: a local path itself; an object
  downloaded to a temporary copy, removed afterwards."""
  local = local_file(url)
  if local is not None:
    yield local
    return
  staging = tempfile.mkdtemp(prefix='gintrain-stage-')
  try:
    local = os.path.join(staging, url.rstrip('/').rsplit('/', 1)[-1] or 'x')
    download(url, local)
    yield local
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def tensorstore_kvstore_spec(url: str) -> dict[str, Any]:
  """A tensorstore kvstore spec for ``url`` (``s3://``, ``gs://``, local).

  tensorstore ignores ``AWS_ENDPOINT_URL``, so the S3 endpoint is put into
  the spec from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (absent:
  AWS itself), the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and
  credentials are tensorstore's ``environment`` provider (the usual
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables; never put in
  the spec). GCS uses tensorstore's own credential search
  (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata server).

  >>> tensorstore_kvstore_spec('gs://b/run/ck_5_gda')
  {'driver': 'gcs', 'bucket': 'b', 'path': 'run/ck_5_gda/'}

  Raises:
    StorageError: a scheme tensorstore has no kvstore for.
  """
  scheme = _scheme(url)
  if scheme is None or scheme == 'file':
    return {'driver': 'file', 'path': local_path(url)}
  rest = _URL_RE.match(url).group('rest')
  bucket, _, path = rest.partition('/')
  path = path.strip('/')
  path = path + '/' if path else ''
  if scheme in ('gs', 'gcs'):
    return {'driver': 'gcs', 'bucket': bucket, 'path': path}
  if scheme in ('s3', 's3a'):
    spec = {'driver': 's3', 'bucket': bucket, 'path': path,
            'aws_credentials': {'type': 'environment'}}
    endpoint = (os.environ.get('AWS_ENDPOINT_URL_S3') or
                os.environ.get('AWS_ENDPOINT_URL'))
    if endpoint:
      spec['endpoint'] = endpoint
    region = (os.environ.get('AWS_REGION') or
              os.environ.get('AWS_DEFAULT_REGION'))
    if region:
      spec['aws_region'] = region
    elif endpoint:
      spec['aws_region'] = 'us-east-1'  # any region for S3-compatible stores
    return spec
  if scheme == 'memory':
    return {'driver': 'memory', 'path': path}
  raise StorageError(url, f'tensorstore has no kvstore for {scheme}://')
