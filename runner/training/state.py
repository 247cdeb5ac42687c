"""The restorable state of a run: train state (with the model's mutable
collections) and early stopping.

    >>> import jax, numpy as np, optax
    >>> from gintrain.runner.models import plain
    >>> model = plain.mlp(features=(4,))
    >>> variables = model.init(jax.random.key(0), np.zeros((1, 3)))
    >>> state = create_train_state(variables, model.apply, optax.sgd(0.1))
    >>> int(state.step), state.params['Dense_0']['kernel'].shape, state.model_state
    (0, (3, 4), {})
    >>> early_stopping('accuracy', mode='max', patience=2).state.best_metric
    -inf
"""

from typing import Any, NamedTuple

import numpy as np

from gintrain.lib import struct
from gintrain.lib import train_state
from gintrain.lib.early_stopping import EarlyStopping
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['TrainState', 'create_train_state', 'EarlyStopper',
           'early_stopping']


class TrainState(train_state.TrainState):
  """``lib.train_state.TrainState`` plus the model's mutable collections.

  Attributes:
    model_state: the variables besides ``params`` (e.g. ``{'batch_stats':
      ...}``), updated by each training step and checkpointed with the
      rest; ``{}`` for models without any.
  """
  model_state: Any = struct.field(default_factory=dict)


def create_train_state(variables, apply_fn, tx, *,
                       state_class: type = TrainState) -> TrainState:
  """``state_class.create`` from a model's fresh ``variables``.

  Args:
    variables: ``{'params': ..., <collection>: ...}`` from the model's init.
    apply_fn: the model's apply function (kept as a static field).
    tx: the optax transformation.
    state_class: :class:`TrainState` or a subclass.

  The step counter is an int32 array (not a Python int), so the state has
  the same leaf types before and after a checkpoint round trip.
  """
  if not isinstance(variables, dict) or 'params' not in variables:
    raise RunnerError(
        f'model.init must return {{"params": ...}}, got {type(variables)}.')
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  state = state_class.create(apply_fn=apply_fn, params=variables['params'],
                             tx=tx, model_state=model_state)
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
  validation.check_name('early_stopping.metric', metric, 'a metric name')
  validation.check_choice('early_stopping.mode', mode, ('min', 'max'))
  validation.check_number('early_stopping.min_delta', min_delta, 0)
  validation.check_int('early_stopping.patience', patience, 0)
  return EarlyStopper(metric, EarlyStopping(min_delta=min_delta,
                                            patience=patience, mode=mode))
