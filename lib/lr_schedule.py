"""Learning rate schedules: ``flax.training.lr_schedule`` without flax.

These are the schedules of the FLAX image classification examples. Like
flax's, they are *effectively deprecated* in favour of Optax schedules, and
every factory logs an absl warning saying so when it is called.

Each factory returns ``f(step) -> lr``. Three behaviours are easy to get
wrong, and match flax exactly:

* a stepped decay takes effect at step ``boundary + 1``, not at ``boundary``;
* the cosine schedule is not clamped: past ``halfcos_epochs`` it rises again;
* warmup *multiplies* the schedule by ``min(1, step / warmup_steps)``; it
  does not delay it.

  >>> from gintrain.lib import lr_schedule
  >>> f = lr_schedule.create_stepped_learning_rate_schedule(
  ...     0.1, steps_per_epoch=100, lr_sched_steps=[[30, 0.1], [60, 0.01]])
  >>> float(f(3000)), float(f(3001))
  (0.10000000149011612, 0.009999999776482582)
"""

import jax.numpy as jnp
import numpy as np
from absl import logging

__all__ = [
    'create_constant_learning_rate_schedule',
    'create_stepped_learning_rate_schedule',
    'create_cosine_learning_rate_schedule',
    'constant_schedule',
    'stepped_schedule',
    'cosine_schedule',
]

_DEPRECATION = (
    'Learning rate schedules in ``lib.lr_schedule`` (as in'
    ' ``flax.training``) are effectively deprecated in favor of Optax'
    ' schedules. Please refer to'
    ' https://optax.readthedocs.io/en/latest/api.html#optimizer-schedules'
    ' for alternatives.')


def _warn_deprecated():
  logging.warning(_DEPRECATION)


def _warmup_factor(step, warmup_length, steps_per_epoch):
  """Linear ramp from 0 to 1 over ``warmup_length`` epochs, then 1."""
  return jnp.minimum(1.0, step / float(warmup_length) / steps_per_epoch)


def _with_warmup(lr, step, warmup_length, steps_per_epoch):
  if warmup_length > 0.0:
    return lr * _warmup_factor(step, warmup_length, steps_per_epoch)
  return lr


def _piecewise_constant(boundaries, values, step):
  """``values[k]`` where ``k`` counts the boundaries strictly below ``step``."""
  return jnp.take(values, jnp.sum(boundaries < step))


def create_constant_learning_rate_schedule(base_learning_rate,
                                           steps_per_epoch,
                                           warmup_length=0.0):
  """Creates a constant learning rate schedule with optional warmup.

  Without warmup the schedule returns ``base_learning_rate`` itself, the same
  object, whatever the step (a Python float stays a Python float). The
  warmup follows https://arxiv.org/abs/1706.02677 (training with large
  mini-batches).

  Args:
    base_learning_rate: the base learning rate.
    steps_per_epoch: the number of iterations per epoch.
    warmup_length: if > 0, the learning rate is multiplied by a warmup factor
      that ramps up linearly from 0 to 1 over the first ``warmup_length``
      epochs.

  Returns:
    Function ``f(step) -> lr`` that computes the learning rate for a step.

  Example::

    >>> from gintrain.lib.lr_schedule import create_constant_learning_rate_schedule
    >>> create_constant_learning_rate_schedule(0.5, 10)(1234)
    0.5
    >>> f = create_constant_learning_rate_schedule(0.5, 10, warmup_length=2)
    >>> [float(f(s)) for s in (0, 5, 20, 40)]
    [0.0, 0.125, 0.5, 0.5]
  """
  _warn_deprecated()
  return constant_schedule(base_learning_rate, steps_per_epoch,
                           warmup_length)


def create_stepped_learning_rate_schedule(base_learning_rate,
                                          steps_per_epoch,
                                          lr_sched_steps,
                                          warmup_length=0.0):
  """Creates a stepped learning rate schedule with optional warmup.

  The learning rate drops at given epochs to given fractions of the base
  rate. The common ImageNet schedule, a decay by 0.1 at epochs 30, 60 and 80,
  is written::

    [
      [30, 0.1],
      [60, 0.01],
      [80, 0.001]
    ]

  Each factor is absolute (``base * factor``), not cumulative. An epoch is
  turned into a step boundary by ``round(epoch * steps_per_epoch)`` (numpy
  rounding: halves go to the even integer), and the new rate applies from
  step ``boundary + 1``. Boundaries are not sorted: the index used is simply
  the number of boundaries strictly below the step. The step should be a
  scalar (a Python number, numpy or jax scalar, or a tracer under ``jit``).
  The values are computed as jax arrays (float32 unless x64 is enabled).

  Args:
    base_learning_rate: the base learning rate.
    steps_per_epoch: the number of iterations per epoch.
    lr_sched_steps: the schedule as a list of ``[epoch, lr_factor]`` pairs;
      after epoch ``epoch`` the learning rate is
      ``base_learning_rate * lr_factor``.
    warmup_length: if > 0, the learning rate is multiplied by a warmup factor
      that ramps up linearly from 0 to 1 over the first ``warmup_length``
      epochs.

  Returns:
    Function ``f(step) -> lr`` that computes the learning rate for a step.

  Example::

    >>> from gintrain.lib.lr_schedule import create_stepped_learning_rate_schedule
    >>> f = create_stepped_learning_rate_schedule(
    ...     1.0, steps_per_epoch=100,
    ...     lr_sched_steps=[[30, 0.1], [60, 0.01], [80, 0.001]])
    >>> [round(float(f(s)), 6) for s in (0, 3000, 3001, 6001, 9000)]
    [1.0, 1.0, 0.1, 0.01, 0.001]
  """
  _warn_deprecated()
  return stepped_schedule(base_learning_rate, steps_per_epoch,
                          lr_sched_steps, warmup_length)


def create_cosine_learning_rate_schedule(base_learning_rate,
                                         steps_per_epoch,
                                         halfcos_epochs,
                                         warmup_length=0.0):
  """Creates a cosine learning rate schedule with optional warmup.

  The learning rate follows half a cosine wave,
  ``base * (0.5 * cos(pi * step / H) + 0.5)`` with
  ``H = halfcos_epochs * steps_per_epoch``, reaching 0 at step ``H``. It is
  not clamped: past ``H`` the wave rises again. Works elementwise on arrays
  of steps and under ``jax.jit``.

  Args:
    base_learning_rate: the base learning rate.
    steps_per_epoch: the number of iterations per epoch.
    halfcos_epochs: the number of epochs to complete half a cosine wave;
      normally the number of epochs used for training.
    warmup_length: if > 0, the learning rate is multiplied by a warmup factor
      that ramps up linearly from 0 to 1 over the first ``warmup_length``
      epochs.

  Returns:
    Function ``f(step) -> lr`` that computes the learning rate for a step.

  Example::

    >>> import jax.numpy as jnp
    >>> from gintrain.lib.lr_schedule import create_cosine_learning_rate_schedule
    >>> f = create_cosine_learning_rate_schedule(1.0, 10, halfcos_epochs=2)
    >>> f(jnp.array([0, 10, 20, 30, 40])).round(6).tolist()
    [1.0, 0.5, 0.0, 0.5, 1.0]
  """
  _warn_deprecated()
  return cosine_schedule(base_learning_rate, steps_per_epoch, halfcos_epochs,
                         warmup_length)


# The same schedules without the deprecation warning (which is for callers of
# flax's API): for code that offers epoch schedules as a supported feature,
# such as gintrain's runner. Same arguments and values as the create_*
# functions above.


def constant_schedule(base_learning_rate, steps_per_epoch,
                      warmup_length=0.0):
  """:func:`create_constant_learning_rate_schedule` without its warning."""

  def learning_rate_fn(step):
    return _with_warmup(base_learning_rate, step, warmup_length,
                        steps_per_epoch)

  return learning_rate_fn


def stepped_schedule(base_learning_rate, steps_per_epoch, lr_sched_steps,
                     warmup_length=0.0):
  """:func:`create_stepped_learning_rate_schedule` without its warning."""
  epochs = [epoch for epoch, _ in lr_sched_steps]
  factors = [factor for _, factor in lr_sched_steps]
  boundaries = np.round(np.array(epochs) * steps_per_epoch).astype(int)
  values = np.array([1.0] + factors) * base_learning_rate

  def learning_rate_fn(step):
    lr = _piecewise_constant(boundaries, values, step)
    return _with_warmup(lr, step, warmup_length, steps_per_epoch)

  return learning_rate_fn


def cosine_schedule(base_learning_rate, steps_per_epoch, halfcos_epochs,
                    warmup_length=0.0):
  """:func:`create_cosine_learning_rate_schedule` without its warning."""
  halfwavelength_steps = halfcos_epochs * steps_per_epoch

  def learning_rate_fn(step):
    scale = jnp.cos(step * jnp.pi / halfwavelength_steps) * 0.5 + 0.5
    lr = base_learning_rate * scale
    return _with_warmup(lr, step, warmup_length, steps_per_epoch)

  return learning_rate_fn
