"""One train step and one eval step, built from a Task.

Both are pure functions of a :class:`~.state.TrainState` and a batch dict.
With ``axis_name`` set (``pmap``) they average (train) or sum (eval) across
the devices; under ``jit`` over a mesh the global reductions are implicit,
so the same numbers come out.

The training step's random key is ``fold_in(key(seed + 1), step)`` (and,
under ``pmap``, the device index): a pure function of the step, so a
resumed run draws exactly the numbers an uninterrupted one draws. Under
``jit`` one key covers the global batch, whatever the process count.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ['make_train_step', 'make_eval_step', 'step_key', 'NORMS']

# What the logging variant of the train step adds: the global norms of the
# step's gradient and of the new parameters. They cost 10-20% of a small
# model's step, so only the step at a log step computes them.
NORMS = ('grad_norm', 'param_norm')


def step_key(seed: int, step) -> jax.Array:
  """The training key of ``step`` (distinct from the init key ``key(seed)``)."""
  return jax.random.fold_in(jax.random.key(seed + 1), step)


def make_train_step(task, seed: int, axis_name: str | None = None,
                    norms: bool = False) -> Callable:
  """``train_step(state, sums, batch) -> (state, sums + metrics)``.

  ``sums`` holds float32 running sums of ``loss`` and the task's metrics, so
  the host fetches one small dict per log line instead of one per step. The
  model's mutable collections are updated (averaged over devices under
  ``pmap``). With ``norms`` the step returns ``(state, sums, norms)``, where
  ``norms`` holds this step's ``grad_norm`` and ``param_norm``.
  """

  def train_step(state, sums, batch):
    rng = step_key(seed, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def objective(params):
      loss, metrics, new_mutable = task.loss(params, state.model_state, batch,
                                             rng)
      return loss, (metrics, new_mutable)

    (loss, (metrics, new_mutable)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    metrics = {'loss': loss, **metrics}
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
      new_mutable = jax.lax.pmean(new_mutable, axis_name)
    state = state.apply_gradients(grads=grads).replace(
        model_state=new_mutable)
    sums = {k: sums[k] + metrics[k].astype(jnp.float32) for k in sums}
    if not norms:
      return state, sums
    return state, sums, {'grad_norm': optax.tree.norm(grads),
                         'param_norm': optax.tree.norm(state.params)}

  return train_step


def make_eval_step(task, axis_name: str | None = None) -> Callable:
  """``eval_step(state, batch) -> {'count': n, 'loss': sum, ...}`` (sums over
  the batch's real rows; the host adds them up and divides by ``count``)."""

  def eval_step(state, batch):
    sums = task.eval(state.params, state.model_state, batch)
    sums = {k: jnp.asarray(v, jnp.float32) for k, v in sums.items()}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
