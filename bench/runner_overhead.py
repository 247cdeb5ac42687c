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
machine hits both alike: the runner calls a hook after every step, at a log
step after its metrics fetch (so no runner work is pending then); every
``window`` (= ``log_every``) steps the hook closes a runner window
(``window`` steps, timed from the end of the previous bare window) and then
runs a bare window of ``window`` steps (ended by ``block_until_ready``).
Each pair gives a ratio runner/bare; the table shows medians over all pairs
after ``warmup`` windows (compilation excluded).

Control: the same interleaving with two identical bare loops (A/A). Its
ratio would be 1.000 on a quiet machine; its distance from 1 is the bias
and noise of the method (on a shared 2-core machine a few percent, more for
short windows). "corrected" divides runner/bare by it.

    python bench/runner_overhead.py [--scale=1]

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

from gintrain.runner.data import batching
from gintrain.runner.data import datasets
from gintrain.runner.tasks import losses
from gintrain.runner.models import plain as models
from gintrain.runner.training import state as state_lib
from gintrain.runner import train as runner_train

# (name, model, batch size, window = log_every, windows). The first two are
# the default experiment's model and data, logging every 500 and every 50
# steps (a log line costs about a millisecond of host time); the last two the
# language model of gin/lm.gin, reduced (width 64, 2 blocks, 64 tokens), on
# the grain text source, without and with 2 grain worker processes.
CONFIGS = (
    ('default, log every 500', (128,), 64, 500, 40),
    ('default, log every 50', (128,), 64, 50, 150),
    ('wide 512x512, batch 256', (512, 512), 256, 100, 30),
    ('LM, grain in-process', 'lm:0', 16, 20, 12),
    ('LM, 2 grain workers', 'lm:2', 16, 20, 12),
)
LEARNING_RATE = 0.01
LM_LENGTH = 64
LM_FLAGS = ['--gin_file=lm.gin', '--gin.transformer.width=64',
            '--gin.transformer.depth=2', f'--gin.transformer.max_len={LM_LENGTH}',
            f'--gin.text_files.length={LM_LENGTH}',
            '--gin.text_files.max_eval_examples=16', '--gin.train.actions=[]',
            '--gin.optimizer.learning_rate=0.001']


class BareLoop:
  """A hand-written jitted training loop, run a window at a time."""

  def __init__(self, features, batch_size, seed=0):
    self.data = datasets.digits()
    model = models.mlp(features=features, num_classes=10)
    variables = model.init(jax.random.key(seed), self.data.x_train[:1])
    self.state = state_lib.create_train_state(variables, model.apply,
                                              optax.adam(LEARNING_RATE))
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


class LMBareLoop:
  """A hand-written jitted loop over the same LM, optimizer and grain
  batches as the runner's (same seed, so the same order)."""

  def __init__(self, workers, batch_size, seed=0):
    # pylint: disable=g-import-not-at-top
    from gintrain.runner.data import base
    from gintrain.runner.data import text
    from gintrain.runner.models import transformer
    from gintrain.runner.tasks import lm
    # pylint: enable=g-import-not-at-top
    self.source = text.text_files(length=LM_LENGTH, worker_count=workers,
                                  max_eval_examples=16)
    self.source.bind(base.Spec(batch_size, batch_size, seed))
    model = transformer.transformer(width=64, depth=2, max_len=LM_LENGTH)
    task = lm.LanguageModel(model)
    variables = model.init(jax.random.key(seed), None)
    tx = optax.adamw(0.001, weight_decay=0.01)
    self.state = state_lib.create_train_state(variables, model.apply, tx)

    @jax.jit
    def step(state, batch):
      def objective(params):
        loss, metrics, _ = task.loss(params, {}, batch, None)
        return loss, metrics
      (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
          state.params)
      return state.apply_gradients(grads=grads), {'loss': loss, **metrics}

    self._step = step

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.state, _ = self._step(self.state, self.source.next_batch())
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


def _bare(model, batch_size):
  if isinstance(model, str):
    return LMBareLoop(int(model.split(':')[1]), batch_size)
  return BareLoop(model, batch_size)


def _runner_flags(model, batch_size):
  if isinstance(model, str):
    return [*LM_FLAGS, f'--gin.text_files.worker_count={model.split(":")[1]}',
            f'--gin.train.eval_batch_size={batch_size}']
  return [f'--gin.mlp.features={tuple(model)}',
          f'--gin.optimizer.learning_rate={LEARNING_RATE}']


def measure(model, batch_size, windows, window, warmup):
  """``[(runner steps/s, bare steps/s)]``, one pair per window."""
  bare = _bare(model, batch_size)
  bare.run(window)  # compile
  pairs = []
  last = [None]

  def hook(step):
    if step % window:
      return
    now = time.perf_counter()
    if last[0] is not None and step > warmup * window:
      runner_seconds = now - last[0]
      pairs.append((window / runner_seconds, window / bare.run(window)))
    last[0] = time.perf_counter()

  total = (warmup + windows + 1) * window
  with tempfile.TemporaryDirectory() as workdir:
    code = runner_train.main_with_flags([
        'bench', f'--workdir={workdir}', '--gin.train.num_epochs=None',
        f'--gin.train.num_steps={total}', f'--gin.train.batch_size={batch_size}',
        *_runner_flags(model, batch_size),
        f'--gin.train.log_every={window}', f'--gin.train.eval_every={total}',
        '--gin.checkpoint_policy.every_steps=0',
        '--gin.train.parallelism="single"'], hooks=[hook])
  if code:
    raise SystemExit(f'runner failed with status {code}')
  return pairs


def control(model, batch_size, windows, window):
  """``[(a steps/s, b steps/s)]`` of two identical bare loops, interleaved."""
  a, b = _bare(model, batch_size), _bare(model, batch_size)
  a.run(window)
  b.run(window)
  return [(window / a.run(window), window / b.run(window))
          for _ in range(windows)]


def _summary(pairs):
  ratios = sorted(x / y for x, y in pairs)
  q1, _, q3 = statistics.quantiles(ratios, n=4)
  return (statistics.median(y for _, y in pairs),
          statistics.median(x for x, _ in pairs),
          statistics.median(ratios), q1, q3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--scale', type=float, default=1.0,
                      help='multiplies the number of windows')
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}'
        f' ({jax.device_count()} device); interleaved windows of log_every'
        f' steps, after {args.warmup} warm-up windows', flush=True)
  rows = []
  for name, model, batch_size, window, windows in CONFIGS:
    windows = max(4, int(windows * args.scale))
    pairs = measure(model, batch_size, windows, window, args.warmup)
    runner = _summary(pairs)
    aa = _summary(control(model, batch_size, len(pairs), window))
    rows.append((name, runner, aa))
    print(f'  {name}: {len(pairs)} pairs of {window}-step windows each',
          file=sys.stderr, flush=True)
  print(f'{"config":26} {"bare steps/s":>12} {"runner steps/s":>14}'
        f' {"runner/bare (quartiles)":>24} {"A/A":>6} {"corrected":>9}')
  for name, (bare, run, ratio, q1, q3), aa in rows:
    print(f'{name:26} {bare:12.1f} {run:14.1f} {ratio:9.3f} ({q1:.3f}-{q3:.3f})'
          f' {aa[2]:6.3f} {ratio / aa[2]:9.3f}')
  for name, (bare, run, *_), _ in rows:
    if name.startswith('LM'):
      print(f'{name}: tokens/s bare {bare * 16 * LM_LENGTH:.0f},'
            f' runner {run * 16 * LM_LENGTH:.0f}')
  worst = min(r[1][2] for r in rows)
  worst_corrected = min(r[1][2] / r[2][2] for r in rows)
  print(f'worst runner/bare {worst:.3f}, corrected by the A/A control'
        f' {worst_corrected:.3f} (target >= 0.97)')


if __name__ == '__main__':
  main()
