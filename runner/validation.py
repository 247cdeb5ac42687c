"""Argument checks shared by the data modules, with errors naming the argument."""

import operator

__all__ = ['check_int']


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
