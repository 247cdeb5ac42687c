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


def _split(batch, n):
  """``batch`` as ``n`` microbatches: leading axis ``(n, rows / n, ...)``."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def _accumulate(grads_of, task, microbatches, state, batch, rng):
  """``(grads, metrics, mutable)`` of ``batch`` in ``microbatches`` parts
  weighted by ``task.loss_weight`` (see :func:`make_train_step`)."""
  parts = _split(batch, microbatches)

  def body(carry, part):
    grads, metrics, total, mutable, i = carry
    w = jnp.asarray(task.loss_weight(part), jnp.float32)
    g, m, mutable = grads_of(state.params, mutable, part,
                             jax.random.fold_in(rng, i))
    grads = jax.tree_util.tree_map(lambda a, b: a + w * b, grads, g)
    metrics = {k: metrics[k] + w * m[k].astype(jnp.float32) for k in m}
    return (grads, metrics, total + w, mutable, i + 1), None

  first = jax.tree_util.tree_map(lambda x: x[0], parts)
  shapes = jax.eval_shape(grads_of, state.params, state.model_state, first,
                          rng)
  zeros = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, jnp.float32), shapes[1])
  grad_zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  (grads, metrics, total, mutable, _), _ = jax.lax.scan(
      body, (grad_zeros, zeros, jnp.zeros((), jnp.float32),
             state.model_state, 0), parts)
  total = jnp.maximum(total, 1e-9)
  return (jax.tree_util.tree_map(lambda g: g / total, grads),
          {k: v / total for k, v in metrics.items()}, mutable)


def make_train_step(task, seed: int, axis_name: str | None = None,
                    norms: bool = False, microbatches: int = 1) -> Callable:
  """``train_step(state, sums, batch) -> (state, sums + metrics)``.

  ``sums`` holds float32 running sums of ``loss`` and the task's metrics, so
  the host fetches one small dict per log line instead of one per step. The
  model's mutable collections are updated (averaged over devices under
  ``pmap``). With ``norms`` the step returns ``(state, sums, norms)``, where
  ``norms`` holds this step's ``grad_norm`` and ``param_norm``.

  With ``microbatches`` > 1 the batch is split into that many equal parts,
  run one after another (``lax.scan``, so only one part's activations are
  live): the gradients and metrics are averaged with the weights
  ``task.loss_weight(part)`` (so the update is the full batch's, e.g. per
  token), the mutable collections are threaded through the parts, and one
  update is applied. Part ``i`` draws its random numbers from
  ``fold_in(key, i)``.
  """

  def grads_of(params, mutable, batch, rng):
    def objective(p):
      loss, metrics, new_mutable = task.loss(p, mutable, batch, rng)
      return loss, (metrics, new_mutable)
    (loss, (metrics, new_mutable)), grads = jax.value_and_grad(
        objective, has_aux=True)(params)
    return grads, {'loss': loss, **metrics}, new_mutable

  def train_step(state, sums, batch):
    rng = step_key(seed, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    if microbatches > 1:
      grads, metrics, new_mutable = _accumulate(
          grads_of, task, microbatches, state, batch, rng)
    else:
      grads, metrics, new_mutable = grads_of(state.params, state.model_state,
                                             batch, rng)
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
