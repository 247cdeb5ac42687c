"""Training randomness: every microbatch and every device draws its own
dropout mask (issue 26, item 3).

The model here drops (bernoulli 0.5, from its ``dropout`` stream) the
entries of a parameter vector ``w`` and outputs their sum, so the gradient
of one draw is its keep-mask (0/1 per entry). An SGD step with learning
rate 1 from ``w = 0`` leaves ``w = -mean(masks)``: if the microbatches (or
the devices) shared one key, every entry would be 0 or 1; with distinct
keys some entries are averages of differing draws (0.5, 0.25, ...).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gintrain.runner.tasks import base
from gintrain.runner.training import state as state_lib
from gintrain.runner.training import steps

SIZE = 256


class DropoutSum:
  """``sum(w * keep)`` per row in training (keep ~ bernoulli(0.5))."""

  def init(self, rng, x, train=False):
    del rng, x, train
    return {'params': {'w': jnp.zeros((SIZE,), jnp.float32)}}

  def apply(self, variables, x, train=False, rngs=None):
    w = variables['params']['w']
    if train:
      w = w * jax.random.bernoulli(rngs['dropout'], 0.5, w.shape)
    return jnp.zeros((x.shape[0],), jnp.float32) + jnp.sum(w)


class MeanOutput(base.Task):

  def loss(self, params, mutable, batch, rng):
    out, new = self.apply_train(params, mutable, self.inputs(batch), rng)
    return jnp.mean(out), {}, new

  def eval(self, params, mutable, batch):
    out = self.apply_eval(params, mutable, self.inputs(batch))
    return {'loss': jnp.sum(out * batch['mask']),
            'count': jnp.sum(batch['mask'])}


def _state(task, batch):
  variables = task.init(jax.random.key(0), batch)
  return state_lib.create_train_state(variables, task.model.apply,
                                      optax.sgd(1.0))


def _fractions(w):
  """The entries of ``-w`` that are neither 0 nor 1 (draws that differ)."""
  g = -np.asarray(w)
  assert ((g >= 0) & (g <= 1)).all()
  return np.count_nonzero((g > 0) & (g < 1))


def test_microbatches_draw_different_masks():
  task = MeanOutput(DropoutSum())
  batch = {'x': np.zeros((8, 2), np.float32)}
  state = _state(task, batch)
  sums = {'loss': jnp.zeros((), jnp.float32)}
  one = jax.jit(steps.make_train_step(task, seed=0))
  new, _ = one(state, sums, batch)
  assert _fractions(new.params['w']) == 0  # one draw: a 0/1 mask
  assert 0.3 * SIZE < np.count_nonzero(new.params['w']) < 0.7 * SIZE
  step = jax.jit(steps.make_train_step(task, seed=0, microbatches=2))
  two, _ = step(state, sums, batch)
  # Shared keys would give no entry strictly between 0 and 1; distinct keys
  # about half of them (0.5: kept by one microbatch only).
  assert _fractions(two.params['w']) > 0.25 * SIZE
  # The step after draws other masks than the first step.
  later, _ = one(state.replace(step=state.step + 1), sums, batch)
  assert not np.array_equal(np.asarray(new.params['w']),
                            np.asarray(later.params['w']))


def test_pmap_devices_draw_different_masks():
  devices = jax.local_devices()[:4]
  assert len(devices) == 4
  task = MeanOutput(DropoutSum())
  batch = {'x': np.zeros((4, 2, 2), np.float32)}  # (devices, rows, ...)
  state = _state(task, {'x': batch['x'][0]})
  sums = {'loss': jnp.zeros((), jnp.float32)}
  step = jax.pmap(steps.make_train_step(task, seed=0, axis_name='batch'),
                  axis_name='batch', devices=devices)
  replicate = lambda tree: jax.tree_util.tree_map(  # pylint: disable=unnecessary-lambda-assignment
      lambda x: np.stack([np.asarray(x)] * len(devices)), tree)
  new, _ = step(replicate(state), replicate(sums), batch)
  w = np.asarray(new.params['w'])
  np.testing.assert_array_equal(w[0], w[3])  # gradients are averaged
  # One shared key: every device drops the same entries (0/1 only).
  assert _fractions(w[0]) > 0.5 * SIZE
