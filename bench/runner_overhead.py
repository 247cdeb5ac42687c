"""The runner's training throughput against a bare jitted loop.

Both train the same model on the same batches (``runner.batching`` order)
with the same step math (loss, gradient, optimizer update, accuracy):

* bare: ``state, metrics = jitted_step(state, batch)`` in a ``for`` loop;
* runner: ``runner.train.main_with_flags`` on the same config (evaluation
  and periodic checkpoints outside the timed steps), so the timed steps
  include everything its loop does per step: batch assembly, dispatch,
  metric buffering, hooks, the preemption check, and every ``window`` steps
  a log line with its metric fetch and record.

Timing is interleaved in one process so that load from other jobs on the
machine hits both alike: the runner calls a hook after every step; every
``window`` steps the hook closes a runner window (``window`` steps, timed
from the end of the previous bare window) and then runs a bare window of
``window`` steps (ended by ``block_until_ready``). Each pair gives a ratio
runner/bare; the table shows medians over all pairs after ``warmup``
windows (compilation excluded).

    python bench/runner_overhead.py [--windows=40] [--window=100]

The target is a ratio >= 0.97.
"""

import argparse
import statistics
import sys
import tempfile
import time

import jax
import optax
from absl import logging

from runner import batching
from runner import datasets
from runner import losses
from runner import models
from runner import state as state_lib
from runner import train as runner_train

CONFIGS = {
    # name: (mlp features, batch size); the first is the default experiment.
    'default (mlp 128, batch 64)': ((128,), 64),
    'wide (mlp 512x512, batch 256)': ((512, 512), 256),
}
LEARNING_RATE = 0.01


class BareLoop:
  """A hand-written jitted training loop, run a window at a time."""

  def __init__(self, features, batch_size, seed=0):
    self.data = datasets.digits()
    model = models.mlp(features=features, num_classes=10)
    self.state = state_lib.create_train_state(
        model, optax.adam(LEARNING_RATE), jax.random.key(seed),
        self.data.x_train[:1])
    self.batch_size, self.seed, self.step = batch_size, seed, 0

    @jax.jit
    def step(state, batch):
      def objective(params):
        logits = model.apply({'params': params}, batch['x'])
        return losses.cross_entropy_loss(logits, batch['y']), logits
      (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(
          state.params)
      return state.apply_gradients(grads=grads), {
          'loss': loss, 'accuracy': losses.accuracy(logits, batch['y'])}

    self._step = step

  def run(self, steps: int) -> float:
    """Runs ``steps`` steps; returns their wall-clock seconds."""
    x, y, n = self.data.x_train, self.data.y_train, len(self.data.x_train)
    start = time.perf_counter()
    for _ in range(steps):
      idx = batching.global_batch_indices(n, self.batch_size, self.seed,
                                          self.step)
      self.state, _ = self._step(self.state, {'x': x[idx], 'y': y[idx]})
      self.step += 1
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


def measure(features, batch_size, windows, window, warmup):
  """``[(runner steps/s, bare steps/s)]``, one pair per window."""
  bare = BareLoop(features, batch_size)
  bare.run(window)  # compile
  pairs = []
  last = [None]

  def hook(step):
    if step % window != 1:
      return
    now = time.perf_counter()
    if last[0] is not None and step > (warmup + 1) * window:
      runner_seconds = now - last[0]
      pairs.append((window / runner_seconds, window / bare.run(window)))
    last[0] = time.perf_counter()

  total = (warmup + windows + 1) * window + 1
  with tempfile.TemporaryDirectory() as workdir:
    code = runner_train.main_with_flags([
        'bench', f'--workdir={workdir}', '--gin.train.num_epochs=None',
        f'--gin.train.num_steps={total}', f'--gin.train.batch_size={batch_size}',
        f'--gin.mlp.features={tuple(features)}',
        f'--gin.optimizer.learning_rate={LEARNING_RATE}',
        f'--gin.train.log_every={window}', f'--gin.train.eval_every={total}',
        '--gin.checkpoint_policy.every_steps=0',
        '--gin.train.parallelism="single"'], hooks=[hook])
  if code:
    raise SystemExit(f'runner failed with status {code}')
  return pairs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--windows', type=int, default=40)
  parser.add_argument('--window', type=int, default=100)
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}'
        f' ({jax.device_count()} device): {args.windows} interleaved windows'
        f' of {args.window} steps each, after {args.warmup} warm-up windows',
        flush=True)
  rows = []
  for name, (features, batch_size) in CONFIGS.items():
    pairs = measure(features, batch_size, args.windows, args.window,
                    args.warmup)
    runner = statistics.median(r for r, _ in pairs)
    bare = statistics.median(b for _, b in pairs)
    ratios = sorted(r / b for r, b in pairs)
    quartiles = statistics.quantiles(ratios, n=4)
    rows.append((name, bare, runner, statistics.median(ratios),
                 quartiles[0], quartiles[2]))
    print(f'  {name}: {len(pairs)} pairs', file=sys.stderr, flush=True)
  print(f'{"config":31} {"bare steps/s":>12} {"runner steps/s":>14}'
        f' {"runner/bare":>11} {"(quartiles)":>15}')
  for name, bare, runner, ratio, q1, q3 in rows:
    print(f'{name:31} {bare:12.0f} {runner:14.0f} {ratio:11.3f}'
          f'   ({q1:.3f}-{q3:.3f})')
  worst = min(row[3] for row in rows)
  print(f'worst median ratio {worst:.3f} (target >= 0.97):'
        f' {"OK" if worst >= 0.97 else "below target"}')


if __name__ == '__main__':
  main()
