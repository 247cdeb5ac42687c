"""The runner's training throughput against a bare jitted loop.

Both train the same model on the same batches (``runner.batching`` order)
with the same step math (loss, gradient, optimizer update, accuracy), in
the same process, alternating repetitions so machine noise hits both alike.

* bare: ``state, metrics = jitted_step(state, batch)`` in a ``for`` loop; the
  time of steps ``warmup+1 .. warmup+steps`` is measured (compile excluded),
  ending with ``block_until_ready``.
* runner: ``runner.train.main_with_flags`` on the same config; its
  throughput is read from its own ``steps_per_sec`` records in
  ``metrics.jsonl`` (each covers one ``log_every`` interval, ending with the
  metrics fetch that synchronises), skipping the intervals before
  ``warmup``. The measured window holds everything the loop does per step
  (batch assembly, dispatch, metric buffering, hooks, preemption check,
  logging); evaluation and periodic checkpoints are set outside it.

    python bench/runner_overhead.py [--steps=2000] [--reps=3]

Prints a table: steps/s of each and the ratio runner / bare (target >= 0.97).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from runner import batching
from runner import datasets
from runner import losses
from runner import models
from runner import state as state_lib
from runner import train as runner_train

CONFIGS = {
    # name: (mlp features, batch size)
    'default (mlp 128, batch 64)': ((128,), 64),
    'wide (mlp 512x512, batch 256)': ((512, 512), 256),
}


def bare_loop(features, batch_size, lr, warmup, steps, seed=0):
  """Steps per second of a hand-written jitted loop."""
  data = datasets.digits()
  model = models.mlp(features=features, num_classes=10)
  tx = optax.adam(lr)
  state = state_lib.create_train_state(model, tx, jax.random.key(seed),
                                       data.x_train[:1])

  @jax.jit
  def step(state, batch):
    def objective(params):
      logits = model.apply({'params': params}, batch['x'])
      return losses.cross_entropy_loss(logits, batch['y']), logits
    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads), {
        'loss': loss, 'accuracy': losses.accuracy(logits, batch['y'])}

  n = len(data.x_train)
  start = None
  for s in range(warmup + steps):
    if s == warmup:
      jax.block_until_ready(state)
      start = time.perf_counter()
    idx = batching.global_batch_indices(n, batch_size, seed, s)
    state, _ = step(state, {'x': data.x_train[idx], 'y': data.y_train[idx]})
  jax.block_until_ready(state)
  return steps / (time.perf_counter() - start)


def runner_loop(features, batch_size, lr, warmup, steps, log_every):
  """Steps per second of the runner, from its own metrics records."""
  total = warmup + steps
  with tempfile.TemporaryDirectory() as workdir:
    code = runner_train.main_with_flags([
        'bench', f'--workdir={workdir}', '--gin.train.num_epochs=None',
        f'--gin.train.num_steps={total}', f'--gin.train.batch_size={batch_size}',
        f'--gin.mlp.features={tuple(features)}',
        f'--gin.optimizer.learning_rate={lr}',
        f'--gin.train.log_every={log_every}',
        f'--gin.train.eval_every={total}',
        '--gin.checkpoint_policy.every_steps=0',
        '--gin.train.parallelism="single"'])
    if code:
      raise SystemExit(f'runner failed with status {code}')
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      rows = [json.loads(line) for line in f]
  rows = [r for r in rows if r['split'] == 'train' and r['step'] > warmup]
  seconds = sum(log_every / r['steps_per_sec'] for r in rows)
  return len(rows) * log_every / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--warmup', type=int, default=200)
  parser.add_argument('--log_every', type=int, default=100)
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args()
  if args.warmup % args.log_every or args.steps % args.log_every:
    raise SystemExit('--warmup and --steps must be multiples of --log_every')
  logging.set_verbosity(logging.ERROR)
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind},'
        f' {args.steps} timed steps after {args.warmup} warm-up, median of'
        f' {args.reps} alternating repetitions', flush=True)
  rows = []
  for name, (features, batch_size) in CONFIGS.items():
    bare, run = [], []
    for rep in range(args.reps):
      bare.append(bare_loop(features, batch_size, 0.01, args.warmup,
                            args.steps))
      run.append(runner_loop(features, batch_size, 0.01, args.warmup,
                             args.steps, args.log_every))
      print(f'  {name} rep {rep + 1}: bare {bare[-1]:.0f} steps/s,'
            f' runner {run[-1]:.0f} steps/s', file=sys.stderr, flush=True)
    b, r = statistics.median(bare), statistics.median(run)
    rows.append((name, b, r, r / b))
  print(f'{"config":32} {"bare steps/s":>13} {"runner steps/s":>15}'
        f' {"runner/bare":>12}')
  for name, b, r, ratio in rows:
    print(f'{name:32} {b:13.0f} {r:15.0f} {ratio:12.3f}')
  worst = min(ratio for *_, ratio in rows)
  print(f'worst ratio {worst:.3f} (target >= 0.97):'
        f' {"OK" if worst >= 0.97 else "BELOW TARGET"}')


if __name__ == '__main__':
  main()
