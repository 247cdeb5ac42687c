r"""The input pipeline alone: tokens/s of packed ArrayRecord data; and the
``data_wait_fraction`` of real ``lm.gin`` runs.

    python bench/input_pipeline.py [--data=DIR] [--batches=200] [--workers=0,1,2]
        [--rounds=2] [--lm_steps=0]

Prepares the Python standard library's ``.py`` files with the byte
tokenizer (``gintrain data prepare``) unless ``--data`` names a prepared
folder, then reads ``--batches`` global batches of 32 rows of 128 tokens
through ``data.array_record`` (packing, global shuffle, the GrainSource)
with 0, 1 and 2 grain worker processes, each in a fresh process, and
prints tokens/s and peak RSS. Each setting runs ``--rounds`` times in ABBA
order (first, last, last, first, ...), beside two baselines measured in
the same rounds: packing without its recent-document cache (``nocache``:
every row reads its whole document, as before the cache) and grain's own
read-ahead (``grain-default``: 16 threads, 500 batches ahead). The load
average is printed beside the figures. ``--scale=10`` also reads a corpus
10 times larger (the same shards listed 10 times) to show that memory
stays flat.

``--lm_steps=N`` also trains ``lm.gin`` for N steps twice, from the
standard library's text files (``datasets/text_files.gin``) and from the
prepared folder (``data.array_record``), and prints each run's
``data_wait_fraction`` per logging interval (the first interval holds the
compilation), its tokens/s and the load average: the rate the model
consumes, to set beside the pipeline's.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time


def _prepare(out):
  cmd = [sys.executable, '-m', 'gintrain.runner.train', 'data', 'prepare',
         f'--out={out}', '--pattern=*.py', '--shard_mb=4', '--no_progress',
         sysconfig.get_paths()['stdlib']]
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _scaled(data, scale, out):
  """A folder listing ``data``'s shards ``scale`` times (symlinks)."""
  with open(os.path.join(data, 'manifest.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  shards = []
  os.makedirs(out, exist_ok=True)
  for k in range(scale):
    for s in manifest['shards']:
      name = f'copy{k}-{s["file"]}'
      for suffix in ('', '.lengths.npy'):
        link = os.path.join(out, name + suffix)
        if not os.path.exists(link):
          os.symlink(os.path.join(data, s['file'] + suffix), link)
      shards.append({**s, 'file': name})
  manifest.update(shards=shards, documents=manifest['documents'] * scale,
                  tokens=manifest['tokens'] * scale)
  with open(os.path.join(out, 'manifest.json'), 'w', encoding='utf-8') as f:
    json.dump(manifest, f)
  return out


def _measure(data, workers, batches, variant):
  """In this (fresh) process: tokens/s and peak RSS."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  from gintrain.runner.data import base  # pylint: disable=import-outside-toplevel
  from gintrain.runner.data import corpora  # pylint: disable=import-outside-toplevel
  from gintrain.runner.data import grain_source  # pylint: disable=import-outside-toplevel
  from gintrain.runner.data import packing  # pylint: disable=import-outside-toplevel
  if variant == 'nocache':
    packing.CACHED_DOCUMENTS = 0
  elif variant == 'grain-default':
    grain_source.PREFETCH_BATCHES, grain_source.READ_THREADS = 500, 16
  source = corpora.array_record(data, length=128, worker_count=workers,
                                max_eval_examples=8)
  source.bind(base.Spec(batch_size=32, eval_batch_size=32, seed=0))
  for _ in range(3):  # start-up (workers) outside the clock
    source.next_batch()
  start = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    batch = source.next_batch()
    tokens += int((batch['segment_ids'][:, 1:] > 0).sum())
  seconds = time.perf_counter() - start
  source.close()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {'workers': workers, 'tokens_per_sec': tokens / seconds,
          'peak_rss_mib': rss, 'variant': variant,
          'efficiency': source.info['packing_efficiency']}


def _load():
  return ' '.join(f'{x:.1f}' for x in os.getloadavg())


def _lm(name, data, steps, tmp):
  """Trains lm.gin for ``steps`` from the text files or ``data``."""
  workdir = os.path.join(tmp, f'lm_{name}')
  cmd = [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={workdir}',
         '--gin_file=lm.gin', f'--gin.train.num_steps={steps}',
         f'--gin.train.log_every={max(1, steps // 4)}',
         '--gin.train.eval_every=1000000',
         '--gin.checkpoint_policy.every_steps=1000000']
  if name == 'array_record':
    cmd += ['--gin.train.dataset=@data.array_record()',
            f"--gin.array_record.paths='{data}'"]
  before = _load()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    train = [r for r in map(json.loads, f) if r.get('split') == 'train']
  waits = ', '.join(f'{r["data_wait_fraction"]:.2%}' for r in train)
  rate = sum(r['tokens_per_sec'] for r in train[1:]) / max(
      len(train) - 1, 1)
  print(f'lm.gin from {name}, {steps} steps: data_wait_fraction per'
        f' interval {waits}; {rate:,.0f} tokens/s after the first'
        f' interval; load average {before} -> {_load()}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=None)
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--scale', type=int, default=10)
  parser.add_argument('--lm_steps', type=int, default=0)
  parser.add_argument('--_child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:  # pylint: disable=protected-access
    data, workers, variant = args._child.rsplit(':', 2)  # pylint: disable=protected-access
    print(json.dumps(_measure(data, int(workers), args.batches, variant)))
    return
  tmp = tempfile.mkdtemp(prefix='input_pipeline_')
  try:
    data = args.data
    if data is None:
      data = os.path.join(tmp, 'stdlib')
      start = time.perf_counter()
      _prepare(data)
      print(f'prepared the stdlib in {time.perf_counter() - start:.1f} s')
    runs = [(data, int(w), 'default') for w in args.workers.split(',')]
    runs += [(data, 0, 'nocache'), (data, 0, 'grain-default')]
    rounds = []
    for r in range(args.rounds):
      rounds += runs if r % 2 == 0 else runs[::-1]
    if args.scale > 1:
      rounds.append((_scaled(data, args.scale, os.path.join(tmp, 'scaled')),
                     0, 'default'))
    for folder, workers, variant in rounds:
      load = _load()
      out = subprocess.run(
          [sys.executable, __file__, f'--batches={args.batches}',
           f'--_child={folder}:{workers}:{variant}'], check=True,
          capture_output=True, text=True).stdout.strip().splitlines()[-1]
      r = json.loads(out)
      size = 'x1' if folder == data else f'x{args.scale}'
      print(f'corpus {size} workers={r["workers"]} {variant}:'
            f' {r["tokens_per_sec"]:,.0f} tokens/s, peak RSS'
            f' {r["peak_rss_mib"]:.0f} MiB, packing efficiency'
            f' {r["efficiency"]:.4%} (load average {load})', flush=True)
    if args.lm_steps:
      for name in ('text_files', 'array_record'):
        _lm(name, data, args.lm_steps, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
