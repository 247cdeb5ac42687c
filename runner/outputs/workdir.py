"""The run directory: the names of what a run writes there, and its
preparation.

A workdir is a local folder or an object-store URL (``s3://bucket/run``;
``lib.storage`` takes both). What a run keeps in it, by name::

    config.parsed.gin     the gin config as parsed (written once the resume
                          check passed)
    flags.txt             the flags that differ from their defaults
    settings.json         the resolved settings, compared on resume
    config.operative.gin  the bindings used (after the first step)
    metrics.jsonl, hparams.json, tensorboard/, metrics.png
    checkpoints/, best_checkpoints/, corrupt_checkpoints/
    profile/, samples.txt
    .gintrain.lock        one runner per workdir (runner.outputs.lock)

:func:`resolve` names the workdir without touching it; :func:`prepare`
creates it and checks that it is writable (a probe file written and
removed: nothing is left). The trainer prepares it once, takes the lock,
checks that the run may resume there, and only then writes anything
(:func:`write_text` and the writers): a refused resume leaves every file as
it was.

    >>> resolve('s3://b/run/')
    's3://b/run'
    >>> path('s3://b/run', CHECKPOINT_DIR)
    's3://b/run/checkpoints'
"""

import os

from gintrain.lib import storage
from gintrain.runner import errors
from gintrain.runner.errors import RunnerError

__all__ = ['PARSED_CONFIG', 'OPERATIVE_CONFIG', 'FLAGS_FILE', 'SETTINGS_FILE',
           'METRICS_FILE', 'HPARAMS_FILE', 'TENSORBOARD_DIR', 'METRICS_PLOT',
           'CHECKPOINT_DIR', 'BEST_DIR', 'CORRUPT_DIR', 'PROFILE_DIR',
           'SAMPLES_FILE', 'resolve', 'prepare', 'path', 'write_text']

PARSED_CONFIG = 'config.parsed.gin'
OPERATIVE_CONFIG = 'config.operative.gin'
FLAGS_FILE = 'flags.txt'
SETTINGS_FILE = 'settings.json'
METRICS_FILE = 'metrics.jsonl'
HPARAMS_FILE = 'hparams.json'
TENSORBOARD_DIR = 'tensorboard'
METRICS_PLOT = 'metrics.png'
CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best_checkpoints'
# Where a resume moves checkpoints that do not read back (kept, not deleted).
CORRUPT_DIR = 'corrupt_checkpoints'
PROFILE_DIR = 'profile'
SAMPLES_FILE = 'samples.txt'


def resolve(workdir: str | None, flag: str = '--workdir') -> str:
  """The workdir's canonical name (a local path made absolute, a URL
  without its trailing ``/``); nothing is read or written.

  Raises:
    RunnerError: no workdir, or a URL of an unknown store (or one whose
      package is missing), naming ``flag``.
  """
  if not workdir:
    raise RunnerError(f'{flag} is required (the directory for configs,'
                      ' metrics and checkpoints).')
  try:
    workdir = storage.check(os.fspath(workdir))
  except storage.StorageError as e:
    raise RunnerError(f'{flag}={e}') from None
  if storage.local_file(workdir) is None:
    return workdir.rstrip('/')
  return os.path.abspath(os.path.expanduser(workdir))


def path(workdir: str, *names: str) -> str:
  """``names`` inside ``workdir`` (a path or URL)."""
  return storage.join(workdir, *names)


def prepare(workdir: str) -> str:
  """Creates ``workdir`` (see :func:`resolve`) and checks it is writable
  with a probe file, written and removed; returns its resolved name.

  Raises:
    RunnerError: the folder cannot be created or written (naming it).
  """
  workdir = resolve(workdir)
  probe = path(workdir, f'.write_test.{os.getpid()}.{os.urandom(4).hex()}')
  try:
    storage.makedirs(workdir)
    storage.write_bytes(probe, b'ok')
    storage.remove(probe)
  except Exception as e:  # pylint: disable=broad-except
    reason = (e.reason if isinstance(e, storage.StoreError) else
              e.strerror if isinstance(e, OSError) and e.strerror else
              f'{type(e).__name__}: {e}')
    raise RunnerError(f'--workdir={workdir} is not writable: {reason}.'
                      ) from e
  return workdir


def write_text(workdir: str, name: str, text: str,
               activity: str = "writing the run's config files") -> str:
  """Writes ``text`` as ``<workdir>/<name>``, appearing whole (a temporary
  renamed into place; on object stores one upload); returns its path.
  ``activity``: what the caller is doing, for the error line of a failed
  write (``runner.errors.activity``)."""
  with errors.activity(activity):
    return _write_text(path(workdir, name), text)


def _write_text(target: str, text: str) -> str:
  local = storage.local_file(target)
  if local is None:
    storage.write_text(target, text)  # one upload: appears whole
    return target
  # The local fast path: the workdir's lock keeps writers apart, so the
  # temporary has a fixed name (a leftover of a crash is overwritten).
  try:
    with open(local + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(local + '.tmp', local)
  except OSError:
    if os.path.isfile(local + '.tmp'):
      os.remove(local + '.tmp')  # no leftover; the error is reported
    raise
  return target
