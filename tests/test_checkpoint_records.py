"""What each save cost, in the records (issue 21): a ``checkpoint`` record
per save in ``metrics.jsonl`` (bytes, files, blocking and background
seconds, GB/s, peak extra RSS) and ``gintrain ckpt ls`` with each
checkpoint's size and file count, in one process and for a 2-process
sharded (packed) run."""

import json
import os
import shlex
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.lib import checkpoints  # pylint: disable=wrong-import-position
from gintrain.runner import train  # pylint: disable=wrong-import-position
from gintrain.runner.cli import ckpt  # pylint: disable=wrong-import-position

TINY = [
    '--gin_file=run.gin', '--gin_file=models/mlp.gin',
    '--gin_file=datasets/synthetic.gin', '--gin_file=optimizers/adam.gin',
    '--gin.mlp.features=(64,)', '--gin.mlp.num_classes=4',
    '--gin.train.batch_size=32', '--gin.train.num_epochs=None',
    '--gin.train.num_steps=8', '--gin.train.log_every=4',
    '--gin.optimizer.learning_rate=0.01',
    '--gin.checkpoint_policy.every_steps=4',
    '--gin.checkpoint_policy.keep=0',
]
FIELDS = {'bytes', 'files', 'blocking_s', 'background_s', 'gb_per_s',
          'peak_extra_rss_bytes'}


def _records(workdir, split='checkpoint'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r.get('split') == split]


def _files_of(ckpt_dir, step):
  """``(bytes, files)`` of checkpoint_<step> counted here by hand."""
  path = os.path.join(ckpt_dir, f'checkpoint_{step}')
  sizes = [os.path.getsize(path)]
  for root, _, names in os.walk(path + '_gda'):
    sizes += [os.path.getsize(os.path.join(root, n)) for n in names]
  return sum(sizes), len(sizes)


def check_records(workdir, steps, files):
  records = _records(workdir)
  assert [r['step'] for r in records] == steps, records
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  for r in records:
    assert FIELDS <= set(r), r
    size, count = _files_of(ckpt_dir, r['step'])
    assert (r['bytes'], r['files']) == (size, count) and count == files, r
    assert r['blocking_s'] > 0 and r['background_s'] >= 0, r
    seconds = r['blocking_s'] + r['background_s']
    assert abs(r['gb_per_s'] - size / seconds / 1e9) <= 1e-6 * r['gb_per_s']
    assert 0 <= r['peak_extra_rss_bytes'] < 2 << 30, r
  return records


def check_ls(workdir, capsys, steps, files):
  capsys.readouterr()
  assert ckpt.main(['ls', str(workdir)]) == 0
  out = capsys.readouterr().out
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  for step in steps:
    size, count = _files_of(ckpt_dir, step)
    line = [l for l in out.splitlines() if l.endswith(f' checkpoint_{step}')]
    assert len(line) == 1, out
    assert f' {ckpt.human_bytes(size)} ' in line[0], (line, size)
    word = 'file' if files == 1 else 'files'
    assert f' {files} {word} ' in line[0] and count == files, line
  rows = ckpt.list_checkpoints(ckpt_dir)
  assert [(r['step'], r['files']) for r in rows] == [(s, files)
                                                     for s in steps]


def test_one_process_async_saves_are_recorded_and_listed(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                *TINY]) == 0
  records = check_records(str(workdir), [4, 8], files=1)
  # Every train record is there too (the checkpoint records are extra).
  assert [r['step'] for r in _records(str(workdir), 'train')] == [4, 8]
  assert records[0]['bytes'] > 4 * 64 * 16  # the kernel, Adam's two slots
  check_ls(workdir, capsys, [4, 8], files=1)


# -- a background save that fails (full disk) stops the run at the next step -


def test_a_background_save_on_a_full_disk_stops_the_run_at_the_next_step(
    tmp_path):
  namespace = harness.mount_namespace()
  if namespace is None:
    pytest.skip('cannot make a mount namespace here (no unshare -m)')
  workdir = tmp_path / 'run'
  ckpts = workdir / 'checkpoints'
  ckpts.mkdir(parents=True)
  kept = tmp_path / 'kept'
  # Each checkpoint is about 260 KB (a 1024-unit MLP with Adam); 640 KiB
  # hold two (keep=2), so the third save (step 6) runs out of space in its
  # background write. Steps take >= 0.2 s (slow data): the failure is in
  # well before the next step ends.
  command = harness.train_command(
      workdir, '--gin.slow_synthetic.delay=0.2', '--gin.train.num_steps=40',
      '--gin.train.log_every=1', '--gin.train.eval_every=1000',
      '--gin.mlp.features=(1024,)', '--gin.checkpoint_policy.every_steps=2',
      '--gin.checkpoint_policy.keep=2',
      '--gin.checkpoint_policy.async_save=True')
  shell = (f'mount -t tmpfs -o size=640k tmpfs {ckpts} || exit 99; '
           f'{shlex.join(command)}; rc=$?; cp -a {ckpts} {kept}; exit $rc')
  proc = subprocess.run(namespace + ['sh', '-c', shell],
                        env=harness.env(tmp_path / 'cache'),
                        capture_output=True, text=True, timeout=300,
                        check=False)
  if proc.returncode == 99:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()[-300:]}')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines()
           if l.startswith('gintrain: error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(
      f'gintrain: error: Cannot write checkpoint "{ckpts}/checkpoint_6": No'
      ' space left on device (errno 28).'), lines
  # Stopped after the step following the failed save, not at the next save.
  steps = [r['step'] for r in _records(str(workdir), 'train')]
  assert steps == list(range(1, 8)), steps
  assert [r['step'] for r in _records(str(workdir))] == [2, 4]
  # The last good checkpoint is intact and restores; no partial file left.
  assert sorted(os.listdir(kept)) == ['checkpoint_2', 'checkpoint_4']
  restored = checkpoints.restore_checkpoint(str(kept), None)
  assert int(restored['state']['step']) == 4
