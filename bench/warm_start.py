"""Cold vs warm starts of the LM (gin/lm.gin, shortened) with JAX's
persistent compilation cache (``--compilation_cache_dir``, on by default).

Launches the same short LM run three times as separate processes, each in a
fresh workdir: with the cache off (baseline), with an empty cache (cold:
compiles and fills it) and again (warm: reads the compiled steps back),
and prints each launch's time to first step and its compile part (the
first step, from the ``goodput`` records), median of ``--rounds`` rounds
(ABC order rotated per round).

    python bench/warm_start.py [--rounds=3] [--steps=3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def _launch(workdir, cache, steps):
  cmd = [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={workdir}',
         '--gin_file=lm.gin', f'--gin.train.num_steps={steps}',
         '--gin.train.log_every=1', '--gin.train.eval_every=1000',
         '--gin.text_files.max_eval_examples=64',
         '--gin.train.eval_batch_size=64', f'--compilation_cache_dir={cache}']
  subprocess.run(cmd, check=True, capture_output=True, timeout=900)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(l) for l in f]
  first = [r for r in records if r['split'] == 'goodput'][0]
  return first['time_to_first_step'], first['compile_seconds']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3)
  opts = parser.parse_args()
  results = {'off': [], 'cold': [], 'warm': []}
  root = tempfile.mkdtemp(prefix='warm_start_')
  try:
    for r in range(opts.rounds):
      cache = os.path.join(root, f'cache{r}')
      order = ['off', 'cold', 'warm']
      # cold must precede warm; rotate the baseline around them.
      order = order[r % 3:] + order[:r % 3]
      order = [k for k in order if k != 'warm']
      order.insert(order.index('cold') + 1, 'warm')
      for kind in order:
        workdir = os.path.join(root, f'{kind}{r}')
        results[kind].append(_launch(
            workdir, 'none' if kind == 'off' else cache, opts.steps))
        print(f'round {r} {kind}: time to first step'
              f' {results[kind][-1][0]:.1f} s, compile'
              f' {results[kind][-1][1]:.1f} s', flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print('| launch | time to first step (s) | first step + compile (s) |')
  print('|---|---|---|')
  for kind in ('off', 'cold', 'warm'):
    ttfs = statistics.median(x[0] for x in results[kind])
    comp = statistics.median(x[1] for x in results[kind])
    print(f'| {kind} | {ttfs:.1f} | {comp:.1f} |')
  off = statistics.median(x[1] for x in results['off'])
  warm = statistics.median(x[1] for x in results['warm'])
  print(f'warm/off compile ratio: {warm / off:.2f}')


if __name__ == '__main__':
  main()
