"""lib.errors: FlaxError is the base class, subclass relations as in flax."""

import inspect
import pickle

import flax.errors as ferrors
import pytest

from gintrain.lib import errors


def _classes(module):
  return {n: c for n, c in vars(module).items()
          if inspect.isclass(c) and issubclass(c, BaseException)}


def test_flax_error_is_the_base_class():
  assert errors.FlaxError is errors.GintrainError
  assert 'FlaxError' in errors.__all__
  assert errors.FlaxError.__mro__[1:] == (Exception, BaseException, object)
  for name in errors.__all__:
    assert issubclass(getattr(errors, name), errors.FlaxError), name


def test_subclass_relations_match_flax():
  ours, theirs = _classes(errors), _classes(ferrors)
  shared = sorted(set(ours) & set(theirs) & set(errors.__all__))
  assert len(shared) >= 6, shared
  bases = [Exception, ValueError, KeyError, OSError, TypeError]
  for a in shared:
    for b in shared:
      assert issubclass(ours[a], ours[b]) == issubclass(theirs[a], theirs[b]), (
          a, b)
    for base in bases:
      assert issubclass(ours[a], base) == issubclass(theirs[a], base), (
          a, base)


def test_library_only_errors_are_flax_errors_and_value_errors():
  for cls in (errors.CheckpointReadError, errors.MsgpackDecodeError):
    assert issubclass(cls, errors.FlaxError) and issubclass(cls, ValueError)


@pytest.mark.parametrize('err', [
    errors.InvalidCheckpointError('/c/checkpoint_3', 3),
    errors.AlreadyExistsError('/c/checkpoint_3'),
    errors.MsgpackDecodeError('truncated'),
    errors.FlaxError('plain'),
])
def test_caught_as_flax_error_and_pickles(err):
  with pytest.raises(errors.FlaxError):
    raise err
  again = pickle.loads(pickle.dumps(err))
  assert type(again) is type(err) and str(again) == str(err)
