"""Single-process checkpoint saves and restores with an integrity sidecar:
block hashes (version 2, ``lib.checkpoint_sidecar``) against the one hash
of the whole file they replaced (version 1), and against no sidecar.

Every round saves the same tree three ways in ABBA order (durable: fsync of
file and directory), then restores each file (warm: page cache) with its
sidecar checked by a whole read. Version 1 is the old writer: one
``xxh3_64`` streamed over the file (``Hasher`` swapped for it).

Usage::

  python bench/sidecar_bench.py --mib 512 --rounds 3

Prints the median seconds of each and the ratios (block hashes / whole
hash; / no sidecar), and the CPU seconds of the hashing alone (the file's
segments fed to each hasher, ABBA), which other load disturbs less.
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import xxhash

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_sidecar
from gintrain.lib import checkpoints


class _WholeHasher:
  """The version-1 writer: one hash of the whole file."""

  def __init__(self):
    self.hasher = xxhash.xxh3_64()

  def update(self, data):
    self.hasher.update(data)

  def text(self, nbytes):
    return f'xxh3_64 {self.hasher.hexdigest()} {nbytes}\n'.encode('ascii')


def _save(tree, d, kind, step):
  if kind == 'none':
    checkpoint_io.set_integrity_sidecar(False)
  else:
    checkpoint_io.set_integrity_sidecar(True)
  saved = checkpoint_sidecar.Hasher
  if kind == 'whole':
    checkpoint_sidecar.Hasher = _WholeHasher
  try:
    start = time.perf_counter()
    path = checkpoints.save_checkpoint(d, tree, step, keep=1)
    took = time.perf_counter() - start
  finally:
    checkpoint_sidecar.Hasher = saved
    checkpoint_io.set_integrity_sidecar('auto')
  return path, took


def main():
  warnings.simplefilter('ignore', DeprecationWarning)
  parser = argparse.ArgumentParser()
  parser.add_argument('--mib', type=int, default=512)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--dir', default=None)
  args = parser.parse_args()
  n = 8
  per = args.mib * (1 << 20) // n // 4
  tree = {f'w{i}': np.random.default_rng(i).random(per, np.float32)
          for i in range(n)}
  root = tempfile.mkdtemp(dir=args.dir)
  saves = {'none': [], 'whole': [], 'blocks': []}
  reads = {'none': [], 'whole': [], 'blocks': []}
  step = 0
  for r in range(args.rounds):
    order = ['whole', 'blocks', 'none']
    if r % 2:
      order.reverse()
    for kind in order + order[::-1]:  # ABBA
      step += 1
      path, took = _save(tree, os.path.join(root, kind), kind, step)
      saves[kind].append(took)
      start = time.perf_counter()
      checkpoint_io.read_checkpoint_file(path)
      reads[kind].append(time.perf_counter() - start)
  # The hashing alone (CPU seconds, so other load matters less): the
  # file's segments fed to each writer's hasher, ABBA.
  encoded = checkpoint_io.encode(tree)
  hashing = {'whole': [], 'blocks': []}
  for r in range(4 * args.rounds):
    for kind in (['whole', 'blocks'] if r % 2 else ['blocks', 'whole']):
      hasher = _WholeHasher() if kind == 'whole' else checkpoint_sidecar.Hasher()
      start = time.process_time()
      for segment in encoded.segments:
        hasher.update(segment if not isinstance(segment, np.ndarray) else
                      memoryview(segment.reshape(-1).view(np.uint8)))
      hasher.text(encoded.nbytes)
      hashing[kind].append(time.process_time() - start)
  load = os.getloadavg()[0]
  print(f'{args.mib} MiB, {args.rounds} rounds ABBA, load {load:.1f}')
  print('| | no sidecar | whole hash (v1) | block hashes (v2) | v2 / v1 |'
        ' v2 / none |')
  print('|---|---|---|---|---|---|')
  for name, table in (('durable save', saves), ('warm restore, checked',
                                                  reads)):
    med = {k: statistics.median(v) for k, v in table.items()}
    print(f'| {name} | {med["none"]:.3f} s | {med["whole"]:.3f} s |'
          f' {med["blocks"]:.3f} s | {med["blocks"] / med["whole"]:.3f} |'
          f' {med["blocks"] / med["none"]:.3f} |')
  med = {k: statistics.median(v) for k, v in hashing.items()}
  print(f'| hashing only (CPU s) | - | {med["whole"]:.3f} s |'
        f' {med["blocks"]:.3f} s | {med["blocks"] / med["whole"]:.3f} | - |')


if __name__ == '__main__':
  main()
