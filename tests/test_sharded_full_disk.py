"""A 2-process sharded run whose background save hits a full disk stops on
both processes at the next step, each with one ``gintrain: error:`` line,
the last good checkpoint kept (issue 21).

Both processes run in one private mount namespace (``unshare -m``) with a
small tmpfs over the run's checkpoint directory, so that a save runs out of
space in its background write; whichever process's write fails (process 0's
main file or data file, process 1's data file, or both), the other learns
it through ``lib.save_status`` and stops too, instead of waiting for jax's
commit barrier to time out.
"""

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.lib import checkpoint_io  # pylint: disable=wrong-import-position
from gintrain.lib import multiprocess_arrays  # pylint: disable=wrong-import-position
from gintrain.runner.outputs import checkpoints as runner_ckpt  # pylint: disable=wrong-import-position

# The steps take >= 0.2 s (slow data): a failed background write is known
# to both processes well before the next step ends.
FLAGS = ('--gin.slow_synthetic.delay=0.2', '--gin.train.num_steps=40',
         '--gin.train.log_every=1', '--gin.train.eval_every=1000',
         '--gin.mlp.features=(1024,)', '--gin.checkpoint_policy.every_steps=2',
         '--gin.checkpoint_policy.keep=2',
         '--gin.checkpoint_policy.async_save=True',
         '--heartbeat_timeout=60', '--barrier_timeout=120',
         '--shutdown_timeout=20', '--initialization_timeout=60')
# Each checkpoint is about 270 KB (a 1024-unit MLP with Adam, split over
# the 4 devices); the third save (step 6) does not fit beside two.
TMPFS = '640k'
# Both stop within a second of the failure; the jax timeouts above are
# what a process waiting for a stopped one would take instead.
TIMEOUT_S = 150



def _train_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r['step'] for r in rows if r.get('split') == 'train']


# fsdp: the Dense kernels split over the 4 devices, written by both
# processes (packed); replicated: every array in process 0's file alone.
LAYOUTS = {
    'fsdp': ('--gin.train.parallelism=@partitioner()',
             "--gin.partitioner.rules='fsdp'"),
    'replicated': ("--gin.train.parallelism='sharded'",),
}


@pytest.mark.parametrize('layout', [
    'fsdp', pytest.param('replicated', marks=pytest.mark.skipif(
        not os.environ.get('GINTRAIN_SLOW'), reason='GINTRAIN_SLOW=1'))])
def test_a_full_disk_stops_both_processes_at_the_next_step(tmp_path, layout):
  namespace = harness.mount_namespace()
  if namespace is None:
    pytest.skip('cannot make a mount namespace here (no unshare -m)')
  workdir = tmp_path / 'run'
  ckpts = workdir / 'checkpoints'
  ckpts.mkdir(parents=True)
  kept, logs = tmp_path / 'kept', tmp_path / 'logs'
  launch = [os.path.join(harness.LAUNCH, 'local.sh'), '-n', '2', '-d', '2',
            '-p', str(harness.free_port()), '-l', str(logs), '--',
            *harness.train_command(workdir, *LAYOUTS[layout], *FLAGS)]
  shell = (f'mount -t tmpfs -o size={TMPFS} tmpfs {ckpts} || exit 99; '
           f'{shlex.join(launch)}; rc=$?; cp -a {ckpts} {kept}; exit $rc')
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      namespace + ['sh', '-c', shell], env=harness.env(tmp_path / 'cache'),
      cwd=harness.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes
    out, err = proc.communicate()
  proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
  if proc.returncode == 99:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()[-300:]}')
  texts = []
  for i in range(2):
    with open(logs / f'process_{i}.log', encoding='utf-8',
              errors='replace') as f:
      texts.append(f.read())
  report = '\n'.join(f'--- process {i}\n{harness.tail(t)}'
                     for i, t in enumerate(texts)) + proc.stderr[-2000:]
  assert proc.returncode == 1, report
  assert 'process 0 exited with status 1' in proc.stderr + proc.stdout, report
  assert 'process 1 exited with status 1' in proc.stderr + proc.stdout, report
  lines = []
  for text in texts:
    assert 'Traceback' not in text, report
    mine = [l for l in text.splitlines() if l.startswith('gintrain: error:')]
    assert len(mine) == 1, report
    assert mine[0].startswith(
        f'gintrain: error: Cannot write checkpoint "{ckpts}/checkpoint_6": No'
        ' space left on device'), report
    assert mine[0].split(' on device', 1)[1].startswith(
        (' (errno 28).', ' on process ')), report
    lines.append(mine[0])
  # Both stopped after the step following the failed save (step 6).
  assert _train_steps(workdir) == list(range(1, 8)), report
  # The last good checkpoint is intact and restores.
  names = sorted(n for n in os.listdir(kept) if not n.startswith('.'))
  gda = layout == 'fsdp'
  assert names == ['checkpoint_2'] + ['checkpoint_2_gda'] * gda + [
      'checkpoint_4'] + ['checkpoint_4_gda'] * gda, names
  path = str(kept / 'checkpoint_4')
  raw = checkpoint_io.read_checkpoint_file(path)
  multiprocess_arrays.verify_arrays(path, raw)  # every slice's hash
  state = runner_ckpt.read_arrays(path, raw['state'])
  assert int(state['step']) == 4
  print('\n'.join(lines))
