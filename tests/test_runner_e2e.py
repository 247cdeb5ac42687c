"""End-to-end runs of the runner, in-process (8 virtual CPU devices)."""

import json
import logging
import os
import sys

import jax
import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.runner.outputs import checkpoints as checkpointing
from gintrain.runner.parallel import preemption
from gintrain.runner import train

from tiny import run  # pylint: disable=g-bad-import-order



def records(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r['split'] == split]


def final_checkpoint(workdir):
  path = checkpoints.latest_checkpoint(os.path.join(workdir, 'checkpoints'))
  return path, checkpoints.restore_checkpoint(path, target=None)


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def test_parallel_modes_match(tmp_path):
  assert jax.device_count() == 8
  losses, params = {}, {}
  for mode in ('single', 'pmap', 'sharded'):
    workdir = tmp_path / mode
    assert run(workdir, f'--gin.train.parallelism="{mode}"') == 0
    losses[mode] = [r['loss'] for r in records(workdir, 'train')]
    losses[mode] += [r['loss'] for r in records(workdir, 'eval')]
    params[mode] = final_checkpoint(workdir)[1]['state']['params']
    settings = json.loads((workdir / 'settings.json').read_text())
    assert settings['gin']['train']['parallelism'] == mode
  assert len(losses['single']) == 6  # 3 train logs + 3 evals
  for mode in ('pmap', 'sharded'):
    np.testing.assert_allclose(losses[mode], losses['single'], rtol=1e-5)
    for a, b in zip(leaves(params[mode]), leaves(params['single'])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


RESUME_ARGS = ['--gin.train.num_steps=24', '--gin.checkpoint_policy.every_steps=8',
               '--gin.train.early_stopping=@runner.early_stopping()',
               '--gin.early_stopping.patience=100',
               '--gin.early_stopping.min_delta=0.001',
               '--gin.checkpoint_policy.best_metric="loss"',
               '--gin.checkpoint_policy.keep_best=2']


def _crash_at(step):
  def hook(s):
    if s == step:
      raise KeyboardInterrupt(f'crash at {s}')
  return hook


def _preempt_at(step):
  def hook(s):
    if s == step:
      preemption.request()
  return hook


def test_resume_is_bitwise_identical(tmp_path):
  assert run(tmp_path / 'straight', *RESUME_ARGS) == 0
  _, expected = final_checkpoint(tmp_path / 'straight')

  # A crash at step 13: the run resumes from the checkpoint of step 8.
  crashed = tmp_path / 'crashed'
  with pytest.raises(KeyboardInterrupt):
    run(crashed, *RESUME_ARGS, hooks=[_crash_at(13)])
  assert os.path.basename(final_checkpoint(crashed)[0]) == 'checkpoint_8'
  seen = []
  assert run(crashed, *RESUME_ARGS, '--resume=require',
             hooks=[seen.append]) == 0
  assert seen[0] == 9  # resumed from checkpoint_8

  # A preemption at step 13: checkpoint 13 is written, status 75.
  preempted = tmp_path / 'preempted'
  try:
    assert run(preempted, *RESUME_ARGS,
               hooks=[_preempt_at(13)]) == preemption.PREEMPTED_EXIT_CODE
  finally:
    preemption.reset()
  assert os.path.basename(final_checkpoint(preempted)[0]) == 'checkpoint_13'
  seen = []
  assert run(preempted, *RESUME_ARGS, hooks=[seen.append]) == 0
  assert seen[0] == 14  # resumed from checkpoint_13, not the older 8

  for workdir in (crashed, preempted):
    path, got = final_checkpoint(workdir)
    assert os.path.basename(path) == 'checkpoint_24'
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
    for (key, a), (_, b) in zip(flat_got, flat_want):
      assert np.array_equal(a, b), key  # params, opt_state, early stopping,
      # best record and data position, bit for bit
    best = sorted(os.listdir(workdir / 'best_checkpoints'))
    assert best == sorted(os.listdir(tmp_path / 'straight' /
                                     'best_checkpoints'))


def test_early_stopping_stops(tmp_path):
  # A zero learning rate leaves the eval loss constant: evals at 4, 8, 12;
  # the first improves (no best yet), the 2nd and 3rd do not; patience=1
  # stops at the second non-improving one.
  assert run(tmp_path, '--gin.optimizer.learning_rate=0.0',
             '--gin.train.num_steps=40',
             '--gin.train.early_stopping=@runner.early_stopping()',
             '--gin.early_stopping.patience=1') == 0
  assert [r['step'] for r in records(tmp_path, 'eval')] == [4, 8, 12]
  path, ckpt = final_checkpoint(tmp_path)
  assert os.path.basename(path) == 'checkpoint_12'
  assert ckpt['early_stopping']['should_stop']
  # Resuming an early-stopped run does not train further.
  assert run(tmp_path, '--gin.optimizer.learning_rate=0.0',
             '--gin.train.num_steps=40',
             '--gin.train.early_stopping=@runner.early_stopping()',
             '--gin.early_stopping.patience=1') == 0
  assert records(tmp_path, 'train')[-1]['step'] == 12


def test_keep_best_keeps_the_best(tmp_path):
  assert run(tmp_path, '--gin.train.num_steps=30', '--gin.train.eval_every=2',
             '--gin.optimizer.learning_rate=0.05',
             '--gin.checkpoint_policy.best_metric="accuracy"',
             '--gin.checkpoint_policy.best_mode="max"',
             '--gin.checkpoint_policy.keep_best=3') == 0
  evals = records(tmp_path, 'eval')
  assert len(evals) == 15
  # Best three by accuracy; ties go to the earlier step.
  ranked = sorted(evals, key=lambda r: (-r['accuracy'], r['step']))[:3]
  want = sorted(f'checkpoint_{r["step"]}' for r in ranked)
  assert sorted(os.listdir(tmp_path / 'best_checkpoints')) == want
  for r in ranked:
    ckpt = checkpoints.restore_checkpoint(
        str(tmp_path / 'best_checkpoints' / f'checkpoint_{r["step"]}'), None)
    assert int(ckpt['state']['step']) == r['step']
  _, final = final_checkpoint(tmp_path)
  assert list(final['best']['steps']) == [r['step'] for r in ranked]


def test_command_line_binding_changes_result_and_outputs(tmp_path):
  assert run(tmp_path / 'a') == 0
  assert run(tmp_path / 'b', '--gin_param=optimizer.learning_rate = 0.2',
             '--gin.train.seed=0') == 0
  loss_a = records(tmp_path / 'a', 'eval')[-1]['loss']
  loss_b = records(tmp_path / 'b', 'eval')[-1]['loss']
  assert loss_a != loss_b
  out = tmp_path / 'b'
  operative = (out / 'config.operative.gin').read_text()
  assert 'optimizer.learning_rate = 0.2' in operative
  assert 'train.num_steps = 12' in operative
  assert 'mlp.features = (16,)' in (out / 'config.parsed.gin').read_text()
  assert '--gin_bindings=optimizer.learning_rate = 0.2' in (
      out / 'flags.txt').read_text()
  for name in ('metrics.jsonl', 'metrics.png', 'hparams.json',
               'settings.json'):
    assert (out / name).stat().st_size > 0, name
  assert any(n.startswith('events.') for n in os.listdir(out / 'tensorboard'))
  assert sorted(os.listdir(out / 'checkpoints')) == [
      'checkpoint_12', 'checkpoint_4', 'checkpoint_8']
  hparams = json.loads((out / 'hparams.json').read_text())
  assert hparams['gin.optimizer.learning_rate'] == 0.2
  assert hparams['devices.device_count'] == 8
  assert 'versions.jax' in hparams and 'flags.workdir' in hparams
  train_rows = records(out, 'train')
  assert [r['step'] for r in train_rows] == [4, 8, 12]
  assert all(r['steps_per_sec'] > 0 for r in train_rows)


def test_resume_with_changed_settings_warns(tmp_path, caplog):
  assert run(tmp_path, '--gin.train.num_steps=4') == 0
  caplog.set_level(logging.WARNING)
  assert run(tmp_path, '--gin.train.num_steps=8',
             '--gin.optimizer.learning_rate=0.02',
             '--allow_config_change') == 0  # the optimizer: issue 22's guard
  warnings = [r.getMessage() for r in caplog.records
              if 'changed settings' in r.getMessage()]
  assert len(warnings) == 1
  assert 'gin.train.num_steps: 4 -> 8' in warnings[0]
  assert 'gin.optimizer.learning_rate: 0.01 -> 0.02' in warnings[0]
  # Only those two: flags such as --gin_bindings count through their effect.
  assert warnings[0].startswith('Resuming with changed settings (2): ')
  assert records(tmp_path, 'train')[-1]['step'] == 8


def test_init_from_loads_weights_only(tmp_path):
  assert run(tmp_path / 'a') == 0
  _, trained = final_checkpoint(tmp_path / 'a')
  assert run(tmp_path / 'b', f'--init_from={tmp_path / "a" / "checkpoints"}',
             '--gin.optimizer.learning_rate=0.0') == 0
  _, got = final_checkpoint(tmp_path / 'b')
  for a, b in zip(leaves(got['state']['params']),
                  leaves(trained['state']['params'])):
    np.testing.assert_array_equal(a, b)
  assert int(got['state']['opt_state']['0']['count']) == 12  # fresh optimizer


def test_dry_run(tmp_path, capsys):
  assert train.main_with_flags(
      ['gintrain', '--dry_run', '--gin_file=run.gin',
       '--gin_file=models/mlp.gin']) == 1
  out, err = capsys.readouterr()
  assert '#   train.dataset' in out and '#   train.optimizer' in out
  assert 'train.model = @models.mlp()' in out
  assert err.strip() == ('gintrain: error: unset %gin.REQUIRED: train.dataset,'
                         ' train.optimizer; bind them in a --gin_file or with'
                         ' --gin.NAME=VALUE (e.g. --gin.train.dataset=...).')
  assert train.main_with_flags(['gintrain', '--dry_run']) == 0
  out, _ = capsys.readouterr()
  assert 'All %gin.REQUIRED bindings are set.' in out
  assert '#   parameters: 9610' in out  # 64*128+128 + 128*10+10
  assert not os.listdir(tmp_path)


def test_user_model_and_dataset_through_gin(tmp_path, monkeypatch):
  (tmp_path / 'my_experiment.py').write_text(
      'import gin\n'
      'import numpy as np\n'
      'from gintrain.runner.data import datasets\n'
      'from gintrain.runner.models import plain as models\n'
      '@gin.configurable\n'
      'def my_model(width=8):\n'
      '  return models.mlp(features=(width,), num_classes=3)\n'
      '@gin.configurable\n'
      'def my_data(n=96):\n'
      '  rng = np.random.default_rng(0)\n'
      '  x = rng.normal(size=(n, 5)).astype(np.float32)\n'
      '  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)\n'
      '  return datasets.Dataset(x[:64], y[:64], x[64:], y[64:], 3, "mine")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert run(tmp_path / 'run', '--gin_bindings=import my_experiment',
             '--gin.train.model=@my_experiment.my_model',
             '--gin.my_model.width=6',
             '--gin.train.dataset=@my_experiment.my_data()') == 0
  _, ckpt = final_checkpoint(tmp_path / 'run')
  assert ckpt['state']['params']['Dense_0']['kernel'].shape == (5, 6)
  assert 'my_model.width = 6' in (
      tmp_path / 'run' / 'config.operative.gin').read_text()


def test_checkpoint_tree_check_names_leaves(tmp_path):
  assert run(tmp_path, '--gin.train.num_steps=4') == 0
  state = checkpoints.restore_checkpoint(str(tmp_path / 'checkpoints'),
                                         None)['state']
  state['params']['Dense_0']['kernel'] = state['params']['Dense_0'][
      'kernel'].astype(np.float16)
  del state['params']['Dense_1']['bias']
  with pytest.raises(checkpointing.RunnerError) as e:
    checkpointing.check_tree(
        checkpoints.restore_checkpoint(str(tmp_path / 'checkpoints'),
                                       None)['state'], state, 'ckpt')
  assert str(e.value) == (
      'ckpt does not match the model: params/Dense_0/kernel: float16[16, 16]'
      ' in the checkpoint, float32[16, 16] expected; params/Dense_1/bias:'
      ' missing from the checkpoint.')


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
