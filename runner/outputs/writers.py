"""Metric writers: one small interface, one class per back end.

    >>> import json, os, tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> with JsonlWriter(workdir) as writer:
    ...   writer.write_scalars(10, {'loss': np.float32(0.5)})
    ...   writer.write_scalars(10, {'loss': 0.7, 'accuracy': 0.8}, split='eval')
    >>> with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    ...   for line in f:
    ...     record = json.loads(line)
    ...     print(record.pop('time') > 0, record)
    True {'step': 10, 'split': 'train', 'loss': 0.5}
    True {'step': 10, 'split': 'eval', 'loss': 0.7, 'accuracy': 0.8}

:class:`MetricWriter` is the interface. Its public methods check their input
(see :meth:`MetricWriter.write_scalars`) and then call the protected
``_write_scalars`` / ``_write_hparams`` / ``_flush`` / ``_close`` that a back
end implements, so a new back end is a few lines (only the first two are
required) and every back end rejects the same bad input with the same error::

    class ListWriter(MetricWriter):
      def __init__(self):
        self.rows = []
      def _write_scalars(self, step, scalars, split):
        self.rows.append((step, split, scalars))
      def _write_hparams(self, hparams, metrics):
        pass

Back ends (each takes the run directory ``workdir`` first):

* :class:`JsonlWriter`: ``metrics.jsonl``, one JSON object per
  ``write_scalars`` call, ``{"step": int, "split": str, "time": float,
  <name>: number, ...}`` (``time``: Unix wall time); appended to, so a
  resumed run continues the same file (steps may then repeat; readers keep
  the last value). A torn last line (a write cut short by a crash) is
  removed when the file is opened again (:func:`repair_torn_tail`).
  Non-finite floats are written as ``NaN`` / ``Infinity``, which Python's
  ``json`` reads back. ``hparams.json``: the last
  ``write_hparams`` dict.
* :class:`TensorBoardWriter`: event files (tensorboardX's protos, checksums
  by google-crc32c) in ``tensorboard/``; scalars are tagged
  ``<split>/<name>``; hparams use the TensorBoard HParams plugin format,
  with the given metric tags as the table's metric columns.
* :class:`WandbWriter`: a Weights & Biases run (``wandb/`` under ``workdir``;
  offline by default); needs ``pip install wandb``.

A ``workdir`` on an object store (``s3://bucket/run``, ``gs://...``; see
``lib.storage``), where objects cannot be appended to: the JSONL and
TensorBoard writers write a local copy in a temporary staging directory
(``metrics.jsonl`` first downloaded from the store when a run resumes) and
upload it whole, at most every :data:`UPLOAD_SECS` seconds on a write, and
on ``flush()`` and ``close()``; ``hparams.json`` is uploaded at once. A
killed run loses at most the last ``UPLOAD_SECS`` of records (a resumed run
writes the steps after its checkpoint again). The staging directory is
removed on ``close()``.

:class:`MultiWriter` fans calls out to several writers; :class:`NullWriter`
does nothing and is for processes other than 0, which should not write.
"""

import abc
import json
import numbers
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from gintrain.lib import storage
from gintrain.runner.outputs import workdir as workdir_lib

__all__ = ['MetricWriter', 'JsonlWriter', 'TensorBoardWriter', 'WandbWriter',
           'MultiWriter', 'NullWriter', 'OpenLater', 'to_json_scalar', 'METRICS_FILE',
           'HPARAMS_FILE', 'TENSORBOARD_DIR', 'repair_torn_tail']

METRICS_FILE = workdir_lib.METRICS_FILE
HPARAMS_FILE = workdir_lib.HPARAMS_FILE
TENSORBOARD_DIR = workdir_lib.TENSORBOARD_DIR
# Object-store workdirs: the staged files are uploaded this often on writes.
UPLOAD_SECS = 5.0

# A Python or numpy number, or a size-1 numpy/JAX array.
Scalar = Any
# What write_hparams hands to _write_hparams: JSON-ready values.
HParam = bool | int | float | str | None

_NAME_RE = re.compile(r'^[A-Za-z0-9_.\-/]+$')
_RESERVED = ('step', 'split', 'time')
# Metric names that passed the check (a run writes the same few names at
# every log step); bounded, in case a program makes names without end.
_GOOD_NAMES: set = set()
_GOOD_NAMES_MAX = 4096


def to_json_scalar(value: Any, name: str = 'value') -> bool | int | float:
  """A Python ``bool``/``int``/``float`` for a number of any numeric type.

  Accepts Python numbers, numpy scalars and size-1 numpy/JAX arrays (the
  latter are copied to host).

  Raises:
    ValueError: naming ``name``, when ``value`` is not a single number.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if hasattr(value, 'shape') and hasattr(value, 'dtype'):
    arr = np.asarray(value)
    if arr.size == 1 and arr.dtype.kind in 'biuf':
      return to_json_scalar(arr.reshape(()).item(), name)
  raise ValueError(f'Metric {name!r} must be a single number, got'
                   f' {type(value).__name__} {_short_repr(value)}.')


def _short_repr(value):
  text = ' '.join(repr(value).split())  # keeps the error on one line
  return text if len(text) <= 80 else text[:77] + '...'


# --- Input checks, shared by every writer -----------------------------------


def _check_scalars(step, scalars, split):
  """``(step, {name: number}, split)`` checked and converted (see below)."""
  try:
    step_value = to_json_scalar(step, 'step')
  except ValueError:
    step_value = None
  if (not isinstance(step_value, int) or isinstance(step_value, bool)
      or step_value < 0):
    raise ValueError(f'step must be a non-negative integer, got'
                     f' {_short_repr(step)}.')
  if not isinstance(split, str) or not _NAME_RE.match(split):
    raise ValueError(f'split must be a name like "train" or "eval", got'
                     f' {_short_repr(split)}.')
  if not isinstance(scalars, Mapping):
    raise ValueError('scalars must be a mapping of name -> number, got'
                     f' {type(scalars).__name__}.')
  clean = {}
  for name, value in scalars.items():
    if type(name) is not str or name not in _GOOD_NAMES:
      _check_name(name)
    kind = type(value)
    # Plain floats and ints (most values) as they are; the rest converted.
    clean[name] = (value if kind is float or kind is int else
                   to_json_scalar(value, name))
  return step_value, clean, split


def _check_name(name) -> None:
  """Raises ValueError unless ``name`` is a metric name (then remembered
  in ``_GOOD_NAMES`` while that is not full)."""
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise ValueError(f'Metric name {_short_repr(name)} must be a non-empty'
                     ' string of letters, digits and _.-/')
  if name in _RESERVED:
    raise ValueError(f'Metric name {name!r} is reserved'
                     f' ({", ".join(_RESERVED)}); rename it.')
  if type(name) is str and len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
    _GOOD_NAMES.add(name)


def _hparam_value(name, value):
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return str(tuple(value)) if isinstance(value, tuple) else str(value)
  if isinstance(value, Mapping):
    raise ValueError(f'hparam {name!r} is a mapping; flatten it to keys like'
                     f' "{name}.<key>" first.')
  if callable(value):
    return getattr(value, '__name__', repr(value))
  try:
    return to_json_scalar(value, name)
  except ValueError:
    raise ValueError(
        f'hparam {name!r} must be a number, bool, string, None, list, tuple'
        f' or callable, got {type(value).__name__} {_short_repr(value)}.'
    ) from None


def _check_hparams(hparams, metrics):
  """``({name: HParam}, metric tags)`` checked and converted."""
  if not isinstance(hparams, Mapping):
    raise ValueError('hparams must be a mapping of name -> value, got'
                     f' {type(hparams).__name__}.')
  clean = {}
  for name, value in hparams.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f'hparam name {_short_repr(name)} must be a non-empty'
                       ' string.')
    clean[name] = _hparam_value(name, value)
  if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Sequence):
    raise ValueError('metrics must be a sequence of metric tags like'
                     f' "eval/accuracy", got {_short_repr(metrics)}.')
  for tag in metrics:
    if not isinstance(tag, str) or not _NAME_RE.match(tag):
      raise ValueError(f'Metric tag {_short_repr(tag)} must be a non-empty'
                       ' string of letters, digits and _.-/, like'
                       ' "eval/accuracy".')
  return clean, tuple(dict.fromkeys(metrics))  # no duplicates, same order


# --- The interface -----------------------------------------------------------


class MetricWriter(abc.ABC):
  """Writes the scalar metrics and hyperparameters of a run.

  Subclasses implement ``_write_scalars`` and ``_write_hparams`` (and
  ``_flush`` / ``_close`` when they hold resources); they receive input that
  the public methods have already checked and converted to plain Python
  values. ``close()`` is idempotent; writing after it raises
  ``RuntimeError``; ``flush()`` after it does nothing. Usable as a context
  manager (closes on exit).
  """

  _closed = False  # a class default, so subclasses need no super().__init__

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar],
                    split: str = 'train') -> None:
    """Records ``scalars`` (name -> number) at ``step`` for ``split``.

    Args:
      step: the training step, a non-negative integer (any integer type).
      scalars: metric name -> a single number: a Python or numpy number or
        a size-1 numpy/JAX array.
      split: what the metrics are about, e.g. ``'train'`` or ``'eval'``.

    Raises:
      ValueError: a bad ``step`` or ``split``, a name that is empty, reserved
        (``step``/``split``/``time``) or has characters outside
        ``[A-Za-z0-9_.-/]``, or a value that is not a single number. Nothing
        is written then.
      RuntimeError: the writer is closed.
    """
    self._check_open()
    self._write_scalars(*_check_scalars(step, scalars, split))

  def write_hparams(self, hparams: Mapping[str, Any],
                    metrics: Sequence[str] = ()) -> None:
    """Records the run's hyperparameters (a flat name -> value mapping).

    Args:
      hparams: values may be numbers (Python, numpy or size-1 arrays),
        bools, strings or ``None``; lists/tuples and callables (by name) are
        stored as strings.
      metrics: the metric tags, ``<split>/<name>`` (e.g.
        ``'eval/accuracy'``), that a hyperparameter table (TensorBoard's
        HParams dashboard) should show next to the hyperparameters.

    Raises:
      ValueError: naming the key, for a nested mapping or another value, or
        a metric tag that is not a name.
      RuntimeError: the writer is closed.
    """
    self._check_open()
    self._write_hparams(*_check_hparams(hparams, metrics))

  def flush(self) -> None:
    """Pushes everything written so far to its destination."""
    if not self._closed:
      self._flush()

  def close(self) -> None:
    """Flushes and releases the writer; later calls do nothing."""
    if self._closed:
      return
    self._closed = True
    self._close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __repr__(self):
    workdir = getattr(self, 'workdir', None)
    return f'{type(self).__name__}({"" if workdir is None else repr(workdir)})'

  def _check_open(self):
    if self._closed:
      raise RuntimeError(f'{self!r} is closed; it cannot write any more.')

  def _write_checked(self, step: int, scalars: dict, split: str) -> None:
    """``write_scalars`` of input that a combinator has checked already:
    not checked again, unless this class overrides ``write_scalars``."""
    if type(self).write_scalars is not MetricWriter.write_scalars:
      self.write_scalars(step, scalars, split)
    else:
      self._check_open()
      self._write_scalars(step, dict(scalars), split)

  # --- What a back end implements. ---

  @abc.abstractmethod
  def _write_scalars(self, step: int, scalars: dict[str, bool | int | float],
                     split: str) -> None:
    """Writes checked scalars (plain Python numbers; names are not reserved)."""

  @abc.abstractmethod
  def _write_hparams(self, hparams: dict[str, HParam],
                     metrics: tuple[str, ...]) -> None:
    """Writes checked hparams (JSON-ready values) and metric tags."""

  def _flush(self) -> None:
    """Pushes buffered writes out; called only while open."""

  def _close(self) -> None:
    """Flushes and releases resources; called once, by the first close()."""


# --- Torn tails ---------------------------------------------------------------


def _is_record(data: bytes) -> bool:
  """Whether ``data`` is one complete metrics record (a JSON object with an
  integer ``step`` and a string ``split``)."""
  try:
    record = json.loads(data.decode('utf-8'))
  except ValueError:  # bad UTF-8 or JSON
    return False
  return (isinstance(record, dict) and isinstance(record.get('step'), int)
          and not isinstance(record.get('step'), bool)
          and isinstance(record.get('split'), str))


def repair_torn_tail(path: str | os.PathLike) -> str | None:
  """Makes the JSONL file ``path`` end with a complete line, in place.

  A last line without its newline is a write cut short (a crash, a full
  disk): it is truncated away, unless it is a complete record, which gets
  its newline. A missing or empty file is left alone.

  Returns:
    ``'truncated'``, ``'terminated'`` or None (nothing to do).

  Raises:
    OSError: naming ``path``, when it cannot be read or written.
  """
  path = os.fspath(path)
  try:
    fd = os.open(path, os.O_RDWR)
  except FileNotFoundError:
    return None
  try:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b'\n':
      return None
    start, pos = 0, size  # start: where the last (torn) line begins
    while pos > 0:
      n = min(1 << 16, pos)
      pos -= n
      newline = os.pread(fd, n, pos).rfind(b'\n')
      if newline >= 0:
        start = pos + newline + 1
        break
    if _is_record(os.pread(fd, size - start, start)):
      os.pwrite(fd, b'\n', size)
      action = 'terminated'
    else:
      os.ftruncate(fd, start)
      action = 'truncated'
      logging.warning('%s: removed a torn last line (%d bytes without a'
                      ' newline, left by an interrupted write).', path,
                      size - start)
    os.fsync(fd)
    return action
  finally:
    os.close(fd)


# --- Object-store staging ----------------------------------------------------


class _Staged:
  """A local staging copy of the object ``url``, uploaded whole."""

  def __init__(self, url: str, download: bool, staging_dir=None,
               local_path=None):
    self.url = url
    self.dir = staging_dir or tempfile.mkdtemp(prefix='gintrain-stage-')
    self.path = local_path or os.path.join(
        self.dir, url.rstrip('/').rsplit('/', 1)[-1])
    self.last_upload = time.monotonic()
    if download and storage.exists(url):
      storage.download(url, self.path)

  def upload(self, force: bool = True) -> None:
    if not force and time.monotonic() - self.last_upload < UPLOAD_SECS:
      return
    if os.path.exists(self.path):
      storage.upload_file(self.path, self.url)
    self.last_upload = time.monotonic()

  def remove(self) -> None:
    shutil.rmtree(self.dir, ignore_errors=True)


# --- Back ends ---------------------------------------------------------------


class JsonlWriter(MetricWriter):
  """``metrics.jsonl`` and ``hparams.json`` under ``workdir`` (module doc).

  Args:
    workdir: the run directory; created if missing.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = storage.check(os.fspath(workdir))
    self._staged = None
    local = storage.local_file(self.metrics_path)
    if local is None:  # objects cannot be appended to: a staged copy
      self._staged = _Staged(self.metrics_path, download=True)
      local = self._staged.path
    else:
      os.makedirs(self.workdir, exist_ok=True)
    # A crash (or a full disk) may have cut the last record short: repair
    # the tail so that appended records start on a line of their own.
    repair_torn_tail(local)
    # Line-buffered: every record reaches the OS as it is written, so a crash
    # loses at most a torn last line (which plots.read_metrics skips, and
    # the next JsonlWriter on the file truncates).
    self._file = open(local, 'a', buffering=1, encoding='utf-8')

  @property
  def metrics_path(self) -> str:
    return storage.join(self.workdir, METRICS_FILE)

  def _write_scalars(self, step, scalars, split):
    record = {'step': step, 'split': split, 'time': time.time(), **scalars}
    self._file.write(json.dumps(record) + '\n')
    if self._staged is not None:
      self._staged.upload(force=False)

  def _write_hparams(self, hparams, metrics):
    del metrics  # hparams.json holds the hyperparameters only
    storage.write_text(storage.join(self.workdir, HPARAMS_FILE),
                       json.dumps(hparams, indent=2, sort_keys=True) + '\n')

  def _flush(self):
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._staged is not None:
      self._staged.upload()

  def _close(self):
    try:
      self._flush()
    finally:
      self._file.close()
      if self._staged is not None:
        self._staged.remove()


_HPARAMS_PLUGIN = 'hparams'
_EXPERIMENT_TAG = '_hparams_/experiment'
_SESSION_START_TAG = '_hparams_/session_start_info'


def _import_tensorboardx() -> None:
  """Imports tensorboardX without torch or boto3: its package ``__init__``
  imports torch when it is installed (over a second, for a ``torch.Tensor``
  alias this writer never uses) and boto3 (0.2-0.9 s, for its own S3
  writer; this writer stages event files and uploads through lib.storage).
  A program that imported either itself keeps it."""
  if 'tensorboardX' in sys.modules:
    return
  hidden = [name for name in ('torch', 'boto3') if name not in sys.modules]
  for name in hidden:
    sys.modules[name] = None  # `import <name>` raises ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    for name in hidden:
      if sys.modules.get(name, 0) is None:
        del sys.modules[name]


def _crc32c_function() -> Callable[[bytes], int]:
  """CRC-32C of bytes: google-crc32c's C code (a dependency), else
  tensorboardX's (pure Python: about 0.3 ms for a record of 800 bytes)."""
  try:
    import google_crc32c  # pylint: disable=g-import-not-at-top
    if google_crc32c.implementation == 'c':
      return google_crc32c.value
  except ImportError:
    pass
  _import_tensorboardx()
  from tensorboardX import crc32c  # pylint: disable=g-import-not-at-top
  return crc32c.crc32c


_PACK_LENGTH = struct.Struct('<Q').pack
_PACK_CRC = struct.Struct('<I').pack
_PACK_FLOAT = struct.Struct('<f').pack
_PACK_DOUBLE = struct.Struct('<d').pack
# (split, name) -> the serialized start of its Summary.Value, up to the
# float (bounded like _GOOD_NAMES).
_VALUE_HEADS: dict = {}


def _varint(n: int) -> bytes:
  """Protobuf's varint of a non-negative integer."""
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _scalars_event(wall_time: float, step: int, split: str,
                   scalars: dict) -> bytes:
  """The serialized ``Event(wall_time=, step=, summary=Summary(value=[
  Value(tag='<split>/<name>', simple_value=value), ...]))``, byte for byte
  what protobuf writes (fields in number order; ``step`` 0 left out, as
  proto3 does), encoded here: a third of the cost of building the messages.

  Raises:
    OverflowError: a value beyond float32's range (the caller then builds
      the messages, which store it as an infinity).
  """
  parts = []
  for name, value in scalars.items():
    head = _VALUE_HEADS.get((split, name))
    if head is None:
      tag = f'{split}/{name}'.encode()
      # Value: tag (field 1, bytes), simple_value (field 2, fixed32).
      value_head = b'\x0a' + _varint(len(tag)) + tag + b'\x15'
      # Summary.value (field 1): its length, then the Value.
      head = b'\x0a' + _varint(len(value_head) + 4) + value_head
      if len(_VALUE_HEADS) < _GOOD_NAMES_MAX:
        _VALUE_HEADS[(split, name)] = head
    parts.append(head)
    parts.append(_PACK_FLOAT(value))
  summary = b''.join(parts)
  # Event: wall_time (field 1, fixed64), step (field 2, varint), summary
  # (field 5, bytes).
  return b''.join((b'\x09', _PACK_DOUBLE(wall_time),
                   b'\x10' + _varint(step) if step else b'',
                   b'\x2a', _varint(len(summary)), summary))


class _EventFile:
  """An event file: TFRecord framing of serialized ``Event`` protos, as
  TensorBoard reads it: per record the length (8 bytes, little-endian),
  its masked CRC-32C, the data and the data's masked CRC-32C (4 bytes
  each). Each record is one ``write`` call; written synchronously
  (tensorboardX's own writers go through a queue and a thread, or
  checksum in Python).

  Args:
    prefix: the file's path up to ``.out.tfevents.<time>.<host>``.
    suffix: appended to the name (keeps quickly restarted runs apart).
  """

  _CRC = None  # the CRC-32C function, looked up once

  def __init__(self, prefix: str, suffix: str = ''):
    # pylint: disable-next=g-import-not-at-top
    from tensorboardX.proto import event_pb2
    if _EventFile._CRC is None:
      _EventFile._CRC = _crc32c_function()
    self._crc = _EventFile._CRC
    self._event_cls = event_pb2.Event
    now = time.time()
    self.path = (f'{prefix}.out.tfevents.{int(now):010d}.'
                 f'{socket.gethostname()}{suffix}')
    self._file = open(self.path, 'wb')  # pylint: disable=consider-using-with
    self.write(self._event_cls(wall_time=now, file_version='brain.Event:2'))

  def _masked(self, data: bytes) -> int:
    crc = self._crc(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  def write(self, event) -> None:
    """Appends the ``Event`` proto ``event``."""
    self.write_serialized(event.SerializeToString())

  def write_serialized(self, data: bytes) -> None:
    """Appends a serialized ``Event``."""
    header = _PACK_LENGTH(len(data))
    self._file.write(b''.join((header, _PACK_CRC(self._masked(header)), data,
                               _PACK_CRC(self._masked(data)))))

  def event(self, **fields):
    """An ``Event`` proto with ``fields``."""
    return self._event_cls(**fields)

  def flush(self) -> None:
    """Pushes the written records to the disk (and fsyncs)."""
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._file.close()


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files in ``<workdir>/tensorboard/`` (tensorboardX's
  protos, written by :class:`_EventFile`).

  Scalars are tagged ``<split>/<name>``, one event per ``write_scalars``
  call. ``write_hparams`` writes the HParams plugin's experiment (listing
  the hyperparameters and the given metric tags) and session-start
  summaries; the HParams dashboard then shows each metric's last value.
  No session-end summary is written, so the session status stays unknown.

  Events are written synchronously and reach the disk on ``flush()``,
  ``close()`` and, for a live TensorBoard, on the first write after
  ``FLUSH_SECS`` seconds without a flush.

  Args:
    workdir: the run directory; created if missing.
  """

  FLUSH_SECS = 60.0

  def __init__(self, workdir: str | os.PathLike):
    _import_tensorboardx()
    self.workdir = storage.check(os.fspath(workdir))
    self._staged = None
    staged = storage.local_file(self.workdir) is None
    if staged:
      # Staged locally (event files are appended to; objects cannot be),
      # uploaded whole on flush and close (module doc).
      self._stage_dir = tempfile.mkdtemp(prefix='gintrain-stage-')
      logdir = self._stage_dir
    else:
      logdir = os.path.join(self.workdir, TENSORBOARD_DIR)
      os.makedirs(logdir, exist_ok=True)
    # Event files are named by the second and host (as TensorBoard's own
    # writers name them) and opened with 'wb': a unique suffix keeps a
    # quickly restarted run (or a second writer) from truncating the
    # previous file.
    suffix = f'.{os.getpid()}.{uuid.uuid4().hex[:8]}'
    # Written synchronously (tensorboardX's FileWriter queues events for a
    # thread, so its flush() does not mean "on disk"); flushed by flush(),
    # close() and, for live viewing, every FLUSH_SECS on a write.
    self._events = _EventFile(os.path.join(logdir, 'events'), suffix)
    # pylint: disable-next=g-import-not-at-top
    from tensorboardX.proto import summary_pb2
    self._summary = summary_pb2.Summary
    self._last_flush = time.monotonic()
    if staged:
      name = os.path.basename(self._events.path)
      self._staged = _Staged(
          storage.join(self.workdir, TENSORBOARD_DIR, name), download=False,
          staging_dir=self._stage_dir, local_path=self._events.path)

  def _add(self, summary, step=0):
    self._events.write(
        self._events.event(wall_time=time.time(), step=step, summary=summary))
    self._after_write()

  def _after_write(self):
    if time.monotonic() - self._last_flush > self.FLUSH_SECS:
      self._flush()
    elif self._staged is not None and (
        time.monotonic() - self._staged.last_upload > UPLOAD_SECS):
      self._flush()

  def _write_scalars(self, step, scalars, split):
    if not scalars:
      return
    # One Summary event holding every scalar of this call (an event per
    # scalar costs more than the training step of a small model), encoded
    # by hand (_scalars_event).
    try:
      data = _scalars_event(time.time(), step, split, scalars)
    except OverflowError:  # beyond float32: stored as an infinity
      summary = self._summary()
      add = summary.value.add
      for name, value in scalars.items():
        add(tag=f'{split}/{name}', simple_value=float(value))
      self._add(summary, step)
      return
    self._events.write_serialized(data)
    self._after_write()

  def _write_hparams(self, hparams, metrics):
    # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import api_pb2
    from tensorboardX.proto import plugin_hparams_pb2
    from tensorboardX.proto import summary_pb2
    # pylint: enable=g-import-not-at-top
    now = time.time()
    start = plugin_hparams_pb2.SessionStartInfo(start_time_secs=now)
    infos = []
    for name, value in hparams.items():
      if value is None:
        continue
      if isinstance(value, bool):
        start.hparams[name].bool_value = value
        kind = api_pb2.DATA_TYPE_BOOL
      elif isinstance(value, str):
        start.hparams[name].string_value = value
        kind = api_pb2.DATA_TYPE_STRING
      else:
        start.hparams[name].number_value = float(value)
        kind = api_pb2.DATA_TYPE_FLOAT64
      infos.append(api_pb2.HParamInfo(name=name, type=kind))
    experiment = api_pb2.Experiment(
        time_created_secs=now, hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag),
                                         display_name=tag)
                      for tag in metrics])
    for tag, data in (
        (_EXPERIMENT_TAG,
         plugin_hparams_pb2.HParamsPluginData(version=0,
                                              experiment=experiment)),
        (_SESSION_START_TAG,
         plugin_hparams_pb2.HParamsPluginData(version=0,
                                              session_start_info=start))):
      metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(
              plugin_name=_HPARAMS_PLUGIN, content=data.SerializeToString()))
      self._add(summary_pb2.Summary(
          value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata)]))

  def _flush(self):
    self._events.flush()  # and fsync
    self._last_flush = time.monotonic()
    if self._staged is not None:
      self._staged.upload()

  def _close(self):
    self._events.close()
    if self._staged is not None:
      try:
        self._staged.upload()
      finally:
        self._staged.remove()


class WandbWriter(MetricWriter):
  """A Weights & Biases run; its files go to ``<workdir>/wandb/``.

  Scalars are logged as ``<split>/<name>`` against a ``step`` metric (so
  ``train`` and ``eval`` records of any step order are all kept); hparams go
  to the run config. W&B lists every logged metric in its runs table, so
  ``write_hparams``'s ``metrics`` needs no action here.

  Args:
    workdir: the run directory; created if missing.
    project: the W&B project.
    name: the run's display name (W&B picks one if ``None``).
    mode: ``'offline'`` (the default: nothing leaves the machine; upload
      later with ``wandb sync``), ``'online'`` or ``'disabled'``.
    config: initial run config (e.g. the gin bindings).
    **init_kwargs: more ``wandb.init`` arguments. Without an ``id``, the
      run's id is kept in ``<workdir>/wandb/run_id`` and passed with
      ``resume='allow'``: a restarted run (preemption, requeue, crash)
      continues the same W&B run.

  Raises:
    ImportError: wandb is not installed.
  """

  def __init__(self, workdir: str | os.PathLike, project: str = 'gintrain',
               name: str | None = None, mode: str = 'offline',
               config: Mapping[str, Any] | None = None, **init_kwargs):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError('WandbWriter needs the wandb package; install it with'
                        ' `pip install wandb`.') from None
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    kwargs = {'reinit': 'create_new', **init_kwargs}  # one run per writer
    if 'id' not in kwargs:  # restarts continue the same W&B run
      kwargs.update(id=_wandb_run_id(self.workdir), resume='allow')
    self.run = wandb.init(project=project, name=name, mode=mode,
                          dir=self.workdir,
                          config=None if config is None else dict(config),
                          **kwargs)
    self.run.define_metric('step')
    self.run.define_metric('*', step_metric='step')

  def _write_scalars(self, step, scalars, split):
    data = {f'{split}/{name}': value for name, value in scalars.items()}
    self.run.log({'step': step, **data})

  def _write_hparams(self, hparams, metrics):
    del metrics  # see the class doc
    self.run.config.update(hparams, allow_val_change=True)

  def _close(self):
    self.run.finish()


def _wandb_run_id(workdir: str) -> str:
  """The W&B run id kept in ``<workdir>/wandb/run_id`` (made once)."""
  path = os.path.join(workdir, 'wandb', 'run_id')
  try:
    with open(path, encoding='utf-8') as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  except FileNotFoundError:
    pass
  run_id = uuid.uuid4().hex[:16]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(run_id + '\n')
  os.replace(path + '.tmp', path)
  return run_id


# --- Combinators -------------------------------------------------------------


class MultiWriter(MetricWriter):
  """Sends every call to each of ``writers``, in order.

  Input is checked once, before any writer is called, so bad input reaches
  none of them. Every call reaches every writer even if one raises; the
  first error is re-raised afterwards. ``close()`` closes them all.

  Args:
    writers: the writers to fan out to.

  Raises:
    TypeError: an element of ``writers`` is not a ``MetricWriter``.
  """

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = tuple(writers)
    for i, writer in enumerate(self.writers):
      if not isinstance(writer, MetricWriter):
        raise TypeError(f'MultiWriter: writers[{i}] is a'
                        f' {type(writer).__name__}, not a MetricWriter.')

  def __repr__(self):
    return f'MultiWriter([{", ".join(map(repr, self.writers))}])'

  def _each(self, call: Callable[[MetricWriter], None]) -> None:
    first_error = None
    for writer in self.writers:
      try:
        call(writer)
      except Exception as e:  # pylint: disable=broad-except
        if first_error is None:
          first_error = e
    if first_error is not None:
      raise first_error

  def _write_scalars(self, step, scalars, split):
    # _each's loop without its closure: this runs at every log step.
    first_error = None
    for writer in self.writers:
      try:
        # pylint: disable-next=protected-access
        writer._write_checked(step, scalars, split)
      except Exception as e:  # pylint: disable=broad-except
        if first_error is None:
          first_error = e
    if first_error is not None:
      raise first_error

  def _write_hparams(self, hparams, metrics):
    self._each(lambda w: w.write_hparams(hparams, metrics))

  def _flush(self):
    self._each(lambda w: w.flush())

  def _close(self):
    self._each(lambda w: w.close())


class NullWriter(MetricWriter):
  """Writes nothing and checks nothing: for processes other than 0."""

  def write_scalars(self, step, scalars, split='train'):
    del step, scalars, split

  def write_hparams(self, hparams, metrics=()):
    del hparams, metrics

  def _write_scalars(self, step, scalars, split):
    del step, scalars, split

  def _write_hparams(self, hparams, metrics):
    del hparams, metrics


class OpenLater(MetricWriter):
  """The writer ``factory()`` makes, made at :meth:`open` or at the first
  write: until then nothing is created (a run whose resume is refused
  leaves no file behind).

  Args:
    factory: ``() -> MetricWriter``.
  """

  def __init__(self, factory: Callable[[], MetricWriter]):
    self.factory = factory
    self.writer: MetricWriter | None = None

  def __repr__(self):
    return f'OpenLater({self.writer!r})'

  def open(self) -> MetricWriter:
    """Makes the writer (once); returns it."""
    if self.writer is None:
      self.writer = self.factory()
    return self.writer

  def _write_scalars(self, step, scalars, split):
    # pylint: disable-next=protected-access
    self.open()._write_checked(step, scalars, split)

  def _write_hparams(self, hparams, metrics):
    self.open().write_hparams(hparams, metrics)

  def _flush(self):
    if self.writer is not None:
      self.writer.flush()

  def _close(self):
    if self.writer is not None:
      self.writer.close()
