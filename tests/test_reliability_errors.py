"""Late or raw failures become one ``gintrain: error:`` line and status 1
(issue 12, item 6): a checkpoint write that fails (full disk), a platform
that is not there, foreign entries in ``checkpoints/``, ``--init_from`` of a
directory named like a checkpoint."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner import train  # pylint: disable=wrong-import-position

TINY = [
    '--gin_file=run.gin', '--gin_file=models/mlp.gin',
    '--gin_file=datasets/synthetic.gin', '--gin_file=optimizers/adam.gin',
    '--gin.mlp.features=(16,)', '--gin.mlp.num_classes=4',
    '--gin.train.batch_size=32', '--gin.train.num_epochs=None',
    '--gin.train.num_steps=8', '--gin.train.log_every=4',
    '--gin.optimizer.learning_rate=0.01',
    '--gin.checkpoint_policy.every_steps=4',
]


def run(workdir, *args, capsys):
  code = train.main_with_flags(['gintrain', f'--workdir={workdir}', *TINY,
                                *args])
  err = capsys.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  return code, errors, err


def _python(workdir, *args, prelude='', environ=None):
  """The runner in a new process, after ``prelude`` (Python code)."""
  code = (f'{prelude}\nimport sys\nfrom gintrain.runner import train\n'
          'sys.exit(train.main_with_flags(sys.argv))')
  return subprocess.run(
      [sys.executable, '-c', code, f'--workdir={workdir}', *TINY, *args],
      capture_output=True, text=True, timeout=300,
      env=environ or harness.env(), check=False)


def _one_error_line(proc):
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines()
            if l.startswith('gintrain: error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize('async_save', [True, False])
def test_checkpoint_write_failure_is_one_line(tmp_path, async_save):
  # A file size limit makes every write past 64 KiB fail with EFBIG, as a
  # full disk fails with ENOSPC; the checkpoints (a 1024-unit MLP with Adam,
  # about 260 KB) hit it, the small files do not.
  limit = 64 * 1024
  prelude = ('import resource, signal\n'
             'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n'
             f'resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))')
  proc = _python(tmp_path, '--gin.mlp.features=(1024,)',
                 f'--gin.checkpoint_policy.async_save={async_save}',
                 prelude=prelude)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _one_error_line(proc)
  ckpt_dir = tmp_path / 'checkpoints'
  assert line.startswith(
      f'gintrain: error: Cannot write checkpoint "{ckpt_dir}/checkpoint_4":'
      ' File too large (errno 27).'), line
  assert not [n for n in os.listdir(ckpt_dir) if n.startswith('checkpoint')]


def test_unavailable_platform_is_one_line(tmp_path):
  environ = harness.env()
  environ.pop('JAX_PLATFORMS', None)
  proc = _python(tmp_path, '--jax_platforms=tpu', environ=environ)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _one_error_line(proc)
  assert line.startswith('gintrain: error: --jax_platforms=tpu: JAX cannot'
                         ' start that platform on this machine ('), line
  assert not os.path.exists(tmp_path / 'checkpoints')  # before any work


@pytest.mark.parametrize('entry', ['orbax', 'directory', 'named'])
def test_foreign_entry_in_checkpoints_is_one_line(tmp_path, capsys, entry):
  ckpt_dir = tmp_path / 'checkpoints'
  if entry == 'orbax':
    (ckpt_dir / 'checkpoint_100').mkdir(parents=True)
    (ckpt_dir / 'checkpoint_100' / '_METADATA').write_text('{}')
    want = (f'gintrain: error: {ckpt_dir}/checkpoint_100: a directory (an'
            " Orbax checkpoint) among the runner's checkpoints, which are"
            ' msgpack files; move it out of the checkpoint directory.')
  elif entry == 'directory':
    (ckpt_dir / 'checkpoint_3').mkdir(parents=True)
    want = (f'gintrain: error: {ckpt_dir}/checkpoint_3: a directory among'
            " the runner's checkpoints, which are msgpack files; move it out"
            ' of the checkpoint directory.')
  else:
    ckpt_dir.mkdir()
    (ckpt_dir / 'checkpoint_best').write_bytes(b'')
    want = (f"gintrain: error: {ckpt_dir}/checkpoint_best: not a runner"
            " checkpoint (the step 'best' is not an integer); move it out of"
            ' the checkpoint directory.')
  code, errors, err = run(tmp_path, capsys=capsys)
  assert (code, errors) == (1, [want]), err


def test_init_from_directory_named_like_a_checkpoint(tmp_path, capsys):
  empty = tmp_path / 'checkpoint_5'
  empty.mkdir()
  code, errors, err = run(tmp_path / 'a', f'--init_from={empty}',
                          capsys=capsys)
  assert (code, errors) == (1, [
      f'gintrain: error: --init_from={empty}: a directory that holds no'
      ' checkpoint_* file (a checkpoint is a file named checkpoint_<step>,'
      ' not a directory).']), err
  orbax = tmp_path / 'orbax' / 'checkpoint_7'
  orbax.mkdir(parents=True)
  (orbax / '_METADATA').write_text('{}')
  code, errors, err = run(tmp_path / 'b', f'--init_from={orbax}',
                          capsys=capsys)
  assert (code, errors) == (1, [
      f'gintrain: error: --init_from={orbax}: an Orbax checkpoint directory;'
      ' give a msgpack checkpoint file (checkpoint_<step>), a folder of them,'
      " or a run's workdir."]), err
  nested = tmp_path / 'nested'
  (nested / 'checkpoint_9').mkdir(parents=True)
  code, errors, err = run(tmp_path / 'c', f'--init_from={nested}',
                          capsys=capsys)
  assert (code, errors) == (1, [
      f'gintrain: error: --init_from={nested}/checkpoint_9: a directory, not'
      ' a checkpoint file; give the checkpoint file itself.']), err


# --- OSErrors of the runner's own files: one line, path and operation -------

_DIR = lambda name: lambda w: os.makedirs(w / name)  # pylint: disable=unnecessary-lambda-assignment


def _file(name):
  def make(w):
    (w / name).write_text('in the way')
  return make


@pytest.mark.parametrize('name, make, expected', [
    ('metrics', _DIR('metrics.jsonl'),
     'writing the metrics: cannot open {w}/metrics.jsonl: Is a directory'
     ' [Errno 21].'),
    ('settings', _DIR('settings.json'),
     'saving the settings: cannot rename {w}/settings.json.tmp to'
     ' {w}/settings.json: Is a directory [Errno 21].'),
    ('plot', _DIR('metrics.png'),
     'writing the metrics plot: cannot open {w}/metrics.png: Is a directory'
     ' [Errno 21].'),
    ('tensorboard', _file('tensorboard'),
     'writing the metrics: cannot create the directory {w}/tensorboard: File'
     ' exists [Errno 17].'),
    ('lock', _DIR('.gintrain.lock'),
     'locking the workdir: cannot open {w}/.gintrain.lock: Is a directory'
     ' [Errno 21].'),
    ('config', _DIR('config.parsed.gin'),
     "writing the run's config files: cannot rename {w}/config.parsed.gin.tmp"
     ' to {w}/config.parsed.gin: Is a directory [Errno 21].'),
    ('operative', _DIR('config.operative.gin'),
     "writing the run's config files: cannot rename"
     ' {w}/config.operative.gin.tmp to {w}/config.operative.gin: Is a'
     ' directory [Errno 21].'),
    ('checkpoints', _file('checkpoints'),
     'writing or reading a checkpoint: cannot access {w}/checkpoints: Not a'
     ' directory [Errno 20].'),
])
def test_os_error_of_a_runner_file_is_one_line(tmp_path, capsys, name, make,
                                               expected):
  make(tmp_path)
  code, errors, err = run(tmp_path, capsys=capsys)
  assert code == 1, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert errors == ['gintrain: error: ' + expected.format(w=tmp_path)], err
  if name != 'settings':  # runner.outputs.settings leaves its .tmp (issue 12)
    assert not list(tmp_path.glob('*.tmp')), 'a temporary file was left'


@pytest.mark.parametrize('where', ['file', 'under_file', 'read_only'])
def test_workdir_that_cannot_be_made_is_one_line(tmp_path, capsys, where):
  (tmp_path / 'a_file').write_text('')
  if where == 'file':
    workdir, reason = tmp_path / 'a_file', 'File exists'
  elif where == 'under_file':
    workdir, reason = tmp_path / 'a_file' / 'run', 'Not a directory'
  elif os.geteuid() == 0:  # root writes through permissions: sysfs refuses
    workdir, reason = '/sys/gintrain_test_run', None
  else:
    (tmp_path / 'ro').mkdir(mode=0o500)
    workdir, reason = tmp_path / 'ro' / 'run', 'Permission denied'
  code, errors, err = run(workdir, capsys=capsys)
  assert code == 1 and 'Traceback' not in err, err[-3000:]
  assert len(errors) == 1, err
  assert errors[0].startswith(
      f'gintrain: error: --workdir={workdir} is not writable: '), errors
  if reason:
    assert errors[0].endswith(f'{reason}.'), errors
