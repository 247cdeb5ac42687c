"""Checkpoints on S3: gintrain save / cold restore vs s3fs's own put / get.

A local S3 API server (``moto_server`` on 127.0.0.1, a port in 24500-24599)
is started; a 1 GiB tree (16 float32 arrays of 64 MiB) is then

* saved with ``lib.checkpoints.save_checkpoint('s3://...')`` (streamed from
  the array buffers into a multipart upload, xxh3 sidecar included), and
  restored cold (a fresh process: no client, connection or file cache) with
  ``restore_checkpoint`` (download into a temporary staging file, sidecar
  check, decode);
* the very same bytes (the local checkpoint file of that tree) are uploaded
  with s3fs's ``put_file`` and downloaded with ``get_file`` to a local file
  (s3fs's own transfer paths), also in fresh processes.

Every measurement runs in a fresh subprocess, in alternating order, and the
ratios are gintrain / s3fs of the same run. Local files live in a temporary
directory (page cache warm: this measures the network path, not the disk).

Usage::

  python bench/s3_bench.py            # 1 GiB, 3 repeats
  python bench/s3_bench.py --small    # 64 MiB, 1 repeat

Needs s3fs and moto (``pip install 'gintrain[test]'``). Prints a markdown
table and writes it to ``bench/results/s3_bench.md``.
"""

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'bench', 'results', 's3_bench.md')
GIB = 2**30

_WORKER = r'''
import os, sys, time, warnings
warnings.simplefilter('ignore')
import numpy as np
import s3fs  # imported before timing, for both (a training process has it)
op, url, local, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def tree():
  n = 16
  words = total // 4 // n
  return {f'w{i}': np.full(words, i, np.float32) for i in range(n)}

if op in ('save', 'local_save'):
  from gintrain.lib import checkpoints
  t = tree()
  start = time.perf_counter()
  checkpoints.save_checkpoint(url if op == 'save' else local, t, 1,
                              overwrite=True)
elif op == 'restore':
  from gintrain.lib import checkpoints
  start = time.perf_counter()
  got = checkpoints.restore_checkpoint(url, None, step=1)
  assert got['w15'][0] == 15 and len(got) == 16
else:
  import fsspec
  fs, path = fsspec.core.url_to_fs(url)
  start = time.perf_counter()
  if op == 'put':
    fs.put_file(local, path)
  else:
    fs.get_file(path, local)
    assert os.path.getsize(local) > total
print(time.perf_counter() - start)
'''


def _free_port():
  for port in range(24500, 24600):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
        return port
      except OSError:
        continue
  raise RuntimeError('no free port in 24500-24599')


def _start_server(log):
  port = _free_port()
  exe = shutil.which('moto_server')
  cmd = ([exe] if exe else [sys.executable, '-m', 'moto.server']) + [
      '-H', '127.0.0.1', '-p', str(port)]
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
  endpoint = f'http://127.0.0.1:{port}'
  for _ in range(600):
    try:
      with urllib.request.urlopen(endpoint, timeout=2):
        return proc, endpoint
    except OSError:
      time.sleep(0.1)
  proc.kill()
  raise RuntimeError('moto_server did not start')


def _run(op, url, local, total, env):
  out = subprocess.run([sys.executable, '-c', _WORKER, op, url, local,
                        str(total)], env=env, capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise RuntimeError(f'{op} failed:\n{out.stderr[-3000:]}')
  return float(out.stdout.split()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--small', action='store_true')
  parser.add_argument('--repeat', type=int, default=None)
  args = parser.parse_args()
  total = GIB // 16 if args.small else GIB
  repeat = args.repeat or (1 if args.small else 3)
  tmp = tempfile.mkdtemp(prefix='gintrain-s3bench-')
  log = open(os.path.join(tmp, 'moto.log'), 'w', encoding='utf-8')
  proc, endpoint = _start_server(log)
  try:
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint,
               AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench',
               AWS_DEFAULT_REGION='us-east-1', JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join(
                   p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    env.pop('AWS_ENDPOINT_URL_S3', None)
    urllib.request.urlopen(urllib.request.Request(
        f'{endpoint}/bench', method='PUT'), timeout=30).close()
    local_dir = os.path.join(tmp, 'local')
    local_file = os.path.join(local_dir, 'checkpoint_1')
    _run('local_save', 's3://bench/x', local_dir, total, env)
    nbytes = os.path.getsize(local_file)
    times = {k: [] for k in ('save', 'put', 'restore', 'get')}
    for i in range(repeat):
      order = (('save', 'put'), ('put', 'save'))[i % 2]
      for op in order:
        if op == 'save':
          times['save'].append(_run('save', 's3://bench/ours', '', total,
                                    env))
        else:
          times['put'].append(_run('put', 's3://bench/theirs/checkpoint_1',
                                   local_file, total, env))
      order = (('restore', 'get'), ('get', 'restore'))[i % 2]
      for op in order:
        if op == 'restore':
          times['restore'].append(_run('restore', 's3://bench/ours', '',
                                       total, env))
        else:
          dest = os.path.join(tmp, 'got')
          times['get'].append(_run('get', 's3://bench/theirs/checkpoint_1',
                                   dest, total, env))
          os.remove(dest)
  finally:
    proc.terminate()
    proc.wait(30)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)

  med = {k: statistics.median(v) for k, v in times.items()}
  mib = nbytes / 2**20
  lines = [
      f'S3 checkpoints, {mib:.0f} MiB tree (16 float32 arrays), local'
      f' moto_server; median of {repeat} (each a fresh process);'
      f' {platform.node()}, {os.cpu_count()} CPUs.',
      '',
      '| operation | gintrain | s3fs (same bytes) | gintrain / s3fs |',
      '|---|---|---|---|',
      f'| save vs `put_file` | {med["save"]:.2f} s'
      f' ({mib / med["save"]:.0f} MiB/s) | {med["put"]:.2f} s'
      f' ({mib / med["put"]:.0f} MiB/s) | {med["save"] / med["put"]:.2f} |',
      f'| cold restore vs `get_file` | {med["restore"]:.2f} s'
      f' ({mib / med["restore"]:.0f} MiB/s) | {med["get"]:.2f} s'
      f' ({mib / med["get"]:.0f} MiB/s) |'
      f' {med["restore"] / med["get"]:.2f} |',
      '',
      'All runs (s): ' + '; '.join(
          f'{k} ' + ', '.join(f'{t:.2f}' for t in v)
          for k, v in times.items()),
  ]
  text = '\n'.join(lines)
  print(text)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  if not args.small:
    with open(RESULTS, 'w', encoding='utf-8') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
