"""``EarlyStopping``: ``flax.training.early_stopping`` without flax.

In the default ``mode='min'`` (lower is better) it behaves exactly as flax's
class and has the same state dict. ``mode='max'`` (a static field, not
saved) is the mirror image for metrics where higher is better, such as
accuracy.
"""

import math

from gintrain.lib import struct

__all__ = ['EarlyStopping']

_MODES = ('min', 'max')


class EarlyStopping(struct.PyTreeNode):
  """Early stopping to avoid overfitting during training.

  The following example stops training early if the difference between losses
  recorded in the current epoch and previous epoch is less than 1e-3
  consecutively for 2 times::

      >>> from gintrain.lib.early_stopping import EarlyStopping

      >>> def train_epoch(optimizer, train_ds, batch_size, epoch, input_rng):
      ...   ...
      ...   loss = [4, 3, 3, 3, 2, 2, 2, 2, 1, 1][epoch]
      ...   return None, {'loss': loss}

      >>> early_stop = EarlyStopping(min_delta=1e-3, patience=2)
      >>> optimizer = None
      >>> for epoch in range(10):
      ...   optimizer, train_metrics = train_epoch(
      ...       optimizer=optimizer, train_ds=None, batch_size=None, epoch=epoch, input_rng=None)
      ...   early_stop = early_stop.update(train_metrics['loss'])
      ...   if early_stop.should_stop:
      ...     print(f'Met early stopping criteria, breaking at epoch {epoch}')
      ...     break
      Met early stopping criteria, breaking at epoch 7

  An update improves when no best is known yet (``best_metric`` is
  infinite) or when it beats ``best_metric`` by *more* than ``min_delta``.
  Stopping happens on the ``patience + 1``-th consecutive update without
  improvement, and is sticky: a later improvement resets ``patience_count``
  but leaves ``should_stop`` True (until :meth:`reset`).

  With ``mode='max'`` higher is better, and a fresh state's ``best_metric``
  is ``-inf``::

    >>> es = EarlyStopping(patience=1, mode='max')
    >>> es.best_metric
    -inf
    >>> for acc in [0.5, 0.7, 0.6, 0.65]:
    ...   es = es.update(acc)
    >>> es.best_metric, es.patience_count, es.should_stop
    (0.7, 2, True)

  Attributes:
    min_delta: minimum change of the metric that counts as an improvement.
    patience: number of steps without improvement tolerated before stopping.
    best_metric: best metric value so far (infinite: none yet).
    patience_count: number of steps since the last improving update.
    should_stop: whether the training loop should stop to avoid overfitting.
    has_improved: whether the last ``.update`` call improved the metric by
      more than ``min_delta``.
    mode: ``'min'`` (default, as flax: lower is better) or ``'max'`` (higher
      is better). Static: not a leaf and not in the state dict. In ``'max'``
      mode a ``best_metric`` of ``+inf`` on a state that has not improved
      (the constructor default) is stored as ``-inf``.
  """

  min_delta: float = 0
  patience: int = 0
  best_metric: float = float('inf')
  patience_count: int = 0
  should_stop: bool = False
  has_improved: bool = False
  mode: str = struct.field(pytree_node=False, default='min')

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(
          f"EarlyStopping mode must be 'min' or 'max', got {self.mode!r}.")
    if (self.mode == 'max' and isinstance(self.best_metric, float) and
        self.best_metric == math.inf and self.has_improved is False):
      object.__setattr__(self, 'best_metric', -math.inf)

  def _initial_best(self) -> float:
    return math.inf if self.mode == 'min' else -math.inf

  def _improvement(self, metric):
    if self.mode == 'min':
      return self.best_metric - metric
    return metric - self.best_metric

  def reset(self):
    """Returns a fresh state; ``min_delta``, ``patience`` and ``mode`` kept."""
    return self.replace(
        best_metric=self._initial_best(),
        patience_count=0,
        should_stop=False,
        has_improved=False,
    )

  def update(self, metric):
    """Updates the state with a new metric value.

    Returns:
      The updated ``EarlyStopping``. Its ``.has_improved`` attribute is True
      when the metric improved on the previous ``best_metric`` by more than
      ``min_delta`` (or when there was no best yet).
    """
    if (math.isinf(self.best_metric) or
        self._improvement(metric) > self.min_delta):
      return self.replace(
          best_metric=metric, patience_count=0, has_improved=True)
    should_stop = self.patience_count >= self.patience or self.should_stop
    return self.replace(
        patience_count=self.patience_count + 1,
        should_stop=should_stop,
        has_improved=False,
    )
