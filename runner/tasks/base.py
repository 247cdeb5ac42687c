"""The Task interface: what is learned from a batch, and how it is scored.

A task owns the math of one kind of problem. The runner gives it the model
(any object with flax's ``init``/``apply``; see ``runner.models.calling``)
and calls, inside the compiled steps:

* ``init(rng, batch) -> variables``: ``{'params': ..., 'batch_stats': ...}``;
* ``loss(params, mutable, batch, rng) -> (loss, metrics, new_mutable)``:
  the scalar to minimise, more scalars to report (batch means), and the new
  values of the mutable collections (``{}`` if none);
* ``eval(params, mutable, batch) -> sums``: metric *sums* over the batch's
  real examples (``batch['mask']`` is 1 for real rows, 0 for padding) and
  their ``count``; the runner adds them over all eval batches and divides.

Batches are dicts of arrays with any keys; the leading axis is the example.
A new task in a few lines (bound with ``train.task = @my_module.MeanTask``)::

    import gin, jax.numpy as jnp
    from gintrain.runner.tasks import base

    @gin.configurable
    class MeanTask(base.Task):
      def loss(self, params, mutable, batch, rng):
        out, new = self.apply_train(params, mutable, batch['x'], rng)
        return jnp.mean(out ** 2), {}, new
      def eval(self, params, mutable, batch):
        out = self.apply_eval(params, mutable, batch['x'])
        per_example = jnp.mean(out ** 2, axis=-1) * batch['mask']
        return {'loss': per_example.sum(), 'count': batch['mask'].sum()}
"""

import abc
from collections.abc import Mapping
from typing import Any

import jax

from gintrain.runner.models import calling

__all__ = ['Task', 'Batch']

Batch = Mapping[str, Any]


class Task(abc.ABC):
  """Base class of tasks (see the module doc).

  Args:
    model: the model (``init``/``apply``).
    input_key: the batch entry fed to the model.

  Attributes:
    rng_streams: the named random streams passed to the model in training
      (flax's ``rngs=``); each step derives them from ``(seed, step)``.
  """
  rng_streams: tuple[str, ...] = ('dropout',)

  def __init__(self, model: Any, input_key: str = 'x'):
    self.model = model
    self.input_key = input_key
    self.caller = calling.ModelCaller(model)

  @property
  def name(self) -> str:
    return type(self).__name__

  def inputs(self, batch: Batch) -> Any:
    """The model's input in ``batch``."""
    if self.input_key not in batch:
      raise KeyError(f'{self.name}: the batch has no {self.input_key!r} entry'
                     f' (keys: {sorted(batch)}); set the task\'s input_key.')
    return batch[self.input_key]

  def init(self, rng: jax.Array, batch: Batch) -> dict:
    """Fresh variables for batches like ``batch``."""
    return self.caller.init(rng, self.inputs(batch), self.rng_streams)

  def rngs(self, rng: jax.Array) -> dict:
    """``{stream: key}`` for one training step from one key (``{}`` for
    ``rng=None``)."""
    if not self.rng_streams or rng is None:
      return {}
    keys = jax.random.split(rng, len(self.rng_streams))
    return dict(zip(self.rng_streams, keys))

  def apply_train(self, params, mutable, x, rng) -> tuple[Any, dict]:
    """``(output, new mutable collections)`` of the model in train mode."""
    return self.caller.apply_train({'params': params, **mutable}, x,
                                   self.rngs(rng))

  def apply_eval(self, params, mutable, x) -> Any:
    """The model's output in evaluation mode."""
    return self.caller.apply_eval({'params': params, **mutable}, x)

  def check(self, variables: Any, batch: Batch, info: Mapping[str, Any]):
    """Checks at start that the model fits the data; raises a one-line
    ``RunnerError``. ``variables`` and ``batch`` may be shape structs;
    ``info`` is the data source's description (e.g. ``num_classes``)."""
    del variables, batch, info

  def loss_weight(self, batch: Batch) -> jax.Array:
    """How much ``batch`` weighs in a mean over several batches (the
    number of elements its loss averages over): gradient accumulation over
    microbatches weights each microbatch's gradient by this. Default: the
    number of rows."""
    return jax.tree_util.tree_leaves(batch)[0].shape[0]

  def summarize(self, means: dict) -> dict:
    """Derived eval metrics from the means (e.g. perplexity from the loss);
    the default adds none."""
    return means

  @abc.abstractmethod
  def loss(self, params, mutable: dict, batch: Batch,
           rng: jax.Array) -> tuple[jax.Array, dict, dict]:
    """``(loss, metrics, new_mutable)`` for one training batch."""

  @abc.abstractmethod
  def eval(self, params, mutable: dict, batch: Batch) -> dict:
    """Metric sums over the real rows of ``batch``, with ``count``."""
