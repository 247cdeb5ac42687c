"""The runner's training throughput against a bare jitted loop.

Both train the same model on the same batches (``runner.batching`` order)
with the same step math (loss, gradient, optimizer update, accuracy), in the
same process, alternating repetitions so machine noise hits both alike.

* bare: ``state, metrics = jitted_step(state, batch)`` in a ``for`` loop.
* runner: ``runner.train.main_with_flags`` on the same config, with
  evaluation and periodic checkpoints outside the timed steps; the timed
  steps include everything the loop does per step (batch assembly,
  dispatch, metric buffering, hooks, preemption check, log lines every
  ``log_every`` steps with their metric fetch).

Timing: ``steps`` steps after ``warmup`` (compilation excluded). The bare
loop is timed between two ``block_until_ready``; the runner between two of
its own hook calls, each made one step after a log line's metric fetch
(which synchronises), so both windows start and end on a synchronised
device. Each window gives wall-clock steps/s and CPU steps/s (steps per
second of this process's CPU time, all threads): on a machine shared with
other jobs the wall clock also counts the time other processes run, the
CPU time does not, so the CPU figure is the steadier measure of the work
each loop does per step.

    python bench/runner_overhead.py [--steps=2000] [--reps=5]

Prints a table (medians over the repetitions) with the ratio runner / bare;
the target is >= 0.97.
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


def _clock():
  return time.perf_counter(), time.process_time()


def _rates(start, end, steps):
  return steps / (end[0] - start[0]), steps / (end[1] - start[1])


def bare_loop(features, batch_size, lr, warmup, steps, seed=0):
  """(wall, cpu) steps per second of a hand-written jitted loop."""
  data = datasets.digits()
  model = models.mlp(features=features, num_classes=10)
  state = state_lib.create_train_state(model, optax.adam(lr),
                                       jax.random.key(seed), data.x_train[:1])

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
  for s in range(warmup + steps):
    if s == warmup:
      jax.block_until_ready(state)
      start = _clock()
    idx = batching.global_batch_indices(n, batch_size, seed, s)
    state, _ = step(state, {'x': data.x_train[idx], 'y': data.y_train[idx]})
  jax.block_until_ready(state)
  return _rates(start, _clock(), steps)


def runner_loop(features, batch_size, lr, warmup, steps, log_every):
  """(wall, cpu) steps per second of the runner's loop."""
  first, last = warmup + 1, warmup + steps + 1
  total = last + log_every - 1
  marks = {}

  def mark(step):
    if step in (first, last):
      marks[step] = _clock()

  with tempfile.TemporaryDirectory() as workdir:
    code = runner_train.main_with_flags([
        'bench', f'--workdir={workdir}', '--gin.train.num_epochs=None',
        f'--gin.train.num_steps={total}', f'--gin.train.batch_size={batch_size}',
        f'--gin.mlp.features={tuple(features)}',
        f'--gin.optimizer.learning_rate={lr}',
        f'--gin.train.log_every={log_every}',
        f'--gin.train.eval_every={total}',
        '--gin.checkpoint_policy.every_steps=0',
        '--gin.train.parallelism="single"'], hooks=[mark])
  if code:
    raise SystemExit(f'runner failed with status {code}')
  return _rates(marks[first], marks[last], steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--warmup', type=int, default=200)
  parser.add_argument('--log_every', type=int, default=100)
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  if args.warmup % args.log_every or args.steps % args.log_every:
    raise SystemExit('--warmup and --steps must be multiples of --log_every')
  logging.set_verbosity(logging.ERROR)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}:'
        f' {args.steps} timed steps after {args.warmup}, medians of'
        f' {args.reps} alternating repetitions', flush=True)
  rows = []
  for name, (features, batch_size) in CONFIGS.items():
    bare, run = [], []
    for rep in range(args.reps):
      bare.append(bare_loop(features, batch_size, 0.01, args.warmup,
                            args.steps))
      run.append(runner_loop(features, batch_size, 0.01, args.warmup,
                             args.steps, args.log_every))
      print(f'  {name} rep {rep + 1}/{args.reps}: wall bare'
            f' {bare[-1][0]:.0f} runner {run[-1][0]:.0f}; cpu bare'
            f' {bare[-1][1]:.0f} runner {run[-1][1]:.0f} steps/s',
            file=sys.stderr, flush=True)
    for i, clock in enumerate(('wall', 'cpu')):
      b = statistics.median(r[i] for r in bare)
      r = statistics.median(r[i] for r in run)
      rows.append((name, clock, b, r, r / b))
  print(f'{"config":32} {"clock":>5} {"bare steps/s":>13}'
        f' {"runner steps/s":>15} {"runner/bare":>12}')
  for name, clock, b, r, ratio in rows:
    print(f'{name:32} {clock:>5} {b:13.0f} {r:15.0f} {ratio:12.3f}')
  for clock in ('wall', 'cpu'):
    worst = min(row[-1] for row in rows if row[1] == clock)
    print(f'worst {clock} ratio {worst:.3f} (target >= 0.97):'
          f' {"OK" if worst >= 0.97 else "below target"}')


if __name__ == '__main__':
  main()
