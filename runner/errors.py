"""The runner's user-facing error.

A :class:`RunnerError` is a fault in what the user gave the runner (flags, gin
files and bindings, the workdir, a checkpoint): ``runner.train`` prints its
message as one line, ``gintrain: error: <message>``, and exits with status 1,
without a traceback. Anything else is a bug and keeps its traceback.
"""

import difflib
from collections.abc import Iterable

__all__ = ['RunnerError', 'did_you_mean']


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
