"""A task, a data source, an action and a metric writer from outside the
package (tests/user_plugins/plugins.py), bound only through a gin file."""

import json
import os

import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.runner import train

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'user_plugins')


def _gin(tmp_path, steps):
  path = tmp_path / 'plugins.gin'
  path.write_text(f"""
include 'run.gin'
import plugins

train.model = @models.mlp()
mlp.features = (16,)
mlp.num_classes = 3
train.dataset = @plugins.Blobs()
train.task = @plugins.HingeTask
train.actions = [@plugins.LogSteps()]
LogSteps.path = '{tmp_path / 'steps.jsonl'}'
LogSteps.every_steps = 5
train.writers = [@writers.jsonl, @plugins.CsvWriter]
train.optimizer = @optimizers.optimizer()
optimizer.learning_rate = 0.01
train.num_epochs = None
train.num_steps = {steps}
train.batch_size = 32
train.log_every = 5
train.eval_every = 10
checkpoint_policy.every_steps = 10
""")
  return str(path)


@pytest.fixture(autouse=True)
def _plugins_on_path(monkeypatch):
  monkeypatch.syspath_prepend(PLUGINS)


def _csv(workdir):
  rows = [line.strip().split(',') for line in
          open(os.path.join(workdir, 'metrics.csv'), encoding='utf-8')]
  return {(split, int(step), name): float(value)
          for split, step, name, value in rows}


def test_user_task_source_action_and_writer(tmp_path):
  workdir = tmp_path / 'run'
  assert train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                f'--gin_file={_gin(tmp_path, 20)}']) == 0
  csv = _csv(workdir)
  # The writer got the task's own train metric and its eval loss.
  assert ('train', 5, 'violations') in csv
  assert ('train', 20, 'loss') in csv and ('eval', 20, 'loss') in csv
  assert csv[('eval', 20, 'loss')] < csv[('eval', 10, 'loss')] or (
      csv[('eval', 20, 'loss')] < 0.5)
  # The built-in JSONL writer, bound next to it, got the same records.
  jsonl = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert {r['step'] for r in jsonl if r['split'] == 'eval'} == {10, 20}
  # The action ran every 5 steps, seeing the train metrics.
  logged = [json.loads(l) for l in open(tmp_path / 'steps.jsonl')]
  assert [r['step'] for r in logged] == [5, 10, 15, 20]
  assert all('violations' in r for r in logged)
  # The source's own state is in the checkpoint.
  ckpt = checkpoints.restore_checkpoint(str(workdir / 'checkpoints'),
                                        target=None)
  assert ckpt['data'] == {'step': 20}
  assert int(ckpt['state']['step']) == 20


def test_user_source_resumes_from_its_own_state(tmp_path):
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  flags = ['gintrain', f'--gin_file={_gin(tmp_path, 30)}']
  assert train.main_with_flags([*flags, f'--workdir={straight}']) == 0
  assert train.main_with_flags([*flags, f'--workdir={split}',
                                '--gin.train.num_steps=20']) == 0
  assert train.main_with_flags([*flags, f'--workdir={split}']) == 0
  a = checkpoints.restore_checkpoint(str(straight / 'checkpoints'), None)
  b = checkpoints.restore_checkpoint(str(split / 'checkpoints'), None)
  assert b['data'] == {'step': 30}
  for x, y in zip(*(np.asarray(v) for v in (
      [a['state']['params']['Dense_0']['kernel']],
      [b['state']['params']['Dense_0']['kernel']]))):
    np.testing.assert_array_equal(x, y)
