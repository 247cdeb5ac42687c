"""The math of one train step and one eval step (classification).

Both are pure functions of a ``TrainState`` and a batch
``{'x': inputs, 'y': int labels}`` (eval batches add ``'mask'``: 1 for real
rows, 0 for padding). With ``axis_name`` set they average (train) or sum
(eval) across the devices of a ``pmap``; under ``jit`` over a mesh the
global reductions are implicit, so the same numbers come out.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

__all__ = ['make_train_step', 'make_eval_step']

MetricFn = Callable[[jax.Array, jax.Array], jax.Array]


def make_train_step(loss_fn: MetricFn, metric_fns: Mapping[str, MetricFn],
                    axis_name: str | None = None):
  """``train_step(state, sums, batch) -> (state, sums + metrics)``.

  ``loss_fn(logits, labels)`` and each metric return a batch mean; the
  step adds them to ``sums`` (``{'loss': .., **metrics}``, float32 scalars),
  so the host fetches one small dict per log line instead of one per step.
  """

  def train_step(state, sums, batch):
    def objective(params):
      logits = state.apply_fn({'params': params}, batch['x'])
      return loss_fn(logits, batch['y']), logits

    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    metrics = {'loss': loss}
    for name, fn in metric_fns.items():
      metrics[name] = fn(logits, batch['y'])
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    sums = {k: sums[k] + metrics[k].astype(jnp.float32) for k in sums}
    return state.apply_gradients(grads=grads), sums

  return train_step


def make_eval_step(loss_fn: MetricFn, metric_fns: Mapping[str, MetricFn],
                   axis_name: str | None = None):
  """``eval_step(state, batch) -> {'count': n, 'loss': sum, **sums}``.

  Each batch-mean function is applied per example (so padding rows, with
  ``mask`` 0, drop out exactly); the host divides the sums by ``count``.
  """
  fns = {'loss': loss_fn, **metric_fns}

  def eval_step(state, batch):
    logits = state.apply_fn({'params': state.params}, batch['x'])
    mask = batch['mask'].astype(jnp.float32)
    sums = {'count': jnp.sum(mask)}
    for name, fn in fns.items():
      per_example = jax.vmap(lambda lg, y, fn=fn: fn(lg[None], y[None]))(
          logits, batch['y'])
      sums[name] = jnp.sum(per_example.astype(jnp.float32) * mask)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
