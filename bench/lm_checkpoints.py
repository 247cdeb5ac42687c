"""What a checkpoint costs the training loop: asynchronous against synchronous.

A transformer language model whose train state (params and Adam's two
moments) is about 300 MB trains for ``--steps`` steps three times in one
process: without periodic checkpoints, with a synchronous save every
``--every`` steps, and with an asynchronous one. The loop time is measured
from the end of step ``every + 2`` (so the compilations are done: the first
step's, and that of the step after a save, which does not donate the state
the writer may still read) to the end of the last step (a hook after every
step, before that step's checkpoint). Then::

    sync cost per save  = (loop with sync saves  - loop without) / saves
    async cost per save = (loop with async saves - loop without) / saves

and the figure is their ratio (target <= 0.10: the loop pays for starting a
save, not for writing it). The order of the three runs rotates over
``--repeats`` rounds; medians are reported.

    python bench/lm_checkpoints.py [--steps=50] [--every=5] [--repeats=3]
"""

import argparse
import statistics
import tempfile
import time

import jax
from absl import logging

from gintrain.runner import train as runner_train

STATE_FLAGS = [
    '--gin_file=lm.gin', '--gin.transformer.width=512',
    '--gin.transformer.depth=6', '--gin.transformer.heads=8',
    '--gin.transformer.max_len=64', '--gin.text_files.length=64',
    '--gin.text_files.max_eval_examples=8', '--gin.train.batch_size=4',
    '--gin.train.eval_batch_size=4', '--gin.train.actions=[]',
    '--gin.train.parallelism="single"',
]


def loop_seconds(steps, every, mode):
  """Wall seconds from the end of step ``every + 2`` to the end of step
  ``steps``."""
  marks = {}

  def hook(step):
    if step in (every + 2, steps):
      jax.block_until_ready(jax.numpy.zeros(()))
      marks[step] = time.perf_counter()

  with tempfile.TemporaryDirectory() as workdir:
    flags = ['bench', f'--workdir={workdir}', *STATE_FLAGS,
             f'--gin.train.num_steps={steps}',
             f'--gin.train.eval_every={steps}',
             f'--gin.train.log_every={steps}',
             f'--gin.checkpoint_policy.every_steps='
             f'{0 if mode == "none" else every}',
             f'--gin.checkpoint_policy.async_save={mode == "async"}',
             '--gin.checkpoint_policy.keep=2']
    assert runner_train.main_with_flags(flags, hooks=[hook]) == 0
  return marks[steps] - marks[every + 2]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--every', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  # periodic saves inside the timed window (every+2, steps)
  saves = len(range(2 * args.every, args.steps, args.every))
  modes = ['none', 'sync', 'async']
  times = {m: [] for m in modes}
  for r in range(args.repeats):
    for mode in modes[r % 3:] + modes[:r % 3]:
      times[mode].append(loop_seconds(args.steps, args.every, mode))
      print(f'round {r}: {mode:5s} {times[mode][-1]:.2f} s', flush=True)
  med = {m: statistics.median(v) for m, v in times.items()}
  sync = (med['sync'] - med['none']) / saves
  async_ = (med['async'] - med['none']) / saves
  print(f'state ~300 MB, {args.steps} steps, a save every {args.every}'
        f' ({saves} in the loop); medians of {args.repeats}:')
  print(f'  loop without saves {med["none"]:.2f} s, with sync saves'
        f' {med["sync"]:.2f} s, with async saves {med["async"]:.2f} s')
  print(f'  per save: sync {sync:.3f} s, async {async_:.3f} s;'
        f' async/sync = {async_ / sync:.3f} (target <= 0.10)')


if __name__ == '__main__':
  main()
