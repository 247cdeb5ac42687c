"""Checkpoint speed and memory: gintrain vs raw numpy, flax msgpack and Orbax.

For each tree (a 1 GiB pytree of 50 float32 arrays, and a 2.5 GiB one with a
1.2 GB leaf, chunked at 2**30 bytes) every measurement runs in a fresh
subprocess:

* ``numpy``: ``ndarray.tofile`` of every leaf into one file + fsync, and
  ``np.fromfile``: the limit of what the disk and page cache allow;
* ``flax``: flax's msgpack ``save_checkpoint`` (+ an fsync of the file, which
  flax does not do) and ``restore_checkpoint``;
* ``orbax``: ``ocp.PyTreeCheckpointer`` save (+ fsync of every file) and
  restore;
* ``gintrain``: ``lib.checkpoints`` save (durable: fsync of file and
  directory) and restore, and asynchronous saves through an ``AsyncManager``
  (caller-blocked time; tree of jax arrays, and of numpy arrays, which are
  copied).

Restores are cold: the page cache is dropped first when allowed (root:
``echo 3 > /proc/sys/vm/drop_caches``); the table says whether it worked.
"Extra peak RSS" is the peak resident memory during the operation minus the
resident memory before it (and minus the restored tree, for restores), read
from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``.

Usage::

  python bench/checkpoint_bench.py            # full run (~10 GB of disk I/O)
  python bench/checkpoint_bench.py --small    # 64 MiB and 160 MiB trees

Prints a markdown table and writes it to ``bench/results/checkpoint_bench.md``.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'bench', 'results', 'checkpoint_bench.md')

GIB = 2**30
# name -> (total bytes, number of leaves, bytes of the one big leaf or 0)
CASES = {
    '1 GiB, 50 leaves': (GIB, 50, 0),
    '2.5 GiB, 1.2 GB leaf': (int(2.5 * GIB), 21, 1_200_000_000),
}
SMALL_CASES = {
    '64 MiB, 50 leaves': (GIB // 16, 50, 0),
    '160 MiB, 75 MB leaf': (int(2.5 * GIB) // 16, 21, 75_000_000),
}

# Per tree, every method saves first (into its own directory); then the
# files, all equally old, are restored cold, numpy's and gintrain's once
# more right after (warm: the file is in the page cache). On a VM the first
# cold read after the saves can be much faster (the host still caches the
# data), so numpy and gintrain take turns reading first (use --repeat 2+).
SAVES = ['numpy', 'gintrain', 'gintrain_async_jax', 'gintrain_async_numpy',
         'flax', 'orbax']
RESTORES = ['numpy', 'gintrain', 'flax', 'orbax']
WARM_RESTORES = ['numpy', 'gintrain']

TARGETS = {
    'save': 0.8,  # durable save throughput >= 0.8x numpy
    'restore': 0.8,  # cold restore throughput >= 0.8x numpy
    'save_rss': 0.10,  # extra peak RSS of a save <= 10% of the tree
    'async_blocked': 0.05,  # caller-blocked time <= 5% of a sync save
}


# ---------------------------------------------------------------------------
# Worker side (one operation in a fresh process).


def leaf_sizes(total: int, n: int, big: int) -> list[int]:
  """Element counts of the float32 leaves."""
  if big:
    rest = total - big
    return [big // 4] + [rest // 4 // (n - 1)] * (n - 1)
  return [total // 4 // n] * n


def make_tree(sizes, kind: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if kind == 'jax':
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    arange = lambda n, i: (jnp.arange(n, dtype=jnp.float32) + i)
  else:
    arange = lambda n, i: np.arange(n, dtype=np.float32) + np.float32(i)
  tree = {'params': {f'layer_{i}': {'w': arange(n, i)}
                     for i, n in enumerate(sizes)}, 'step': 1}
  if kind == 'jax':
    for layer in tree['params'].values():
      layer['w'].block_until_ready()
  return tree


def leaves(tree):
  params = tree['params']
  return [params[f'layer_{i}']['w'] for i in range(len(params))]


def drop_caches() -> bool:
  os.sync()
  try:
    with open('/proc/sys/vm/drop_caches', 'w') as f:
      f.write('3\n')
    return True
  except OSError:
    return False


def _status_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


class PeakRss:
  """Peak RSS during a block, minus RSS at its start (bytes)."""

  def __enter__(self):
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5\n')  # resets VmHWM to the current RSS
    self.start = _status_kib('VmRSS') * 1024
    return self

  def __exit__(self, *exc):
    self.extra = _status_kib('VmHWM') * 1024 - self.start


def fsync_tree(path: str) -> None:
  """fsyncs every file and directory under ``path`` (or the file itself)."""
  if os.path.isfile(path):
    paths = [path]
  else:
    paths = [path]
    for root, dirs, files in os.walk(path):
      paths += [os.path.join(root, n) for n in dirs + files]
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  fd = os.open(os.path.dirname(path), os.O_RDONLY)
  os.fsync(fd)
  os.close(fd)


def worker(method: str, op: str, total: int, n: int, big: int,
           directory: str) -> dict:
  """Runs one operation; returns its measurements."""
  import warnings  # pylint: disable=g-import-not-at-top
  warnings.simplefilter('ignore')
  import numpy as np  # pylint: disable=g-import-not-at-top
  sizes = leaf_sizes(total, n, big)
  nbytes = sum(sizes) * 4
  result = {'bytes': nbytes}
  path = os.path.join(directory, 'checkpoint_1')
  if method == 'flax':
    import flax  # pylint: disable=g-import-not-at-top
    from flax.training import checkpoints as flax_ckpt  # pylint: disable=g-import-not-at-top
    flax.config.update('flax_use_orbax_checkpointing', False)
  elif method == 'orbax':
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  elif method.startswith('gintrain'):
    from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top

  if op == 'save':
    kind = 'jax' if method == 'gintrain_async_jax' else 'numpy'
    tree = make_tree(sizes, kind)
    with PeakRss() as rss:
      start = time.perf_counter()
      if method == 'numpy':
        with open(path, 'wb') as f:
          for leaf in leaves(tree):
            leaf.tofile(f)
          f.flush()
          os.fsync(f.fileno())
      elif method == 'flax':
        flax_ckpt.save_checkpoint(directory, tree, 1)
        fsync_tree(path)
      elif method == 'orbax':
        ocp.PyTreeCheckpointer().save(path, tree)
        fsync_tree(path)
      elif method == 'gintrain':
        checkpoints.save_checkpoint(directory, tree, 1)
      else:  # async
        manager = checkpoints.AsyncManager()
        checkpoints.save_checkpoint(directory, tree, 1,
                                    async_manager=manager)
        result['blocked_s'] = time.perf_counter() - start
        manager.wait_previous_save()
      result['seconds'] = time.perf_counter() - start
    result['extra_rss'] = rss.extra
    return result

  result['cold'] = drop_caches() if op == 'restore' else False
  with PeakRss() as rss:
    start = time.perf_counter()
    if method == 'numpy':
      with open(path, 'rb') as f:
        out = [np.fromfile(f, np.float32, count) for count in sizes]
    elif method == 'flax':
      out = flax_ckpt.restore_checkpoint(directory, None)
    elif method == 'orbax':
      out = ocp.PyTreeCheckpointer().restore(path)
    else:
      out = checkpoints.restore_checkpoint(directory, None)
    result['seconds'] = time.perf_counter() - start
  if method != 'numpy':
    out = leaves(out)
  last = np.float32(sizes[-1] - 1) + np.float32(len(sizes) - 1)
  assert [a.size for a in out] == sizes and out[-1][-1] == last, (
      'restored values are wrong')
  result['extra_rss'] = rss.extra - nbytes
  return result


# ---------------------------------------------------------------------------
# Driver.


def run_worker(method, op, case, directory) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  cmd = [sys.executable, os.path.abspath(__file__), '--worker',
         json.dumps([method, op, *case, directory])]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       timeout=1800, check=False)
  if out.returncode:
    raise RuntimeError(f'{method} {op} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_mib(b: float) -> str:
  return f'{b / 2**20:,.0f}'


def measure(cases, scratch, repeat: int) -> list[dict]:
  """Runs every (method, op) ``repeat`` times; keeps the fastest run."""
  best = {}
  for round_ in range(repeat):
    for name, case in cases.items():
      directory = {m: tempfile.mkdtemp(prefix=f'{m}_', dir=scratch)
                   for m in SAVES}
      restores = list(RESTORES)
      if round_ % 2:  # swap neighbours: numpy and gintrain take turns first
        restores[0::2], restores[1::2] = restores[1::2], restores[0::2]
      runs = [(m, 'save') for m in SAVES]
      for m in restores:
        runs.append((m, 'restore'))
        if m in WARM_RESTORES:
          runs.append((m, 'restore_warm'))
      for method, op in runs:
        print(f'[{round_ + 1}/{repeat}] [{name}] {method} {op} ...',
              file=sys.stderr, flush=True)
        r = run_worker(method, op, case, directory[method])
        r.update(case=name, method=method, op=op)
        print(f'  {r["seconds"]:.2f} s', file=sys.stderr, flush=True)
        key = (name, method, op)
        if key not in best or r['seconds'] < best[key]['seconds']:
          best[key] = r
      for d in directory.values():
        shutil.rmtree(d, ignore_errors=True)
  order = {(m, op): i for i, (m, op) in enumerate(
      [(m, op) for m in SAVES for op in ('save', 'restore', 'restore_warm')])}
  return sorted(best.values(), key=lambda r: (list(cases).index(r['case']),
                                              order[r['method'], r['op']]))


def table(rows) -> tuple[str, list[str]]:
  lines = [
      '| tree | method | operation | seconds | GB/s | vs numpy |'
      ' extra peak RSS MiB (% of tree) | notes |',
      '|---|---|---|---:|---:|---:|---:|---|']
  missed = []
  numpy = {(r['case'], r['op']): r['seconds'] for r in rows
           if r['method'] == 'numpy'}
  sync_save = {r['case']: r['seconds'] for r in rows
               if r['method'] == 'gintrain' and r['op'] == 'save'}
  for r in rows:
    ref = numpy.get((r['case'], r['op']))
    ratio = ref / r['seconds'] if ref else float('nan')
    rss_frac = r['extra_rss'] / r['bytes']
    notes = []
    if r['op'].startswith('restore'):
      notes.append('cold cache' if r['cold'] else 'warm cache')
    if r['op'] == 'save' and r['method'] in ('flax', 'orbax'):
      notes.append('+ fsync by the benchmark')
    if 'blocked_s' in r:
      frac = r['blocked_s'] / sync_save[r['case']]
      notes.append(f'caller blocked {r["blocked_s"] * 1e3:.1f} ms'
                   f' = {frac:.1%} of a sync save')
      if frac > TARGETS['async_blocked']:
        missed.append(f'{r["case"]}: {r["method"]} blocked {frac:.1%} of a'
                      f' sync save (target <= 5%)')
    if r['method'] == 'gintrain':
      if r['op'] == 'save' and ratio < TARGETS['save']:
        missed.append(f'{r["case"]}: durable save {ratio:.2f}x numpy'
                      ' (target >= 0.8x)')
      if r['op'] == 'restore' and ratio < TARGETS['restore']:
        missed.append(f'{r["case"]}: cold restore {ratio:.2f}x numpy'
                      ' (target >= 0.8x)')
      if r['op'] == 'save' and rss_frac > TARGETS['save_rss']:
        missed.append(f'{r["case"]}: save extra RSS {rss_frac:.1%}'
                      ' (target <= 10%)')
    lines.append(
        f'| {r["case"]} | {r["method"]} | {r["op"]} | {r["seconds"]:.2f} |'
        f' {r["bytes"] / 1e9 / r["seconds"]:.2f} | {ratio:.2f}x |'
        f' {fmt_mib(r["extra_rss"])} ({rss_frac:.1%}) | {"; ".join(notes)} |')
  return '\n'.join(lines), missed


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--small', action='store_true',
                      help='64 MiB and 160 MiB trees (a quick run)')
  parser.add_argument('--repeat', type=int, default=2,
                      help='runs of each measurement; the fastest is kept')
  parser.add_argument('--dir', default=None,
                      help='scratch directory (default: a temporary one)')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(*json.loads(args.worker))))
    return

  cases = SMALL_CASES if args.small else CASES
  scratch = tempfile.mkdtemp(prefix='ckpt_bench_', dir=args.dir)
  try:
    rows = measure(cases, scratch, args.repeat)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  body, missed = table(rows)
  cold = all(r['cold'] for r in rows if r['op'] == 'restore')
  mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB
  header = (
      f'# Checkpoint benchmark{" (--small)" if args.small else ""}\n\n'
      f'Machine: {os.cpu_count()} cores, {mem:.0f} GiB RAM,'
      f' {platform.platform()}; Python {platform.python_version()}.\n'
      f'Page cache dropped before cold restores: {"yes" if cold else "NO"}.\n'
      f'Each figure is the fastest of {args.repeat} runs (the machine is'
      ' shared). GB/s = 1e9 bytes of arrays per second; "vs numpy" = numpy'
      ' seconds / seconds (same operation; >1 is faster).\n\n')
  verdict = ('\n\nAll targets met (durable save and cold restore >= 0.8x'
             ' numpy, save extra RSS <= 10% of the tree, async caller-blocked'
             ' time <= 5% of a sync save).\n' if not missed else
             '\n\nMissed targets:\n' + ''.join(f'- {m}\n' for m in missed))
  report = header + body + verdict
  print(report)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w') as f:
    f.write(report)


if __name__ == '__main__':
  main()
