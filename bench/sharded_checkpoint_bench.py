"""Save and restore of a sharded train state by 2 processes, against the same
state replicated, and against the numpy limit for the bytes each process
writes.

Two processes x 2 CPU devices (``launch/local.sh``, 127.0.0.1) hold a tree
of ``--gib`` GiB (float32 arrays of 4096 rows) on a 1-D ``data`` mesh:

* ``sharded``: every array split over the 4 devices (FSDP); saved with
  ``lib.checkpoints.save_checkpoint_multiprocess`` (each process writes its
  own shards into ``<ckpt>_gda`` through tensorstore; process 0 writes the
  msgpack file of placeholders and commits once all are done), restored
  with ``runner.outputs.checkpoints.read_arrays`` into the same shardings
  (each process reads only its slices);
* ``replicated``: the same arrays whole on every device; the runner's path
  for them: host copy, process 0 writes one msgpack file, every process
  reads all of it back and places it;
* ``numpy``: each process ``tofile`` + fsync of the bytes it holds of the
  sharded state (half of it), then ``np.fromfile``: what the disk allows.

Times are the slower process's (the save is done when the last one is);
each save ends with ``os.sync()`` (tensorstore does not fsync, and unflushed
pages would otherwise be written back during the next measurement).
Restores read a warm page cache (the files were just written).

  python bench/sharded_checkpoint_bench.py [--gib 1] [--port 24380]

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


def _worker(args, flags):
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(flags['coordinator_address'],
                             int(flags['process_count']),
                             int(flags['process_index']))
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.experimental.array_serialization import serialization as ser  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoint_io  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import checkpoints as runner_ckpt  # pylint: disable=g-import-not-at-top

  me = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  split, whole = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  leaf_bytes = 64 * 2**20
  n = int(args.gib * 2**30 // leaf_bytes)
  cols = leaf_bytes // 4 // ROWS

  def make():
    keys = jax.random.split(jax.random.key(0), n)
    return {f'layer_{i:03d}': jax.random.normal(keys[i], (ROWS, cols))
            for i in range(n)}
  shapes = jax.eval_shape(make)
  sharded = jax.jit(make, out_shardings={k: split for k in shapes})()
  jax.block_until_ready(sharded)
  out = {}

  def timed(name, fn):
    multihost_utils.sync_global_devices(f'start {name}')
    t = time.perf_counter()
    result = fn()
    multihost_utils.sync_global_devices(f'end {name}')
    mine = time.perf_counter() - t
    times = multihost_utils.process_allgather(np.float64(mine))
    out[name] = float(np.max(times))
    return result

  root = args.dir
  # -- sharded ------------------------------------------------------------
  manager = ser.GlobalAsyncCheckpointManager(timeout_secs=600)

  def save_sharded():
    checkpoints.save_checkpoint_multiprocess(
        os.path.join(root, 'sharded'), {'state': sharded}, 1,
        gda_manager=manager)
    manager.wait_until_finished()
    os.sync()  # durable, like the others (tensorstore does not fsync)
  timed('sharded save', save_sharded)
  path = os.path.join(root, 'sharded', 'checkpoint_1')

  def restore_sharded():
    raw = checkpoint_io.read_checkpoint_file(path)
    tree = runner_ckpt.read_arrays(path, raw, {'state': {
        k: split for k in shapes}})
    return jax.block_until_ready(tree)
  restored = timed('sharded restore', restore_sharded)
  assert all(bool((restored['state'][k] == sharded[k]).all())
             for k in shapes)
  del restored
  # -- replicated (the runner's path: host copy, process 0 writes) ------
  replicated = jax.jit(lambda t: t, out_shardings={k: whole
                                                   for k in shapes})(sharded)
  jax.block_until_ready(replicated)

  def save_replicated():
    host = {k: np.asarray(v.addressable_data(0))
            for k, v in replicated.items()}
    checkpoints.save_checkpoint_multiprocess(
        os.path.join(root, 'replicated'), {'state': host}, 1)
    os.sync()
  timed('replicated save', save_replicated)
  del replicated
  rpath = os.path.join(root, 'replicated', 'checkpoint_1')

  def restore_replicated():
    raw = checkpoint_io.read_checkpoint_file(rpath)['state']
    placed = {k: jax.make_array_from_callback(
        raw[k].shape, whole, lambda index, x=raw[k]: x[index])
              for k in shapes}
    return jax.block_until_ready(placed)
  timed('replicated restore', restore_replicated)
  # -- numpy: the bytes this process holds of the sharded state ---------
  mine = [np.asarray(s.data) for k in sorted(shapes)
          for s in sharded[k].addressable_shards]
  npath = os.path.join(root, f'numpy_{me}.bin')

  def save_numpy():
    with open(npath, 'wb') as f:
      for a in mine:
        a.tofile(f)
      f.flush()
      os.fsync(f.fileno())
  timed('numpy save', save_numpy)
  nbytes = sum(a.nbytes for a in mine)
  timed('numpy restore', lambda: np.fromfile(npath, np.float32))
  out['bytes per process (sharded)'] = nbytes
  out['total bytes'] = n * leaf_bytes
  out['gda files'] = sum(len(files) for _, _, files in os.walk(
      path + '_gda'))
  if me == 0:
    print('RESULT ' + json.dumps(out), flush=True)


def _table(result, gib):
  total = result['total bytes']
  per = result['bytes per process (sharded)']
  rows = [
      ('sharded (FSDP, `_gda`)', 'sharded save', 'sharded restore', per),
      ('replicated (process 0 writes)', 'replicated save',
       'replicated restore', total),
      ('numpy limit (`tofile`+fsync / `fromfile`)', 'numpy save',
       'numpy restore', per),
  ]
  lines = [f'2 processes x 2 CPU devices, a {gib:g} GiB state'
           f' ({result["gda files"]} files in the sharded `_gda`), times of'
           ' the slower process; restores from a warm page cache.', '',
           '| method | bytes written per process | save s | restore s |'
           ' save vs sharded | restore vs sharded |',
           '|---|---|---|---|---|---|']
  for name, save, restore, nbytes in rows:
    lines.append(
        f'| {name} | {nbytes / 2**20:.0f} MiB | {result[save]:.2f} |'
        f' {result[restore]:.2f} |'
        f' {result[save] / result["sharded save"]:.2f}x |'
        f' {result[restore] / result["sharded restore"]:.2f}x |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gib', type=float, default=1.0)
  parser.add_argument('--port', type=int, default=24380)
  parser.add_argument('--dir', default=None)
  parser.add_argument('--worker', action='store_true')
  args, rest = parser.parse_known_args()
  if args.worker:
    flags = dict(a[2:].split('=', 1) for a in rest if a.startswith('--'))
    _worker(args, flags)
    return
  root = args.dir or tempfile.mkdtemp(prefix='sharded_bench_')
  try:
    cmd = [os.path.join(REPO, 'launch', 'local.sh'), '-n', '2', '-p',
           str(args.port), '-d', '2', '--', sys.executable,
           os.path.abspath(__file__), '--worker', f'--gib={args.gib}',
           f'--dir={root}']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          check=False)
    found = [l for l in proc.stdout.splitlines() if 'RESULT ' in l]
    if proc.returncode or not found:
      sys.exit(f'bench failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    result = json.loads(found[-1].split('RESULT ', 1)[1])
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  table = _table(result, args.gib)
  print(table)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  main()
