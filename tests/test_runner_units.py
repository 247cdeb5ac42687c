"""Unit tests of the runner's parts (no training)."""

import doctest
import os
import subprocess
import sys
import tokenize

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gintrain.runner
from gintrain.lib import lr_schedule
from gintrain.runner.outputs import checkpoints as checkpointing
from gintrain.runner.cli import config
from gintrain.runner.cli import configurables# pylint: disable=unused-import
from gintrain.runner import errors
from gintrain.runner.cli import flags as runner_flags
from gintrain.runner.training import optimizers
from gintrain.runner.parallel import partitioners as parallel
from gintrain.runner.training import schedules
from gintrain.runner.outputs import settings
from gintrain.runner.training import state
from gintrain.runner.errors import RunnerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('module', [
    errors, schedules, optimizers, settings, runner_flags, checkpointing,
    state, parallel])
def test_doctests(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


def test_epoch_schedules_match_lib():
  for sched, make in [
      (schedules.cosine(0.1, halfcos_epochs=3, warmup_length=1),
       lambda: lr_schedule.create_cosine_learning_rate_schedule(
           0.1, 7, 3, warmup_length=1)),
      (schedules.stepped(0.1, [[1, 0.5], [2, 0.1]]),
       lambda: lr_schedule.create_stepped_learning_rate_schedule(
           0.1, 7, [[1, 0.5], [2, 0.1]])),
      (schedules.constant(0.1, warmup_length=2),
       lambda: lr_schedule.create_constant_learning_rate_schedule(
           0.1, 7, warmup_length=2)),
  ]:
    got, want = schedules.resolve(sched, steps_per_epoch=7), make()
    for step in (0, 3, 7, 8, 14, 15, 21, 30):
      assert float(got(step)) == float(want(step))


def test_schedule_errors():
  with pytest.raises(RunnerError, match='halfcos_epochs must be a number > 0'):
    schedules.cosine(0.1, halfcos_epochs=0)
  with pytest.raises(RunnerError, match=r'lr_sched_steps must be a list of'
                     r' \[epoch, factor\] pairs, got \[1, 2\]'):
    schedules.stepped(0.1, [1, 2])
  with pytest.raises(RunnerError, match="learning_rate must be a number >= 0,"
                     " got 'fast'"):
    schedules.resolve('fast', 1)


def _update(tx, grads, params):
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_optimizer_weight_decay_and_clipping():
  params = {'w': jnp.array([1.0, -2.0])}
  zero = {'w': jnp.zeros(2)}
  # sgd has no weight_decay argument: L2 added to the gradient.
  tx = optimizers.optimizer('sgd', 1.0, weight_decay=0.1).build(1)
  np.testing.assert_allclose(_update(tx, zero, params)['w'], [-0.1, 0.2])
  # adamw takes it itself (decoupled, scaled by the learning rate).
  tx = optimizers.optimizer('adamw', 0.5, weight_decay=0.1).build(1)
  np.testing.assert_allclose(_update(tx, zero, params)['w'], [-0.05, 0.1])
  # Clipping by global norm comes first.
  tx = optimizers.optimizer('sgd', 1.0, clip_grad_norm=1.0).build(1)
  got = _update(tx, {'w': jnp.array([3.0, 4.0])}, params)['w']
  np.testing.assert_allclose(got, [-0.6, -0.8], rtol=1e-6)
  # An epoch schedule is built for the steps per epoch.
  spec = optimizers.optimizer('sgd', schedules.cosine(1.0, halfcos_epochs=1))
  tx = spec.build(steps_per_epoch=4)
  opt_state = tx.init(params)
  lrs = []
  for _ in range(3):
    updates, opt_state = tx.update({'w': jnp.ones(2)}, opt_state, params)
    lrs.append(-float(updates['w'][0]))
  np.testing.assert_allclose(lrs, [1.0, 0.5 + 0.5 * np.cos(np.pi / 4),
                                   0.5], rtol=1e-6)


def test_optimizer_errors():
  with pytest.raises(RunnerError, match="Unknown optax optimizer 'sdg'"
                     r" \(did you mean 'sgd'\?\)"):
    optimizers.optimizer('sdg')
  with pytest.raises(RunnerError, match="optax.adam has no argument 'beta1'"):
    optimizers.optimizer('adam', beta1=0.9)
  with pytest.raises(RunnerError, match='weight_decay must be a number >= 0'):
    optimizers.optimizer('adam', weight_decay=-1.0)
  assert 'dpsgd' not in optimizers.optax_optimizer_names()  # deprecated


def test_gin_shorthand():
  argv = ['p', '--gin.a.b=1', '--gin_file=x', '--gin.c.d = "e"', '--',
          '--gin.z=1']
  assert runner_flags.expand_gin_shorthand(argv) == [
      'p', '--gin_bindings=a.b=1', '--gin_file=x', '--gin_bindings=c.d = "e"',
      '--', '--gin.z=1']
  with pytest.raises(RunnerError, match='shorthand is --gin.NAME=VALUE'):
    runner_flags.expand_gin_shorthand(['p', '--gin.=3'])


def test_settings_roundtrip_and_changes(tmp_path):
  cfg = settings.build(
      {'train.batch_size': 32, 'models.mlp.features': '(16,)', '%LR': 0.1,
       'eval/train.seed': 1},
      {'workdir': '/w', 'resume': 'auto', 'gin_file': ['a.gin']},
      versions={'jax': '1'}, devices={'device_count': 8})
  assert cfg.gin.models.mlp.features == '(16,)'
  assert cfg.gin['eval/train'].seed == 1
  assert cfg.flags.gin_file == ('a.gin',)
  settings.save(str(tmp_path), cfg)
  loaded = settings.load(str(tmp_path))
  assert loaded == settings.flatten(cfg)
  assert loaded['flags.gin_file'] == ['a.gin']
  changed = dict(loaded, **{'flags.resume': 'require',
                            'devices.device_count': 4})
  del changed['%LR' if '%LR' in changed else 'gin.%LR']
  assert settings.changes(loaded, changed) == [
      'devices.device_count: 8 -> 4', 'gin.%LR: 0.1 -> <unset>']
  assert settings.load(str(tmp_path / 'nothing')) is None


def test_config_parse_required_and_bound_parameters(tmp_path):
  (tmp_path / 'exp.gin').write_text(
      "include 'run.gin'\nLR = 0.5\noptimizer.learning_rate = %LR\n"
      'train.model = @models.mlp()\n')
  config.parse(['exp.gin'], ['train.batch_size = 16'],
               search_paths=[str(tmp_path)])
  assert config.unset_required() == ['train.dataset', 'train.optimizer']
  bound = config.bound_parameters()
  assert bound['train.batch_size'] == 16
  assert bound['train.model'] == '@models.mlp()'
  assert bound['optimizer.learning_rate'] == '%LR'
  assert bound['%LR'] == 0.5
  with pytest.raises(RunnerError, match='unset %gin.REQUIRED: train.dataset,'
                     ' train.optimizer;'):
    config.finalize()
  gin.clear_config()


def test_config_token_error_names_file():
  err = tokenize.TokenError('EOF in multi-line statement', (7, 0))
  assert config.format_gin_error(err, 'x.gin') == (
      'x.gin:7: gin syntax error: EOF in multi-line statement (an unclosed'
      ' bracket or quote?)')


def test_checkpoint_policy_validation():
  with pytest.raises(RunnerError, match=r"checkpoint_policy.best_mode must be"
                     r" 'min' or 'max', got 'up'"):
    checkpointing.CheckpointPolicy(best_mode='up')
  with pytest.raises(RunnerError, match='checkpoint_policy.prefix must be a'
                     ' non-empty file name prefix not ending in a digit'):
    checkpointing.CheckpointPolicy(prefix='ckpt1')
  with pytest.raises(RunnerError, match='checkpoint_policy.every_steps must'
                     ' be an integer >= 0, got -1'):
    checkpointing.CheckpointPolicy(every_steps=-1)


def test_check_tree_reports_extra_and_type_faults():
  with pytest.raises(RunnerError) as e:
    checkpointing.check_tree({'a': np.zeros(2)},
                             {'a': 3, 'b': {'c': np.zeros(1)}}, 'ckpt')
  assert str(e.value) == ('ckpt does not match the model: a: int in the'
                          ' checkpoint, float64[2] expected; b/c: not in the'
                          ' model.')


def test_early_stopping_factory():
  stopper = state.early_stopping('loss', patience=1)
  for loss in (1.0, 1.0, 1.0):
    stopper = stopper.update({'loss': loss})
  assert stopper.state.should_stop
  with pytest.raises(RunnerError, match="early_stopping.mode must be 'min' or"
                     " 'max', got 'down'"):
    state.early_stopping(mode='down')
  with pytest.raises(RunnerError, match='early_stopping.patience must be an'
                     ' integer >= 0'):
    state.early_stopping(patience=-1)


def test_parallel_modes_resolve():
  assert parallel.resolve_mode('auto') == ('sharded' if jax.device_count() > 1
                                           else 'single')
  assert parallel.make('pmap').batch_divisor == jax.device_count()
  with pytest.raises(RunnerError, match='train.parallelism must be one of'):
    parallel.resolve_mode('gpu')


def _imports(folder):
  """``{file: [imported module names]}`` of the .py files under ``folder``."""
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for root, _, files in os.walk(os.path.join(REPO, folder)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        tree = ast.parse(open(path, encoding='utf-8').read())
        mods = []
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.module:
            mods += [node.module] + [f'{node.module}.{a.name}'
                                     for a in node.names]
        out[os.path.relpath(path, REPO)] = mods
  return out


def test_lib_stays_free_of_gin_and_flax():
  for path, mods in _imports('lib').items():
    bad = [m for m in mods if m.split('.')[0] in ('gin', 'flax')
           or m == 'absl.flags' or m.startswith('gintrain.runner')]
    assert not bad, (path, bad)
  for path, mods in _imports('runner').items():
    assert not [m for m in mods if m.split('.')[0] == 'flax'], path


def test_repo_gin_folder_does_not_shadow_gin_package():
  assert not os.path.exists(os.path.join(REPO, 'gin', '__init__.py'))
  proc = subprocess.run(
      [sys.executable, '-c', 'import gin, gintrain.runner.cli.config as c;'
       ' print(gin.__file__); print(c.REPO_GIN_DIR)'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  gin_file, gin_dir = proc.stdout.split()
  assert gin_file.endswith(os.path.join('site-packages', 'gin', '__init__.py'))
  assert gin_dir == os.path.join(REPO, 'gin')
  assert os.path.dirname(gintrain.runner.__file__) == os.path.join(REPO, 'runner')


def test_every_gin_file_parses_and_documents_its_bindings():
  root = os.path.join(REPO, 'gin')
  names = sorted(os.path.relpath(os.path.join(d, f), root)
                 for d, _, files in os.walk(root) for f in files
                 if f.endswith('.gin'))
  assert 'default.gin' in names and len(names) >= 8
  for name in names:
    text = open(os.path.join(root, name), encoding='utf-8').read()
    assert text.startswith('# ') and 'REQUIRED' in text.split('\n\n')[0], name
    assert 'Commonly overridden' in text.split('\n\n')[0], name
    config.parse([name], [])
  gin.clear_config()


def test_jax_flags_are_applied(tmp_path, capsys):
  from gintrain.runner import train  # pylint: disable=g-import-not-at-top
  assert not jax.config.jax_enable_x64
  try:
    assert train.main_with_flags(['gintrain', '--dry_run',
                                  '--jax_enable_x64']) == 0
    assert jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float64
  finally:
    jax.config.update('jax_enable_x64', False)
  assert 'All %gin.REQUIRED bindings are set.' in capsys.readouterr().out
  assert not os.listdir(tmp_path)


def test_the_tensorboard_writer_does_not_import_torch_or_boto3(tmp_path):
  """tensorboardX imports torch and boto3 when installed (a second per
  run); the writer hides them unless the program imported them itself, and
  they import normally afterwards."""
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  code = (
      'import sys\n'
      'from gintrain.runner.outputs import writers\n'
      f'w = writers.TensorBoardWriter({str(tmp_path)!r})\n'
      "w.write_scalars(1, {'loss': 1.0}, split='train'); w.close()\n"
      "print('torch' in sys.modules, sys.modules.get('torch', 0) is None)\n"
      "print('boto3' in sys.modules)\n"
      'import boto3\n'
      "print(hasattr(boto3, 'client'))\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True).stdout.split()
  assert out == ['False', 'False', 'False', 'True']
