"""Bad input: one line naming the fault, non-zero exit status."""

import os
import subprocess
import sys

import pytest

from gintrain.runner import train

TINY = ['--gin.train.num_epochs=None', '--gin.train.num_steps=2',
        '--gin.train.log_every=1', '--gin.checkpoint_policy.async_save=False']


def cli(tmp_path, *args):
  """Runs ``python -m gintrain.runner.train`` in a fresh process from ``tmp_path``."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'gintrain.runner.train', *args],
                        cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  errors = [l for l in proc.stderr.splitlines()
            if l.startswith('gintrain: error:')]
  return proc.returncode, errors, proc


def in_process(capsys, *args):
  code = train.main_with_flags(['gintrain', *args])
  err = capsys.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  return code, errors


def test_cli_unknown_configurable_suggests(tmp_path):
  code, errors, proc = cli(tmp_path, f'--workdir={tmp_path}/w',
                           '--gin.trian.num_steps=5')
  assert code == 1, proc.stderr
  assert errors == [
      "gintrain: error: --gin_bindings 'trian.num_steps=5': No configurable"
      " matching 'trian'. (did you mean 'train'?)"]
  assert 'Traceback' not in proc.stderr


def test_cli_syntax_error_names_file_and_line(tmp_path):
  bad = tmp_path / 'bad.gin'
  bad.write_text("include 'default.gin'\n\ntrain.batch_size = = 3\n")
  code, errors, proc = cli(tmp_path, f'--workdir={tmp_path}/w',
                           '--gin_file=bad.gin')
  assert code == 1, proc.stderr
  assert errors == [f'gintrain: error: {bad}:3: gin syntax error: Unable to'
                    " parse value in 'train.batch_size = = 3'"]


def test_cli_unwritable_workdir(tmp_path):
  (tmp_path / 'a_file').write_text('')
  code, errors, proc = cli(tmp_path, f'--workdir={tmp_path}/a_file/run')
  assert code == 1, proc.stderr
  assert errors == [f'gintrain: error: --workdir={tmp_path}/a_file/run is not'
                    ' writable: Not a directory.']
  assert not os.path.exists(tmp_path / 'a_file' / 'run')


def _console_script():
  """The ``gintrain`` console script of this interpreter's environment
  (its bin/ folder), else ``python -c`` calling the same entry point."""
  script = os.path.join(os.path.dirname(sys.executable), 'gintrain')
  if os.access(script, os.X_OK):
    return [script]
  return [sys.executable, '-c',
          'import sys; sys.argv[0] = "gintrain";'
          ' from gintrain.runner.cli.main import run; run()']


def test_console_script_reports_unset_required(tmp_path):
  proc = subprocess.run(
      [*_console_script(), f'--workdir={tmp_path}', '--gin_file=run.gin'],
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=120, check=False, cwd=tmp_path)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'gintrain: error: unset %gin.REQUIRED: train.dataset, train.model,'
      ' train.optimizer; bind them in a --gin_file or with --gin.NAME=VALUE'
      ' (e.g. --gin.train.dataset=...).')


@pytest.mark.parametrize('args, message', [
    (['--gin.train.num_step=5'],
     "--gin_bindings 'train.num_step=5': Configurable 'train' doesn't have a"
     " parameter named 'num_step'. (did you mean 'num_steps'?)"),
    (['--gin.mlp.featurs=(3,)'],
     "--gin_bindings 'mlp.featurs=(3,)': Configurable 'mlp' doesn't have a"
     " parameter named 'featurs'. (did you mean 'features'?)"),
    (['--gin.optimizer.name="adm"'],
     "Unknown optax optimizer 'adm' (did you mean 'adam'?); choose one of"),
    (['--gin.optimizer.momentm=0.9', '--gin.optimizer.name="sgd"'],
     "optax.sgd has no argument 'momentm' (did you mean 'momentum'?)"),
    (['--gin.train.batch_size=abc'],
     "--gin_bindings 'train.batch_size=abc': gin syntax error: cannot parse"
     ' the value \'abc\' (a string needs quotes: "abc")'),
    (['--gin.cosine.halfcos_epochs=-1',
      '--gin.optimizer.learning_rate=@schedules.cosine()',
      '--gin.cosine.base_learning_rate=0.1'],
     'halfcos_epochs must be a number > 0, got -1.'),
    (['--gin.train.parallelism="pmapp"'],
     "train.parallelism must be one of auto, single, pmap, sharded, got"
     " 'pmapp'."),
    (['--gin.train.batch_size=12'],
     "train.batch_size=12 must be a multiple of 8 (devices) for"
     " parallelism='sharded'."),
    (['--gin.checkpoint_policy.best_metric="acc"'],
     "checkpoint_policy.best_metric='acc' is not an eval metric; choose one"
     ' of loss, accuracy.'),
    (['--gin.mlp.features=(-3,)'],
     "features must be positive integers, got (-3,). (in gin configurable"
     " 'mlp')"),
    (['--gin_file=nonexistent.gin'],
     '--gin_file=nonexistent.gin: no such file'),
    (['--gin_bindings=import not_a_module_xyz'],
     "--gin_bindings 'import not_a_module_xyz': cannot import: No module"
     " named 'not_a_module_xyz'"),
    (['--resume=maybe'],
     'flag --resume=maybe: value should be one of <auto|never|require>'),
    (['--gin.train'],
     '--gin.train: the shorthand is --gin.NAME=VALUE'),
    (['stray'], 'unexpected arguments: stray'),
])
def test_bad_input_in_process(tmp_path, capsys, args, message):
  code, errors = in_process(capsys, f'--workdir={tmp_path}', *TINY, *args)
  assert code == 1
  assert len(errors) == 1 and errors[0].startswith(
      f'gintrain: error: {message}'), errors
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_unset_required_lists_all(tmp_path, capsys):
  code, errors = in_process(capsys, f'--workdir={tmp_path}',
                            '--gin_file=run.gin', '--gin_file=models/mlp.gin',
                            '--gin_file=optimizers/sgd_cosine.gin')
  assert code == 1
  assert errors == [
      'gintrain: error: unset %gin.REQUIRED: cosine.halfcos_epochs,'
      ' train.dataset; bind them in a --gin_file or with --gin.NAME=VALUE'
      ' (e.g. --gin.cosine.halfcos_epochs=...).']


def test_resume_require_and_never(tmp_path, capsys):
  code, errors = in_process(capsys, f'--workdir={tmp_path}', *TINY,
                            '--resume=require')
  assert code == 1
  assert errors == [
      f'gintrain: error: --resume=require but {tmp_path}/checkpoints holds no'
      ' checkpoint (checkpoint_<step>).']
  assert in_process(capsys, f'--workdir={tmp_path}', *TINY)[0] == 0
  code, errors = in_process(capsys, f'--workdir={tmp_path}', *TINY,
                            '--resume=never')
  assert code == 1
  assert errors == [
      f'gintrain: error: --resume=never but {tmp_path}/checkpoints already'
      ' holds checkpoints (latest step 2); use --resume=auto to continue that'
      ' run, or a new --workdir.']
  assert os.listdir(tmp_path / 'checkpoints') == ['checkpoint_2']


def test_checkpoint_of_another_model(tmp_path, capsys):
  assert in_process(capsys, f'--workdir={tmp_path}', *TINY)[0] == 0
  before = (tmp_path / 'checkpoints' / 'checkpoint_2').read_bytes()
  # --allow_config_change passes the resume guard (which refuses the changed
  # width first: tests/test_long_runs.py): the checkpoint's check remains.
  code, errors = in_process(capsys, f'--workdir={tmp_path}', *TINY,
                            '--gin.train.num_steps=4',
                            '--gin.mlp.features=(32,)',
                            '--allow_config_change')
  assert code == 1
  assert len(errors) == 1
  assert errors[0].startswith(
      f'gintrain: error: checkpoint {tmp_path}/checkpoints/checkpoint_2 does'
      ' not match the model and optimizer: params/Dense_0/bias: float32[128]'
      ' in the checkpoint, float32[32] expected; params/Dense_0/kernel:'
      ' float32[64, 128] in the checkpoint, float32[64, 32] expected;')
  assert errors[0].endswith('use a new --workdir (with --init_from to reuse'
                            ' matching weights).')
  # Nothing saved is lost.
  assert os.listdir(tmp_path / 'checkpoints') == ['checkpoint_2']
  assert (tmp_path / 'checkpoints' / 'checkpoint_2').read_bytes() == before
  code, errors = in_process(capsys, f'--workdir={tmp_path}/other', *TINY,
                            '--gin.mlp.features=(32,)',
                            f'--init_from={tmp_path}/checkpoints')
  assert code == 1
  assert errors[0].startswith(
      f'gintrain: error: --init_from={tmp_path}/checkpoints does not match'
      ' the model: Dense_0/bias: float32[128] in the checkpoint, float32[32]'
      ' expected;')
