"""Sharded checkpoints side by side: ours (packed and zarr layouts), Orbax's
StandardCheckpointer, and the numpy limit for the same bytes per process.

Phase 1: 2 processes x 2 CPU devices (``launch/local.sh``, 127.0.0.1) hold a
state of ``--gib`` GiB (float32 arrays of 4096 rows) split over the 4
devices (FSDP, ``P('data')``). Each method saves it and restores it twice:

* ``packed``: ``lib.checkpoints.save_checkpoint_multiprocess(...,
  array_format='packed')`` (two files per process), restored with
  ``runner.outputs.checkpoints.read_arrays``;
* ``zarr``: the same with flax's per-array zarr layout;
* ``orbax``: ``orbax.checkpoint.StandardCheckpointer`` (its default OCDBT +
  zarr3 format), ``save`` + ``wait_until_finished``, ``restore`` into
  ``ShapeDtypeStruct``s with the shardings;
* ``numpy``: each process ``tofile`` + fsync of the bytes it holds, then
  ``np.fromfile``: what the disk and page cache allow.

Restores: into the saved shardings (``same``), and into column slices
``P(None, 'data')`` (``other``: every device needs part of every stored
slice). Methods run in ABBA order (the order of round 1 reversed in round
2, ...); each figure is the best of ``--rounds``, the time of the slower
process. Every save ends with ``os.sync()`` so that all are durable.
Restores read a warm page cache; each restore (numpy's too) runs
``--restores`` times in a row within a round, the previous result freed
first, and the best counts: the first restore of a process pays for
mapping fresh memory (on this VM up to seconds for 512 MiB, whichever
method goes first), which says nothing about the method.

Phase 2 (elastic, 2x2 -> 1x4): one process with 4 devices restores the
packed and Orbax checkpoints of phase 1 into ``P('data')``; numpy reads the
two files of phase 1. It then writes the state as one process does: our
msgpack file (``save_checkpoint``), Orbax's checkpoint and one numpy file.

Phase 3 (1x4 -> 2x2): 2 processes x 2 devices restore those into
``P('data')`` (``lib.checkpoints_multiprocess.restore_checkpoint`` with
``ShapeDtypeStruct`` targets: each process reads only its rows), against
numpy's ``fromfile`` of the same bytes per process and the old way (each
process reads the whole file, then places its slices).

  python bench/sharded_checkpoint_bench.py [--gib 1] [--rounds 2] [--restores 3]

Prints a markdown table, also written to
``bench/results/sharded_checkpoint_bench.md``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'bench', 'results',
                       'sharded_checkpoint_bench.md')
ROWS = 4096
LEAF_BYTES = 64 * 2**20
METHODS = ('packed', 'packed-copy', 'zarr', 'orbax', 'numpy')


def _count_files(path):
  return sum(len(files) for _, _, files in os.walk(path))


def _worker(args, flags):
  import jax  # pylint: disable=g-import-not-at-top
  if int(flags.get('process_count', 1)) > 1:
    jax.distributed.initialize(flags['coordinator_address'],
                               int(flags['process_count']),
                               int(flags['process_index']))
  import warnings  # pylint: disable=g-import-not-at-top
  warnings.simplefilter('ignore', DeprecationWarning)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.experimental.array_serialization import serialization as ser  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import checkpoints as runner_ckpt  # pylint: disable=g-import-not-at-top

  me, count = jax.process_index(), jax.process_count()
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows, cols = NamedSharding(mesh, P('data')), NamedSharding(
      mesh, P(None, 'data'))
  n = int(args.gib * 2**30 // LEAF_BYTES)
  width = LEAF_BYTES // 4 // ROWS

  def make():
    keys = jax.random.split(jax.random.key(0), n)
    return {f'layer_{i:03d}': jax.random.normal(keys[i], (ROWS, width))
            for i in range(n)}
  shapes = jax.eval_shape(make)
  root = args.dir
  out = {}

  def barrier(name):
    if count > 1:
      multihost_utils.sync_global_devices(name)

  def timed(name, fn):
    barrier(f'start {name}')
    t = time.perf_counter()
    result = fn()
    barrier(f'end {name}')
    mine = time.perf_counter() - t
    if count > 1:
      mine = float(np.max(multihost_utils.process_allgather(np.float64(mine))))
    out[name] = min(out.get(name, float('inf')), mine)
    return result

  def restored(name, fn):
    """``timed`` ``--restores`` times in a row, each result freed before
    the next restore; returns the last."""
    result = None
    for _ in range(args.restores):
      result = None
      result = timed(name, fn)
    return result

  def status(key):
    with open('/proc/self/status', encoding='ascii') as f:
      return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

  def rss_begin():
    """Resets VmHWM to the current RSS; returns that RSS."""
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
      f.write('5\n')
    return status('VmRSS:')

  def rss_end(key, begin):
    """The peak RSS over ``begin``, the largest of all processes and rounds."""
    extra = float(status('VmHWM:') - begin)
    if count > 1:
      extra = float(np.max(multihost_utils.process_allgather(
          np.float64(extra))))
    out[key] = max(out.get(key, 0.0), extra)

  def check(tree, want):
    assert all(bool((tree[k] == want[k]).all()) for k in shapes)

  ours_path = lambda fmt: os.path.join(root, fmt, 'checkpoint_1')  # pylint: disable=unnecessary-lambda-assignment
  orbax_path = os.path.join(root, 'orbax', 'ckpt')

  def restore_ours(fmt, sharding):
    path = ours_path(fmt)
    raw = checkpoint_io.read_checkpoint_file(path)
    tree = runner_ckpt.read_arrays(path, raw, {'state': {
        k: sharding for k in shapes}})
    return jax.block_until_ready(tree['state'])

  def restore_orbax(sharding):
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
              for k, v in shapes.items()}
    return jax.block_until_ready(ocp.StandardCheckpointer().restore(
        orbax_path, target))

  single_path = os.path.join(root, 'single', 'checkpoint_1')
  single_orbax = os.path.join(root, 'orbax-single', 'ckpt')
  single_numpy = os.path.join(root, 'numpy_single.bin')
  if args.phase == 'elastic':  # one process reads what two wrote
    state = jax.jit(make, out_shardings={k: rows for k in shapes})()
    for r in range(args.rounds):
      for method in (('packed', 'orbax', 'numpy') if r % 2 == 0 else
                     ('numpy', 'orbax', 'packed')):
        if method == 'packed':
          got = restored('packed elastic', lambda: restore_ours('packed', rows))
        elif method == 'orbax':
          got = restored('orbax elastic', lambda: restore_orbax(rows))
        else:
          got = None
          restored('numpy elastic', lambda: [np.fromfile(os.path.join(
              root, f'numpy_{i}.bin'), np.float32) for i in range(2)])
        if got is not None:
          check(got, state)
        del got
    # The checkpoints of one process, for the 'scatter' phase: ours (one
    # msgpack file, as a 1-process run writes it), Orbax's and numpy's.
    checkpoints.save_checkpoint(os.path.dirname(single_path),
                                {'state': state}, 1)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(single_orbax, state)
    ckptr.wait_until_finished()
    with open(single_numpy, 'wb') as f:
      for k in sorted(shapes):
        np.asarray(state[k]).tofile(f)
    os.sync()
    print('RESULT ' + json.dumps(out), flush=True)
    return

  if args.phase == 'scatter':  # two processes read what one wrote
    from gintrain.lib import checkpoints_multiprocess  # pylint: disable=g-import-not-at-top
    from gintrain.lib import msgpack_slices  # pylint: disable=g-import-not-at-top
    state = jax.jit(make, out_shardings={k: rows for k in shapes})()
    target = {'state': {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                sharding=rows)
                        for k, v in shapes.items()}}
    half = sum(int(np.prod(v.shape)) for v in shapes.values()) // count

    def ours():
      return jax.block_until_ready(checkpoints_multiprocess.restore_checkpoint(
          single_path, target)['state'])

    def whole():  # what the restore did before: the whole file, then placed
      raw = checkpoint_io.read_checkpoint_file(single_path)['state']
      return jax.block_until_ready({k: jax.make_array_from_callback(
          v.shape, rows, lambda i, v=raw[k]: v[i]) for k, v in shapes.items()})
    for r in range(args.rounds):
      for method in (('ours', 'whole', 'orbax', 'numpy') if r % 2 == 0 else
                     ('numpy', 'orbax', 'whole', 'ours')):
        got = None
        if method == 'ours':
          before = msgpack_slices.bytes_read()
          got = restored('single ours', ours)
          read = float(msgpack_slices.bytes_read() - before) / args.restores
          if count > 1:
            read = float(np.max(multihost_utils.process_allgather(
                np.float64(read))))
          out['single ours bytes read'] = read
        elif method == 'whole':
          got = restored('single whole', whole)
        elif method == 'orbax':
          got = restored('single orbax', lambda: jax.block_until_ready(
              ocp.StandardCheckpointer().restore(single_orbax, target[
                  'state'])))
        else:
          restored('single numpy', lambda: np.fromfile(
              single_numpy, np.float32, count=half, offset=me * half * 4))
        if got is not None:
          check(got, state)
        del got
    out['single bytes per process'] = half * 4
    if me == 0:
      print('RESULT ' + json.dumps(out), flush=True)
    return

  state = jax.jit(make, out_shardings={k: rows for k in shapes})()
  jax.block_until_ready(state)
  manager = ser.GlobalAsyncCheckpointManager(timeout_secs=600)
  mine = [np.asarray(s.data) for k in sorted(shapes)
          for s in state[k].addressable_shards]
  npath = os.path.join(root, f'numpy_{me}.bin')

  def clear(path):
    barrier(f'clear {path}')
    if me == 0 and os.path.exists(path):
      shutil.rmtree(path)
    barrier(f'cleared {path}')

  def save(method):
    begin = rss_begin()
    if method in ('packed', 'packed-copy', 'zarr'):
      clear(os.path.join(root, method))
      # packed: the runner's way (the arrays stay valid until the save is
      # complete: nothing copied before returning); packed-copy: the
      # library's default (a host copy before returning, as the caller may
      # donate the arrays at once).
      fmt = 'zarr' if method == 'zarr' else 'packed'
      valid = method == 'packed'

      def run():
        t = time.perf_counter()
        checkpoints.save_checkpoint_multiprocess(
            os.path.join(root, method), {'state': state}, 1,
            gda_manager=manager, array_format=fmt,
            buffers_stay_valid=valid)
        key = f'{method} save blocking'  # the caller's share (process 0's)
        out[key] = min(out.get(key, float('inf')), time.perf_counter() - t)
        manager.wait_until_finished()
        os.sync()
      timed(f'{method} save', run)
      if method == 'packed':  # synchronous: the call returns when durable
        clear(os.path.join(root, 'packed-sync'))

        def run_sync():
          checkpoints.save_checkpoint_multiprocess(
              os.path.join(root, 'packed-sync'), {'state': state}, 1,
              gda_manager=manager, array_format='packed',
              host_memory_budget=0)
          manager.wait_until_finished()
          os.sync()
        timed('packed sync save', run_sync)
    elif method == 'orbax':
      clear(os.path.join(root, 'orbax'))

      def run():
        t = time.perf_counter()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(orbax_path, state)
        out['orbax save blocking'] = min(out.get('orbax save blocking',
                                                 float('inf')),
                                         time.perf_counter() - t)
        ckptr.wait_until_finished()
        os.sync()
      timed('orbax save', run)
    else:
      def run():
        with open(npath, 'wb') as f:
          for a in mine:
            a.tofile(f)
          f.flush()
          os.fsync(f.fileno())
      timed('numpy save', run)
    rss_end(f'{method} save peak extra rss', begin)

  def restore(method):
    if method == 'packed-copy':
      return  # the same files as packed
    for kind, sharding in (('same', rows), ('other', cols)):
      if method in ('packed', 'zarr'):
        got = restored(f'{method} restore {kind}',
                       lambda s=sharding: restore_ours(method, s))
      elif method == 'orbax':
        got = restored(f'orbax restore {kind}',
                       lambda s=sharding: restore_orbax(s))
      else:
        if kind == 'same':
          restored('numpy restore same',
                   lambda: np.fromfile(npath, np.float32))
        continue
      check(got, state)
      del got

  for r in range(args.rounds):
    order = METHODS if r % 2 == 0 else tuple(reversed(METHODS))
    for method in order:
      save(method)
      restore(method)
  out['bytes per process'] = sum(a.nbytes for a in mine)
  out['total bytes'] = n * LEAF_BYTES
  for method in ('packed', 'packed-copy', 'zarr'):
    out[f'{method} files'] = 1 + _count_files(ours_path(method) + '_gda')
  out['orbax files'] = _count_files(os.path.join(root, 'orbax'))
  if me == 0:
    print('RESULT ' + json.dumps(out), flush=True)


def _launch(args, root, processes, devices, phase):
  cmd = [os.path.join(REPO, 'launch', 'local.sh'), '-n', str(processes),
         '-d', str(devices), '--', sys.executable, os.path.abspath(__file__),
         '--worker', f'--gib={args.gib}', f'--dir={root}',
         f'--rounds={args.rounds}', f'--restores={args.restores}',
         f'--phase={phase}']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                        check=False)
  found = [l for l in proc.stdout.splitlines() if 'RESULT ' in l]
  if proc.returncode or not found:
    sys.exit(f'bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
             f'{proc.stderr[-4000:]}')
  return json.loads(found[-1].split('RESULT ', 1)[1])


def _table(r, gib, rounds, load='', restores=1):
  per = r['bytes per process']
  gb = per / 1e9
  lines = [
      f'2 processes x 2 CPU devices, a {gib:g} GiB float32 state split over'
      f' the 4 devices ({per / 2**20:.0f} MiB per process); best of'
      f' {rounds} rounds in ABBA order ({restores} restores in a row per'
      ' method and round), times of the slower process; saves'
      ' durable (os.sync), restores from a warm page cache. "other": into'
      ' column slices P(None, \'data\') (every device needs part of every'
      ' stored slice). vs numpy: numpy\'s time / ours (1.0 = as fast as'
      ' `tofile`+fsync / `fromfile` of the same bytes per process).'
      ' packed: the runner\'s way (`buffers_stay_valid=True`: nothing copied'
      ' before the call returns); packed-copy: the library default (a host'
      ' copy before returning). Peak extra RSS: VmHWM over the RSS before'
      ' the save, the larger process, as a multiple of its shard bytes.'
      + (f' Load average at the start: {load}.' if load else ''), '',
      '| method | files | save s | caller blocked s | blocked / sync save |'
      ' peak extra RSS | restore s (same) | restore s (other) |'
      ' save vs numpy | restore vs numpy | save GB/s per process |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  sync = r['packed sync save']
  for m in ('packed', 'packed-copy', 'zarr', 'orbax'):
    same = r.get(f'{m} restore same', r['packed restore same'])
    other = r.get(f'{m} restore other', r['packed restore other'])
    lines.append(
        f'| {m} | {r[f"{m} files"] if f"{m} files" in r else ""} |'
        f' {r[f"{m} save"]:.3f} |'
        f' {r[f"{m} save blocking"]:.3f} |'
        f' {100 * r[f"{m} save blocking"] / sync:.1f}% |'
        f' {r[f"{m} save peak extra rss"] / per:.2f}x |'
        f' {same:.3f} | {other:.3f} |'
        f' {r["numpy save"] / r[f"{m} save"]:.2f}x |'
        f' {r["numpy restore same"] / same:.2f}x |'
        f' {gb / r[f"{m} save"]:.2f} |')
  lines.append(f'| packed, synchronous | | {sync:.3f} | | | | | |'
               f' {r["numpy save"] / sync:.2f}x | | {gb / sync:.2f} |')
  lines.append(f'| numpy | 2 | {r["numpy save"]:.3f} | | |'
               f' {r["numpy save peak extra rss"] / per:.2f}x |'
               f' {r["numpy restore same"]:.3f} | | 1.00x | 1.00x |'
               f' {gb / r["numpy save"]:.2f} |')
  lines += ['', 'Elastic restore (2x2 -> 1x4): 1 process x 4 devices reads'
            ' the whole state written by 2 processes.', '',
            '| method | restore s | vs numpy |', '|---|---|---|']
  for m in ('packed', 'orbax', 'numpy'):
    lines.append(f'| {m} | {r[f"{m} elastic"]:.3f} |'
                 f' {r["numpy elastic"] / r[f"{m} elastic"]:.2f}x |')
  share = r['single bytes per process']
  lines += ['', 'A 1-process checkpoint read by 2 processes (1x4 -> 2x2): one'
            ' process with 4 devices wrote it (ours: one msgpack file, as a'
            ' 1-process run writes it); 2 processes x 2 devices restore it'
            ' into P(\'data\'), each reading its half'
            f' ({share / 2**20:.0f} MiB). numpy: `fromfile` of the same bytes'
            ' per process (one contiguous range). ours reads'
            f' {r["single ours bytes read"] / 2**20:.0f} MiB per process'
            ' (`msgpack_slices.bytes_read()`); "whole file": the restore'
            ' before, each process reading the whole file then placing its'
            ' slices.', '', '| method | restore s | vs numpy |', '|---|---|---|']
  for m, key in (('ours', 'single ours'), ('ours, whole file', 'single whole'),
                 ('orbax', 'single orbax'), ('numpy', 'single numpy')):
    lines.append(f'| {m} | {r[key]:.3f} |'
                 f' {r["single numpy"] / r[key]:.2f}x |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gib', type=float, default=1.0)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--restores', type=int, default=3,
                      help='restores in a row per method and round')
  parser.add_argument('--dir', default=None)
  parser.add_argument('--phase', default='main')
  parser.add_argument('--worker', action='store_true')
  args, rest = parser.parse_known_args()
  if args.worker:
    flags = dict(a[2:].split('=', 1) for a in rest if a.startswith('--'))
    _worker(args, flags)
    return
  root = args.dir or tempfile.mkdtemp(prefix='sharded_bench_')
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  try:
    result = _launch(args, root, 2, 2, 'main')
    result.update(_launch(args, root, 1, 4, 'elastic'))
    result.update(_launch(args, root, 2, 2, 'scatter'))
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  table = _table(result, args.gib, args.rounds, load, args.restores)
  print(table)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  main()
