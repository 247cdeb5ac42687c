"""``@runner.train_steps()``: the run's ``train.num_steps`` for another
binding, so that a schedule's length follows the run's.

``gin/lm.gin`` decays its learning rate over the whole run::

    warmup_cosine_decay_schedule.decay_steps = @runner.train_steps()

so ``--gin.train.num_steps=30`` shortens the decay too (issue 18: it stayed
at 1,500 steps). The value is read from gin's bindings when the schedule is
built (``train.num_steps``, through a macro if it names one). A part of
the run, e.g. its warmup, with ``fraction`` and a gin scope::

    warmup_cosine_decay_schedule.warmup_steps = @warmup/runner.train_steps()
    warmup/runner.train_steps.fraction = 0.0667  # 100 of 1,500 steps

Tested by tests/test_reliability_round3.py (lm.gin at 30 and 1,500 steps).
"""

import gin

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['train_steps']


def _value(selector):
  value = gin.query_parameter(selector)
  for _ in range(10):  # a macro naming a macro ...
    if not isinstance(value, gin.config.ConfigurableReference):
      return value
    name = value.selector
    if not name.endswith('macro'):
      return value
    value = gin.query_parameter(f'{value.scoped_selector}.value')
  return value


@gin.configurable('train_steps', module='runner')
def train_steps(fraction: float = 1.0) -> int:
  """``train.num_steps`` times ``fraction`` (rounded), at least 1.

  Raises:
    RunnerError: ``train.num_steps`` is not bound to a number (an
      epoch-based run: bind the schedule's length yourself).
  """
  try:
    value = _value('train.num_steps')
  except ValueError:
    value = None
  if not validation.is_int(value, 1):
    raise RunnerError(
        '@runner.train_steps() needs train.num_steps bound to a number of'
        f' steps, got {value!r}: bind the schedule\'s length (e.g.'
        ' warmup_cosine_decay_schedule.decay_steps) yourself.')
  validation.check_number('runner.train_steps.fraction', fraction, 0, 1,
                          low_open=True)
  return max(1, round(value * fraction))
