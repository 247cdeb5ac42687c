"""Argument checks shared by the data modules, with errors naming the argument."""

import numbers
import operator

__all__ = ['check_int', 'check_fraction']


def check_int(name, value, minimum):
  """``value`` as an int (anything with ``__index__`` but bool), or raise."""
  try:
    if isinstance(value, bool):
      raise TypeError
    result = operator.index(value)
  except TypeError:
    result = None
  if result is None or result < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return result


def check_fraction(name, value):
  """``value`` as a float in (0, 1) (a real number, not a bool), or raise."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not 0 < value < 1):
    raise ValueError(f'{name} must be a number in (0, 1), got {value!r}.')
  return float(value)
