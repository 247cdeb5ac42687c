"""Factories for the restorable state of a run: train state, early stopping.

    >>> import jax, numpy as np, optax
    >>> from gintrain.runner import models
    >>> state = create_train_state(models.mlp(features=(4,)), optax.sgd(0.1),
    ...                            jax.random.key(0), np.zeros((1, 3)))
    >>> int(state.step), state.params['Dense_0']['kernel'].shape
    (0, (3, 4))
    >>> early_stopping('accuracy', mode='max', patience=2).state.best_metric
    -inf
"""

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from gintrain.lib.early_stopping import EarlyStopping
from gintrain.lib.train_state import TrainState
from gintrain.runner.errors import RunnerError

__all__ = ['create_train_state', 'EarlyStopper', 'early_stopping']


def create_train_state(model, tx, rng, sample_input, *,
                       state_class: type = TrainState) -> TrainState:
  """``state_class.create`` with fresh parameters of ``model``.

  Args:
    model: has ``init(rng, x) -> {'params': ...}`` and ``apply``.
    tx: the optax transformation.
    rng: a JAX PRNG key for the initialisation.
    sample_input: a batch shaped like the inputs (only the shape is used).
    state_class: ``lib.train_state.TrainState`` or a subclass.

  The step counter is an int32 array (not a Python int), so the state has
  the same leaf types before and after a checkpoint round trip.
  """
  variables = model.init(rng, sample_input)
  if not isinstance(variables, dict) or 'params' not in variables:
    raise RunnerError(
        f'model.init must return {{"params": ...}}, got {type(variables)}.')
  state = state_class.create(apply_fn=model.apply,
                             params=variables['params'], tx=tx)
  return state.replace(step=np.asarray(0, np.int32))


class EarlyStopper(NamedTuple):
  """Which eval metric drives early stopping, and the stopping state."""
  metric: str
  state: EarlyStopping

  def update(self, metrics: dict[str, Any]) -> 'EarlyStopper':
    return self._replace(state=self.state.update(float(metrics[self.metric])))


def early_stopping(metric: str = 'loss', mode: str = 'min',
                   min_delta: float = 0.0, patience: int = 0) -> EarlyStopper:
  """Stops training when the eval ``metric`` stops improving.

  Args:
    metric: an eval metric name (``'loss'``, ``'accuracy'``, ...).
    mode: ``'min'`` (lower is better) or ``'max'``.
    min_delta: an improvement must exceed this.
    patience: evaluations without improvement tolerated; training stops at
      the ``patience + 1``-th in a row (``lib.early_stopping`` semantics).
  """
  if not isinstance(metric, str) or not metric:
    raise RunnerError(f'early_stopping.metric must be a metric name, got'
                      f' {metric!r}.')
  if mode not in ('min', 'max'):
    raise RunnerError(f"early_stopping.mode must be 'min' or 'max', got"
                      f' {mode!r}.')
  if (not isinstance(min_delta, numbers.Real) or isinstance(min_delta, bool)
      or not math.isfinite(min_delta) or min_delta < 0):
    raise RunnerError(f'early_stopping.min_delta must be a number >= 0, got'
                      f' {min_delta!r}.')
  if not isinstance(patience, int) or isinstance(patience, bool) or (
      patience < 0):
    raise RunnerError(f'early_stopping.patience must be an integer >= 0, got'
                      f' {patience!r}.')
  return EarlyStopper(metric, EarlyStopping(min_delta=min_delta,
                                            patience=patience, mode=mode))
