"""The runner's user-facing error.

A :class:`RunnerError` is a fault in what the user gave the runner (flags, gin
files and bindings, the workdir, a checkpoint): ``runner.train`` prints its
message as one line, ``gintrain: error: <message>``, and exits with status 1,
without a traceback. Anything else is a bug and keeps its traceback.

A file that cannot be written or read (an ``OSError`` naming its path) is a
fault of the machine, not a bug: its line says what the runner was doing,
as declared by the code doing it (:class:`activity`), what failed and why:

    >>> try:
    ...   with activity('writing the metrics'):
    ...     open('/nonexistent/metrics.jsonl', 'a')
    ... except OSError as e:
    ...   print(file_error_line(e))
    writing the metrics: cannot access /nonexistent/metrics.jsonl: No such file or directory [Errno 2].
"""

import difflib
import errno
import functools
from collections.abc import Callable, Iterable

from gintrain.lib import storage

__all__ = ['RunnerError', 'did_you_mean', 'activity', 'activity_of',
           'file_error_line']


class RunnerError(Exception):
  """A fault in the user's input; the message names it on one line."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split()))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
  """`` (did you mean 'x'?)`` for the closest of ``choices``, else ``''``.

    >>> did_you_mean('learning_rat', ['learning_rate', 'momentum'])
    " (did you mean 'learning_rate'?)"
    >>> did_you_mean('zzz', ['learning_rate'])
    ''
  """
  close = difflib.get_close_matches(word, sorted(set(choices)), n=1,
                                    cutoff=0.6)
  return f" (did you mean '{close[0]}'?)" if close else ''


# Where an exception keeps the activity it was raised under.
_ACTIVITY = '_gintrain_activity'


class activity:  # pylint: disable=invalid-name (used like a function)
  """Declares what the runner is doing, for the error line of an exception
  raised under it: ``with activity('writing the metrics'): ...``, or as a
  decorator, ``@activity('locking the workdir')``.

  An exception leaving the block keeps ``what`` (:func:`activity_of`)
  unless a block inside declared one already: the innermost declaration
  wins. Nothing else changes: the exception, its type and traceback pass on
  as they are. An instance holds no state and may be reused (and nested).
  The runner declares what it does (writing the metrics, saving the
  settings, running an action, reading the data, ...); a user's plug-in
  may declare its own inside.
  """

  __slots__ = ('what',)

  def __init__(self, what: str):
    self.what = what

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind, error, traceback) -> bool:
    if error is not None:
      self.note(error)
    return False

  def note(self, error: BaseException) -> None:
    """Records the activity on ``error`` as leaving the block does (unless
    one is recorded already); for a hot loop's ``except BaseException as
    e: act.note(e); raise``, which costs nothing while nothing fails."""
    if getattr(error, _ACTIVITY, None) is None:
      try:
        setattr(error, _ACTIVITY, self.what)
      except AttributeError:  # an exception type that takes no attributes
        pass

  def __call__(self, function: Callable) -> Callable:
    @functools.wraps(function)
    def declared(*args, **kwargs):
      with self:
        return function(*args, **kwargs)
    return declared

  def __repr__(self):
    return f'activity({self.what!r})'


def activity_of(error: BaseException) -> str | None:
  """The innermost :class:`activity` that ``error`` left, or None."""
  return getattr(error, _ACTIVITY, None)


# The operation an OSError's errno implies where the code that raised it
# named none (lib.storage names its own: storage.operation_of).
_ERRNO_OPERATIONS = {
    errno.EEXIST: 'create the directory',  # the runner's mkdir/makedirs
    errno.EISDIR: 'open',  # a directory where a file was to be opened
    errno.ENOSPC: 'write to',
    errno.EDQUOT: 'write to',
    errno.EFBIG: 'write to',
}


def file_error_line(error: OSError) -> str:
  """``<activity>: cannot <operation> <path>: <reason> [Errno N].`` for an
  OSError that names its file.

  The activity is the one declared where it was raised (:class:`activity`;
  ``a file operation`` if none). The operation is the one
  ``lib.storage`` names (:func:`storage.operation_of`), else a rename for
  an error naming two paths, else what its errno implies (``File exists``:
  creating a directory; ``Is a directory``: opening it; no space: writing),
  else ``access``. Neither depends on where the code lives or on its
  source text.
  """
  operation = storage.operation_of(error)
  if error.filename2 is not None:
    target = f'{error.filename} to {error.filename2}'
    operation = operation or 'rename'
  else:
    target = str(error.filename)
  operation = operation or _ERRNO_OPERATIONS.get(error.errno, 'access')
  reason = error.strerror or type(error).__name__
  code = f' [Errno {error.errno}]' if error.errno else ''
  return (f'{activity_of(error) or "a file operation"}: cannot {operation}'
          f' {target}: {reason}{code}.')
