"""Learning-rate schedules for the runner's optimizers.

``lib.lr_schedule``'s schedules (flax's) count in epochs, so they need
``steps_per_epoch``, which is known only once the dataset and the batch size
are. The factories here therefore return an :class:`EpochSchedule`: the
schedule's arguments, completed by :func:`resolve` when the loop knows
``steps_per_epoch``. They are ``lib.lr_schedule``'s warning-free builders
(``constant_schedule``, ... : the values of flax's ``create_*`` functions,
without the deprecation warning meant for callers of the flax API, since the
runner's epoch schedules are a supported feature). Optax schedules count
in steps and are used as they are::

    >>> import optax
    >>> sched = cosine(base_learning_rate=0.1, halfcos_epochs=2)
    >>> f = resolve(sched, steps_per_epoch=10)
    >>> [round(float(f(s)), 4) for s in (0, 10, 20)]
    [0.1, 0.05, 0.0]
    >>> resolve(0.01, steps_per_epoch=10)
    0.01
    >>> g = optax.linear_schedule(1.0, 0.0, 10)
    >>> resolve(g, steps_per_epoch=10) is g
    True
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from gintrain.lib import lr_schedule
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['EpochSchedule', 'constant', 'stepped', 'cosine', 'resolve']


@dataclasses.dataclass(frozen=True)
class EpochSchedule:
  """A ``lib.lr_schedule`` factory and its arguments, less ``steps_per_epoch``.

  Attributes:
    factory: ``f(steps_per_epoch=..., **kwargs) -> schedule``, computed as
      ``lib.lr_schedule.create_*_learning_rate_schedule`` computes.
    kwargs: its other arguments.
  """
  factory: Callable[..., Callable[[Any], Any]]
  kwargs: dict

  def build(self, steps_per_epoch: int) -> Callable[[Any], Any]:
    """The schedule ``f(step) -> lr`` for ``steps_per_epoch``."""
    return self.factory(steps_per_epoch=steps_per_epoch, **self.kwargs)


def _number(name, value, minimum=0, strict=False):
  validation.check_number(name, value, minimum, low_open=strict)
  return value


def constant(base_learning_rate: float,
             warmup_length: float = 0.0) -> EpochSchedule:
  """``lib.lr_schedule.create_constant_learning_rate_schedule``.

  Args:
    base_learning_rate: the learning rate.
    warmup_length: epochs of linear warmup (a multiplier ramping 0 to 1).
  """
  return EpochSchedule(lr_schedule.constant_schedule, {
      'base_learning_rate': _number('base_learning_rate', base_learning_rate),
      'warmup_length': _number('warmup_length', warmup_length),
  })


def stepped(base_learning_rate: float, lr_sched_steps,
            warmup_length: float = 0.0) -> EpochSchedule:
  """``lib.lr_schedule.create_stepped_learning_rate_schedule``.

  Args:
    base_learning_rate: the learning rate before the first boundary.
    lr_sched_steps: ``[[epoch, factor], ...]``: after ``epoch`` the rate is
      ``base_learning_rate * factor`` (absolute, not cumulative).
    warmup_length: epochs of linear warmup.
  """
  pairs = []
  try:
    for pair in lr_sched_steps:
      epoch, factor = pair
      pairs.append([_number('an epoch of lr_sched_steps', epoch),
                    _number('a factor of lr_sched_steps', factor)])
  except validation.ArgumentError:
    raise
  except (TypeError, ValueError):
    raise RunnerError(
        'lr_sched_steps must be a list of [epoch, factor] pairs, got'
        f' {lr_sched_steps!r}.') from None
  return EpochSchedule(lr_schedule.stepped_schedule, {
      'base_learning_rate': _number('base_learning_rate', base_learning_rate),
      'lr_sched_steps': pairs,
      'warmup_length': _number('warmup_length', warmup_length),
  })


def cosine(base_learning_rate: float, halfcos_epochs: float,
           warmup_length: float = 0.0) -> EpochSchedule:
  """``lib.lr_schedule.create_cosine_learning_rate_schedule``.

  Args:
    base_learning_rate: the rate at step 0 (after warmup).
    halfcos_epochs: epochs until the rate reaches 0 (usually the run's
      length; the wave is not clamped and rises again after).
    warmup_length: epochs of linear warmup.
  """
  return EpochSchedule(lr_schedule.cosine_schedule, {
      'base_learning_rate': _number('base_learning_rate', base_learning_rate),
      'halfcos_epochs': _number('halfcos_epochs', halfcos_epochs, strict=True),
      'warmup_length': _number('warmup_length', warmup_length),
  })


def resolve(learning_rate, steps_per_epoch: int):
  """A learning rate optax accepts: a number or ``f(step) -> lr``.

  Args:
    learning_rate: a number, an optax schedule (any callable), or an
      :class:`EpochSchedule`, which is built for ``steps_per_epoch``.
    steps_per_epoch: the run's full batches per epoch.

  Raises:
    RunnerError: ``learning_rate`` is none of these.
  """
  if isinstance(learning_rate, EpochSchedule):
    return learning_rate.build(steps_per_epoch)
  if callable(learning_rate):
    return learning_rate
  return _number('learning_rate', learning_rate)
