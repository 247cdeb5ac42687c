r"""The input pipeline alone: tokens/s of packed ArrayRecord data.

    python bench/input_pipeline.py [--data=DIR] [--batches=200] [--workers=0,1,2]

Prepares the Python standard library's ``.py`` files with the byte
tokenizer (``gintrain data prepare``) unless ``--data`` names a prepared
folder, then reads ``--batches`` global batches of 32 rows of 128 tokens
through ``data.array_record`` (packing, global shuffle, the GrainSource)
with 0, 1 and 2 grain worker processes, each in a fresh process, and
prints tokens/s and peak RSS. ``--scale=10`` also reads a corpus 10 times
larger (the same shards listed 10 times) to show that memory stays flat.
Compare with the ``tokens_per_sec`` of an ``lm.gin`` run on the same
machine (the rate the model consumes).
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


def _measure(data, workers, batches):
  """In this (fresh) process: tokens/s and peak RSS."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  from gintrain.runner.data import base  # pylint: disable=import-outside-toplevel
  from gintrain.runner.data import corpora  # pylint: disable=import-outside-toplevel
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
          'peak_rss_mib': rss,
          'efficiency': source.info['packing_efficiency']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=None)
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--scale', type=int, default=10)
  parser.add_argument('--_child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:  # pylint: disable=protected-access
    data, workers = args._child.rsplit(':', 1)  # pylint: disable=protected-access
    print(json.dumps(_measure(data, int(workers), args.batches)))
    return
  tmp = tempfile.mkdtemp(prefix='input_pipeline_')
  try:
    data = args.data
    if data is None:
      data = os.path.join(tmp, 'stdlib')
      start = time.perf_counter()
      _prepare(data)
      print(f'prepared the stdlib in {time.perf_counter() - start:.1f} s')
    runs = [(data, int(w)) for w in args.workers.split(',')]
    if args.scale > 1:
      runs.append((_scaled(data, args.scale, os.path.join(tmp, 'scaled')),
                   0))
    for folder, workers in runs:
      out = subprocess.run(
          [sys.executable, __file__, f'--batches={args.batches}',
           f'--_child={folder}:{workers}'], check=True, capture_output=True,
          text=True).stdout.strip().splitlines()[-1]
      r = json.loads(out)
      size = 'x1' if folder == data else f'x{args.scale}'
      print(f'corpus {size} workers={r["workers"]}: {r["tokens_per_sec"]:,.0f}'
            f' tokens/s, peak RSS {r["peak_rss_mib"]:.0f} MiB, packing'
            f' efficiency {r["efficiency"]:.4%}', flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
