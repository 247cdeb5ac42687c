"""Fine-tuning: --init_from with include/exclude/rename rules."""

import json
import logging
import os

import gin
import jax
import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.runner import train
from gintrain.runner.data import datasets
from gintrain.runner.errors import RunnerError
from gintrain.runner.training import init_from as checkpointing


@gin.configurable
def digits_subset(classes=(0, 1, 2, 3, 4)):
  """The image digits, only ``classes`` (labels kept)."""
  full = datasets.digits(image=True)
  keep_train = np.isin(full.y_train, classes)
  keep_test = np.isin(full.y_test, classes)
  return datasets.Dataset(full.x_train[keep_train], full.y_train[keep_train],
                          full.x_test[keep_test], full.y_test[keep_test],
                          max(classes) + 1, name=f'digits {classes}')


CNN = ['--gin_file=run.gin', '--gin_file=models/cnn.gin',
       '--gin_file=datasets/digits_image.gin', '--gin_file=optimizers/adam.gin',
       '--gin.optimizer.learning_rate=0.003', '--gin.train.batch_size=64',
       '--gin.checkpoint_policy.every_steps=0']


def _params(workdir):
  path = checkpoints.latest_checkpoint(os.path.join(workdir, 'checkpoints'))
  return checkpoints.restore_checkpoint(path, target=None)['state']['params']


def test_finetune_new_head(tmp_path, caplog):
  pre = tmp_path / 'pretrain'
  assert train.main_with_flags(
      ['gintrain', f'--workdir={pre}', *CNN, '--gin.cnn.num_classes=5',
       '--gin.train.dataset=@digits_subset()', '--gin.train.num_epochs=10']) == 0
  backbone = _params(pre)
  fine = tmp_path / 'fine'
  caplog.set_level(logging.INFO, logger='absl')
  assert train.main_with_flags(
      ['gintrain', f'--workdir={fine}', *CNN, f'--init_from={pre}',
       "--gin.init_from.exclude=['^Dense_1/']", '--verbosity=0',
       '--gin.train.num_epochs=1', '--gin.optimizer.learning_rate=0.0']) == 0
  # With learning rate 0 the saved params are the initial ones: the backbone
  # is the checkpoint's, the head a fresh init (as a run without init_from).
  got = _params(fine)
  fresh = tmp_path / 'fresh'
  assert train.main_with_flags(
      ['gintrain', f'--workdir={fresh}', *CNN, '--gin.train.num_epochs=1',
       '--gin.optimizer.learning_rate=0.0']) == 0
  init = _params(fresh)
  for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
    for name in ('kernel', 'bias'):
      np.testing.assert_array_equal(got[layer][name], backbone[layer][name])
  assert got['Dense_1']['kernel'].shape == (64, 10)
  np.testing.assert_array_equal(got['Dense_1']['kernel'],
                                init['Dense_1']['kernel'])
  report = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith('init_from ')]
  assert any('loaded 6 leaves: Conv_0/bias, Conv_0/kernel' in line
             for line in report), report
  assert any('left at their initial value (2): Dense_1/bias, Dense_1/kernel'
             in line for line in report), report
  assert any('unused in the checkpoint (2): Dense_1/bias, Dense_1/kernel'
             in line for line in report), report
  # Fine-tuned on all 10 classes.
  tuned = tmp_path / 'tuned'
  assert train.main_with_flags(
      ['gintrain', f'--workdir={tuned}', *CNN, f'--init_from={pre}',
       "--gin.init_from.exclude=['^Dense_1/']",
       '--gin.train.num_epochs=20', '--gin.optimizer.learning_rate=0.01']) == 0
  with open(tuned / 'metrics.jsonl', encoding='utf-8') as f:
    evals = [r for r in map(json.loads, f) if r['split'] == 'eval']
  assert evals[-1]['accuracy'] >= 0.95, evals[-1]


def _tree():
  rng = np.random.default_rng(0)
  return {'enc': {'kernel': rng.normal(size=(3, 4)).astype(np.float32)},
          'head': {'kernel': rng.normal(size=(4, 2)).astype(np.float32)}}


def test_rules_rename_and_errors():
  ckpt = {'encoder': {'kernel': np.ones((3, 4), np.float32)},
          'head': {'kernel': np.ones((4, 5), np.float32)}}
  params = _tree()
  rules = checkpointing.InitFrom('x', exclude=['^head/'],
                                 rename=[('^encoder/', 'enc/')])
  out, report = checkpointing.select_params(rules, params, ckpt)
  np.testing.assert_array_equal(out['enc']['kernel'], 1.0)
  np.testing.assert_array_equal(out['head']['kernel'],
                                params['head']['kernel'])
  assert report.loaded == {'enc/kernel': 'encoder/kernel'}
  assert report.initial == ['head/kernel']
  assert report.unused == ['head/kernel']
  # An included leaf of another shape: one line naming it.
  with pytest.raises(RunnerError) as e:
    checkpointing.select_params(
        checkpointing.InitFrom('x', rename=[('^encoder/', 'enc/')]),
        params, ckpt)
  assert str(e.value) == (
      '--init_from=x does not match the model: head/kernel: float32[4, 5] in'
      ' the checkpoint, float32[4, 2] expected (exclude it with'
      ' init_from.exclude to start it afresh).')
  with pytest.raises(RunnerError, match=r'enc/kernel: missing from the'
                     ' checkpoint'):
    checkpointing.select_params(checkpointing.InitFrom('x',
                                                       exclude=['head']),
                                params, ckpt)
  with pytest.raises(RunnerError, match=r"init_from.exclude: '\(' is not a"
                     ' regular expression'):
    checkpointing.InitFrom('x', exclude=['('])
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
      params)
