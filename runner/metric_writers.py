"""Scalar metrics to ``metrics.jsonl`` and TensorBoard event files.

    >>> import tempfile, json, os
    >>> workdir = tempfile.mkdtemp()
    >>> with MetricWriter(workdir) as writer:
    ...   writer.write_scalars(10, {'loss': np.float32(0.5)})
    ...   writer.write_scalars(10, {'loss': 0.7, 'accuracy': 0.8}, split='eval')
    >>> [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    [{'step': 10, 'split': 'train', 'loss': 0.5}, {'step': 10, 'split': 'eval', 'loss': 0.7, 'accuracy': 0.8}]

Layout under ``workdir``:

* ``metrics.jsonl``: one JSON object per ``write_scalars`` call,
  ``{"step": int, "split": str, <name>: number, ...}``; appended to, so a
  resumed run continues the same file (steps may then repeat; readers keep the
  last value). Non-finite floats are written as ``NaN`` / ``Infinity``, which
  Python's ``json`` reads back.
* ``hparams.json``: the last ``write_hparams`` dict.
* ``tensorboard/``: event files (tensorboardX); scalars are tagged
  ``<split>/<name>``; hparams use the TensorBoard HParams plugin format.

Only process 0 should write: other processes pass ``enabled=False``, which
makes every method a no-op that touches no file.
"""

import json
import numbers
import os
import re
import uuid
from typing import Any, Mapping

import numpy as np

__all__ = ['MetricWriter', 'METRICS_FILE', 'HPARAMS_FILE', 'TENSORBOARD_DIR',
           'to_json_scalar']

METRICS_FILE = 'metrics.jsonl'
HPARAMS_FILE = 'hparams.json'
TENSORBOARD_DIR = 'tensorboard'

_NAME_RE = re.compile(r'^[A-Za-z0-9_.\-/]+$')
_RESERVED = ('step', 'split')


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
      item = arr.reshape(()).item()
      return to_json_scalar(item, name)
  raise ValueError(f'Metric {name!r} must be a single number, got'
                   f' {type(value).__name__} {_short_repr(value)}.')


def _short_repr(value):
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + '...'


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
  return to_json_scalar(value, f'hparam {name}')


class MetricWriter:
  """Writes scalar metrics of a run under ``workdir`` (see module doc).

  Args:
    workdir: the run directory; created if missing.
    enabled: ``False`` makes every method a no-op (use on processes other
      than 0).

  Usable as a context manager (closes on exit). ``close()`` is idempotent;
  writing after it raises ``RuntimeError``.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = bool(enabled)
    self._closed = False
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    from tensorboardX import FileWriter  # pylint: disable=g-import-not-at-top
    # Line-buffered: every record reaches the OS as it is written, so a crash
    # loses at most a torn last line (which plots.read_metrics skips).
    self._jsonl = open(os.path.join(self.workdir, METRICS_FILE), 'a',
                       buffering=1, encoding='utf-8')
    # tensorboardX names files by the second and host only and opens them
    # with 'wb': a unique suffix keeps a quickly restarted run (or a second
    # writer) from truncating the previous file.
    suffix = f'.{os.getpid()}.{uuid.uuid4().hex[:8]}'
    self._tb = FileWriter(os.path.join(self.workdir, TENSORBOARD_DIR),
                          filename_suffix=suffix)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, METRICS_FILE)

  def _check_open(self):
    if self._closed:
      raise RuntimeError(f'MetricWriter for {self.workdir!r} is closed.')

  def write_scalars(self, step: int, scalars: Mapping[str, Any],
                    split: str = 'train') -> None:
    """Records ``scalars`` (name -> number) at ``step`` for ``split``.

    Raises:
      ValueError: a bad ``step`` or ``split``, a name that is empty, reserved
        (``step``/``split``) or has characters outside ``[A-Za-z0-9_.-/]``, or
        a value that is not a single number. Nothing is written then.
    """
    if not self.enabled:
      return
    self._check_open()
    try:
      step_value = to_json_scalar(step, 'step')
    except ValueError:
      step_value = None
    if not isinstance(step_value, int) or isinstance(step_value, bool) or (
        step_value < 0):
      raise ValueError(f'step must be a non-negative integer, got {step!r}.')
    if not isinstance(split, str) or not _NAME_RE.match(split):
      raise ValueError(f'split must be a name like "train" or "eval", got'
                       f' {split!r}.')
    if not isinstance(scalars, Mapping):
      raise ValueError(f'scalars must be a mapping of name -> number, got'
                       f' {type(scalars).__name__}.')
    record: dict[str, Any] = {'step': step_value, 'split': split}
    for name, value in scalars.items():
      if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f'Metric name {name!r} must be a non-empty string of'
                         ' letters, digits and _.-/')
      if name in _RESERVED:
        raise ValueError(f'Metric name {name!r} is reserved; rename it.')
      record[name] = to_json_scalar(value, name)
    self._jsonl.write(json.dumps(record) + '\n')
    # One Summary event holding every scalar of this call (a queue put per
    # scalar costs more than the training step of a small model).
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = [
        summary_pb2.Summary.Value(tag=f'{split}/{name}',
                                  simple_value=float(value))
        for name, value in record.items() if name not in _RESERVED
    ]
    if values:
      self._tb.add_summary(summary_pb2.Summary(value=values),
                           global_step=step_value)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyperparameters (a flat name -> value mapping).

    Values may be numbers (Python, numpy or size-1 arrays), bools, strings
    or ``None``; lists/tuples and callables are stored as strings.

    Raises:
      ValueError: naming the key, for a nested mapping or another value.
    """
    if not self.enabled:
      return
    self._check_open()
    if not isinstance(hparams, Mapping):
      raise ValueError('hparams must be a mapping of name -> value, got'
                       f' {type(hparams).__name__}.')
    clean = {}
    for name, value in hparams.items():
      if not isinstance(name, str) or not name:
        raise ValueError(f'hparam name {name!r} must be a non-empty string.')
      clean[name] = _hparam_value(name, value)
    path = os.path.join(self.workdir, HPARAMS_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(clean, f, indent=2, sort_keys=True)
      f.write('\n')
    os.replace(tmp, path)
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    tb_values = {k: v for k, v in clean.items() if v is not None}
    for proto in summary.hparams(tb_values, {}):
      self._tb.add_summary(proto)

  def flush(self) -> None:
    """Pushes everything written so far to disk."""
    if not self.enabled or self._closed:
      return
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; later calls do nothing."""
    if not self.enabled or self._closed:
      return
    self.flush()
    self._closed = True
    self._jsonl.close()
    self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
