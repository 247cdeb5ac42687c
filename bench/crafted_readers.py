"""The checkpoint readers on crafted files: time against msgpack's own
decoder, and the CLI's peak memory (issue 18, item 6).

Files (written to a temporary folder):

* ``empties``: a map of N empty float32 arrays (default 2,000,000, about
  40 MiB): ``lib.checkpoint_io.read_checkpoint_file`` (the restore path)
  against ``lib.serialization.msgpack_restore`` of the same bytes
  (msgpack's C decoder with our hooks), best of ``--repeat``; the target is
  a ratio of at most 3.
* ``inspect``: ``gintrain ckpt inspect`` of a million empty arrays in a
  fresh process: its wall time and peak RSS (it stops at the memory bound
  of ``lib.msgpack_stream`` with one line).

Usage::

  python bench/crafted_readers.py [--n 2000000] [--repeat 3]
"""

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time

from gintrain.lib import checkpoint_io
from gintrain.lib import serialization


def empties(n: int) -> bytes:
  payload = b'\x93\x91\x00\xa7float32\xc4\x00'  # [[0], 'float32', b'']
  value = b'\xc7' + bytes([len(payload), 1]) + payload
  parts = [b'\xdf' + struct.pack('>I', n)]
  for i in range(n):
    key = b'%x' % i
    parts.append(bytes([0xa0 | len(key)]) + key + value)
  return b''.join(parts)


def best(fn, repeat):
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--n', type=int, default=2_000_000)
  parser.add_argument('--repeat', type=int, default=3)
  args = parser.parse_args()
  folder = tempfile.mkdtemp(prefix='crafted-')
  path = os.path.join(folder, 'checkpoint_1')
  data = empties(args.n)
  with open(path, 'wb') as f:
    f.write(data)
  ours = best(lambda: checkpoint_io.read_checkpoint_file(path), args.repeat)
  theirs = best(lambda: serialization.msgpack_restore(data), args.repeat)
  print(f'restore of {args.n:,} empty arrays ({len(data) / 2**20:.1f} MiB):'
        f' read_checkpoint_file {ours:.2f} s, msgpack_restore {theirs:.2f} s,'
        f' ratio {ours / theirs:.2f}')
  small = os.path.join(folder, 'checkpoint_2')
  with open(small, 'wb') as f:
    f.write(empties(1_000_000))
  code = ('import resource, sys, time\n'
          't = time.perf_counter()\n'
          'from gintrain.runner.cli import ckpt\n'
          'base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
          't = time.perf_counter()\n'
          'ckpt.main(["inspect", sys.argv[1]])\n'
          'print(time.perf_counter() - t,'
          ' resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,'
          ' base >> 10)\n')
  out = subprocess.run([sys.executable, '-c', code, small], check=True,
                       capture_output=True, text=True)
  seconds, peak, base = out.stdout.split()
  print(f'ckpt inspect of 1,000,000 empty arrays'
        f' ({os.path.getsize(small) / 2**20:.1f} MiB): {float(seconds):.2f} s,'
        f' peak RSS {peak} MiB ({base} MiB after imports);'
        f' {out.stderr.strip().splitlines()[-1]}')


if __name__ == '__main__':
  main()
