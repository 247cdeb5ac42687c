"""``gintrain ckpt inspect`` on a 2.5 GiB checkpoint: time and extra memory.

Writes a 2.5 GiB msgpack checkpoint (a runner-shaped tree: one 1.2 GB float32
leaf, chunked as lib writes it, plus 1.3 GB in 50 smaller arrays), then, each
in a fresh subprocess with the page cache as it is:

* ``inspect``: ``runner.cli.ckpt.inspect(path)`` (the structure only);
* ``restore`` (the baseline): ``lib.checkpoints.restore_checkpoint`` of the
  same file, which reads every array.

"Extra peak RSS" is the process's peak resident memory (``VmHWM``) after the
call minus its resident memory before it (the modules imported), with the
peak reset through ``/proc/self/clear_refs`` where allowed. The issue's
target: inspect in under a second with less than 50 MB extra.

Usage::

  python bench/ckpt_inspect.py [--dir DIR] [--gib 2.5] [--no-restore]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np

_CHILD = r'''
import json, os, sys, time, warnings
def rss(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
from gintrain.lib import checkpoints
from gintrain.runner.cli import ckpt
try:
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  reset = True
except OSError:
  reset = False
before = rss('VmRSS:')
t = time.perf_counter()
if sys.argv[1] == 'inspect':
  info = ckpt.inspect(sys.argv[2])
  n = len(info['leaves'])
else:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    tree = checkpoints.restore_checkpoint(sys.argv[2], target=None)
  n = len(tree)
seconds = time.perf_counter() - t
print(json.dumps({'seconds': seconds, 'extra': rss('VmHWM:') - before,
                  'reset': reset, 'leaves': n}))
'''


def _write(path, gib):
  from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top
  total = int(gib * 2**30)
  big = np.ones(min(1_200_000_000, total // 2) // 4, np.float32)
  rest = (total - big.nbytes) // 50 // 4
  tree = {'state': {'step': np.int32(1000),
                    'params': {f'layer_{i}': {'kernel': np.full(rest, i,
                                                                np.float32)}
                               for i in range(50)},
                    'opt_state': {'embedding': big}},
          'data': {'step': 1000}}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    return checkpoints.save_checkpoint(path, tree, 1000)


def _measure(what, path):
  out = subprocess.run([sys.executable, '-c', _CHILD, what, path],
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().split('\n')[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dir', default=None)
  parser.add_argument('--gib', type=float, default=2.5)
  parser.add_argument('--no-restore', action='store_true')
  args = parser.parse_args()
  folder = args.dir or tempfile.mkdtemp(prefix='ckpt_inspect_')
  try:
    path = _write(folder, args.gib)
    size = os.path.getsize(path)
    rows = [('inspect', _measure('inspect', path))]
    if not args.no_restore:
      rows.append(('restore (baseline)', _measure('restore', path)))
    print(f'file: {size / 2**30:.2f} GiB ({size:,} bytes)')
    print('| operation | seconds | extra peak RSS | vs restore |')
    print('|---|---:|---:|---:|')
    base = rows[-1][1]['seconds']
    for name, r in rows:
      print(f'| {name} | {r["seconds"]:.4f} | {r["extra"] / 2**20:.1f} MiB |'
            f' {base / r["seconds"]:.0f}x faster |' if name == 'inspect' and
            len(rows) > 1 else
            f'| {name} | {r["seconds"]:.4f} | {r["extra"] / 2**20:.1f} MiB |'
            ' |')
    if not rows[0][1]['reset']:
      print('(VmHWM could not be reset: the peak includes start-up)')
  finally:
    if args.dir is None:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
  main()
