"""Argument checks: the one way the runner validates what a user bound.

Each check returns the value (converted where said) or raises
:class:`ArgumentError` naming the argument, what it must be and what it got,
e.g. ``train.seed must be an integer >= 0, got -1.``; a one-of check adds
the closest choice. Give ``name`` as the user wrote it (a gin binding such
as ``'train.seed'``, a flag such as ``'--top_p'``); an unqualified name
(``'batch_size'``) gets the gin configurable that raised it added by the
command line.

:class:`ArgumentError` is a :class:`~gintrain.runner.errors.RunnerError`
(one ``gintrain: error:`` line) and a ``ValueError`` (what the data
modules' callers catch).

    >>> check_int('train.seed', 3, 0)
    3
    >>> check_choice('train.parallelism', 'singel', ('auto', 'single'))
    Traceback (most recent call last):
    ...
    gintrain.runner.validation.ArgumentError: train.parallelism must be 'auto' or 'single', got 'singel'. (did you mean 'single'?)
"""

import math
import numbers
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

from gintrain.runner.errors import RunnerError
from gintrain.runner.errors import did_you_mean

__all__ = ['ArgumentError', 'fail', 'is_int', 'check_int', 'check_positive_int',
           'check_number', 'check_fraction', 'check_multiple',
           'check_choice', 'check_bool',
           'check_callable', 'check_callables', 'check_name',
           'check_regex', 'check_regex_list']


class ArgumentError(RunnerError, ValueError):
  """A bound argument that does not pass its check.

  Attributes:
    name: the argument, as given to the check.
  """

  def __init__(self, name: str, message: str):
    super().__init__(message)
    self.name = name

  @property
  def qualified(self) -> bool:
    """Whether ``name`` says where it is bound (``train.seed``, ``--flag``)
    rather than a bare parameter name."""
    return '.' in self.name or self.name.startswith('-')


def fail(name: str, want: str, value: Any, extra: str = '') -> None:
  """Raises ``<name> must be <want>, got <value!r>.<extra>`` (``extra``:
  e.g. `` (did you mean 'x'?)``)."""
  raise ArgumentError(name, f'{name} must be {want}, got {value!r}.{extra}')


def _as_int(value) -> int | None:
  if isinstance(value, bool):
    return None
  try:
    return operator.index(value)
  except TypeError:
    return None


def is_int(value: Any, minimum: int | None = None) -> bool:
  """Whether ``value`` is an int (not a bool) >= ``minimum``: the test of
  :func:`check_int`, for checks of several values at once."""
  result = _as_int(value)
  return result is not None and (minimum is None or result >= minimum)


def check_int(name: str, value: Any, minimum: int | None = None,
              maximum: int | None = None, *, allow_none: bool = False
              ) -> int | None:
  """``value`` as an int (anything with ``__index__`` but a bool, e.g. a
  numpy integer) in ``[minimum, maximum]``; None passes with
  ``allow_none``.

    >>> check_int('keep', -1, 0)
    Traceback (most recent call last):
    ...
    gintrain.runner.validation.ArgumentError: keep must be an integer >= 0, got -1.
  """
  if value is None and allow_none:
    return None
  result = _as_int(value)
  if (result is None or (minimum is not None and result < minimum) or
      (maximum is not None and result > maximum)):
    if minimum is not None and maximum is not None:
      want = f'an integer in [{minimum}, {maximum}]'
    elif minimum is not None:
      want = f'an integer >= {minimum}'
    elif maximum is not None:
      want = f'an integer <= {maximum}'
    else:
      want = 'an integer'
    fail(name, f'None or {want}' if allow_none else want, value)
  return result


def check_positive_int(name: str, value: Any, *, allow_none: bool = False
                       ) -> int | None:
  """``value`` as an int >= 1 (a count or a size); None passes with
  ``allow_none``."""
  if value is None and allow_none:
    return None
  result = _as_int(value)
  if result is None or result < 1:
    fail(name, 'a positive integer', value)
  return result


def _bound(low, high, low_open, high_open) -> str:
  if low is not None and high is not None:
    return (f'in {"(" if low_open else "["}{low:g}, {high:g}'
            f'{")" if high_open else "]"}')
  if low is not None:
    return f'{">" if low_open else ">="} {low:g}'
  return f'{"<" if high_open else "<="} {high:g}'


def check_number(name: str, value: Any, low: float | None = None,
                 high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, allow_none: bool = False,
                 unit: str = '') -> float | None:
  """``value`` as a finite float (a real number, not a bool) between
  ``low`` and ``high`` (each bound excluded when ``low_open`` /
  ``high_open``); ``unit`` is named in the message, e.g. ``'FLOP/s'``.

    >>> check_number('top_p', 1.5, 0, 1, low_open=True)
    Traceback (most recent call last):
    ...
    gintrain.runner.validation.ArgumentError: top_p must be a number in (0, 1], got 1.5.
  """
  if value is None and allow_none:
    return None
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and
        math.isfinite(value))
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    want = 'a number' if low is None and high is None else (
        f'a number {_bound(low, high, low_open, high_open)}')
    if unit:
      want += f' ({unit})'
    fail(name, f'None or {want}' if allow_none else want, value)
  return float(value)


def check_fraction(name: str, value: Any) -> float:
  """``value`` as a float in (0, 1) (a real number, not a bool)."""
  return check_number(name, value, 0, 1, low_open=True, high_open=True)


def check_multiple(name: str, value: int, divisor: int, of: str) -> int:
  """``value`` if ``divisor`` divides it (two settings that must fit:
  ``of`` names the divisor, e.g. ``'heads=4'``), after both were checked as
  integers.

    >>> check_multiple('train.batch_size', 12, 8, '8 (devices)')
    Traceback (most recent call last):
    ...
    gintrain.runner.validation.ArgumentError: train.batch_size=12 must be a multiple of 8 (devices).
  """
  if value % divisor:
    raise ArgumentError(name, f'{name}={value} must be a multiple of {of}.')
  return value


def _listed(choices) -> str:
  shown = [repr(c) for c in choices]
  if len(shown) == 2:
    return f'{shown[0]} or {shown[1]}'
  return 'one of ' + ', '.join(
      str(c) if isinstance(c, str) else repr(c) for c in choices)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
  """``value`` if it is one of ``choices``; else an error listing them
  with the closest (did you mean ...?).

    >>> check_choice('early_stopping.mode', 'max', ('min', 'max'))
    'max'
  """
  choices = tuple(choices)
  try:
    found = value in choices
  except TypeError:  # unhashable in a set-like container
    found = False
  if not found:
    fail(name, _listed(choices), value,
         did_you_mean(value, [c for c in choices if isinstance(c, str)])
         if isinstance(value, str) else '')
  return value


def check_bool(name: str, value: Any) -> bool:
  """``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
  if not isinstance(value, bool):
    fail(name, 'True or False', value)
  return value


def check_callable(name: str, value: Any, want: str = 'callable', *,
                   allow_none: bool = False) -> Any:
  """``value`` if it is callable (``want`` says what it must be in the
  message, e.g. ``'a Task factory'``)."""
  if value is None and allow_none:
    return None
  if not callable(value):
    fail(name, f'None or {want}' if allow_none else want, value)
  return value


def check_callables(name: str, value: Any, want: str, *,
                    allow_none: bool = False) -> tuple | None:
  """``value`` as a tuple if it is a list or tuple of callables (not a
  string); ``want`` says what in the message."""
  if value is None and allow_none:
    return None
  if (isinstance(value, (str, bytes)) or
      not isinstance(value, Iterable) or
      not all(callable(v) for v in value)):
    fail(name, want, value)
  return tuple(value)


def check_name(name: str, value: Any, want: str = 'a non-empty string', *,
               allow_none: bool = False,
               test: Callable[[str], bool] | None = None) -> str | None:
  """``value`` if it is a non-empty string (passing ``test``, if given)."""
  if value is None and allow_none:
    return None
  if not isinstance(value, str) or not value or (
      test is not None and not test(value)):
    fail(name, f'None or {want}' if allow_none else want, value)
  return value


def check_regex(name: str, pattern: Any) -> re.Pattern:
  """``pattern`` compiled (a compiled pattern passes as it is)."""
  if isinstance(pattern, re.Pattern):
    return pattern
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ArgumentError(name, f'{name}: {pattern!r} is not a regular'
                        f' expression ({e}).') from None


def check_regex_list(name: str, patterns: Any) -> tuple[re.Pattern, ...]:
  """``patterns`` (one string or a list of them) compiled."""
  if isinstance(patterns, (str, re.Pattern)):
    patterns = (patterns,)
  if not isinstance(patterns, Iterable):
    fail(name, 'a list of regular expressions', patterns)
  return tuple(check_regex(name, p) for p in patterns)
