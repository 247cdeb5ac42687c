"""Training-mode models from a user's module, bound through gin: a flax
linen CNN with Dropout and BatchNorm, and an nnx MLP through the adapter."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.runner import train
from gintrain.runner.data import datasets

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'user_plugins')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CNN_GIN = """
include 'run.gin'
include 'datasets/digits_image.gin'
include 'optimizers/adam.gin'
import flax_models
train.model = @flax_models.linen_cnn()
optimizer.learning_rate = 0.003
train.num_epochs = None
train.num_steps = 30
train.batch_size = 32
train.log_every = 10
train.eval_every = 15
train.parallelism = 'single'
checkpoint_policy.every_steps = 10
"""


@pytest.fixture(autouse=True)
def _plugins_on_path(monkeypatch):
  monkeypatch.syspath_prepend(PLUGINS)


def _gin(tmp_path, text, name='exp.gin'):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _run(workdir, gin_file, *args):
  return train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                f'--gin_file={gin_file}', *args])


def _records(workdir, split):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in rows if r['split'] == split]


def _latest(workdir):
  return checkpoints.restore_checkpoint(
      os.path.join(workdir, 'checkpoints'), target=None)


def test_linen_dropout_is_active_in_training(tmp_path):
  gin_file = _gin(tmp_path, CNN_GIN)
  losses = {}
  for rate in (0.0, 0.5):
    workdir = tmp_path / f'rate{rate}'
    assert _run(workdir, gin_file, f'--gin.linen_cnn.dropout={rate}') == 0
    losses[rate] = [r['loss'] for r in _records(workdir, 'train')]
  # Same data, init and steps: only dropout differs, and it is on.
  assert losses[0.0][0] != losses[0.5][0]
  assert not np.allclose(losses[0.0], losses[0.5])


def test_linen_batch_stats_train_checkpoint_and_eval(tmp_path):
  from flax_models import CNN  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  assert _run(workdir, _gin(tmp_path, CNN_GIN)) == 0
  ckpt = _latest(workdir)
  stats = ckpt['state']['model_state']['batch_stats']['BatchNorm_0']
  # Initialised to mean 0, var 1; training moved them.
  assert np.abs(stats['mean']).max() > 1e-3
  assert np.abs(stats['var'] - 1).max() > 1e-3
  # The final eval used them, in eval mode: recompute it with flax.
  data = datasets.digits(image=True)
  variables = {'params': ckpt['state']['params'],
               'batch_stats': ckpt['state']['model_state']['batch_stats']}
  logits = CNN().apply(variables, data.x_test, train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == data.y_test))
  final = _records(workdir, 'eval')[-1]
  assert final['step'] == 30
  assert final['accuracy'] == pytest.approx(accuracy, abs=1e-6)
  # ... and they matter: the initial statistics give another result.
  fresh = {**variables, 'batch_stats': jax.tree_util.tree_map(
      lambda x: np.ones_like(x) if x is stats['var'] else np.zeros_like(x),
      variables['batch_stats'])}
  fresh['batch_stats']['BatchNorm_0']['var'] = np.ones_like(stats['var'])
  other = CNN().apply(fresh, data.x_test, train=False)
  assert not np.allclose(other, logits)


def _launch(workdir, gin_file, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [PLUGINS, os.environ.get('PYTHONPATH', '')]))
  return subprocess.run(
      [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={workdir}',
       f'--gin_file={gin_file}', *args], env=env, capture_output=True,
      text=True, timeout=600, check=False)


def test_linen_sigkill_and_relaunch_is_bitwise_identical(tmp_path):
  gin_file = _gin(tmp_path, CNN_GIN)
  straight = _launch(tmp_path / 'straight', gin_file)
  assert straight.returncode == 0, straight.stderr[-2000:]
  killed = _launch(tmp_path / 'killed', gin_file,
                   '--gin_bindings=import plugins',
                   '--gin.train.actions=[@plugins.KillAt()]',
                   '--gin.KillAt.step=17')
  assert killed.returncode == -9, killed.stderr[-2000:]
  resumed = _launch(tmp_path / 'killed', gin_file)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  # It resumed from the last checkpoint before the kill, not from scratch.
  match = re.search(r'Resumed from \S+checkpoint_(\d+) \(step (\d+)\)',
                    resumed.stderr)
  assert match and match.group(2) == '10', resumed.stderr[-3000:]
  a, b = _latest(tmp_path / 'straight'), _latest(tmp_path / 'killed')
  assert int(a['state']['step']) == int(b['state']['step']) == 30
  flat_a = jax.tree_util.tree_leaves_with_path(a['state'])
  flat_b = jax.tree_util.tree_leaves_with_path(b['state'])
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  assert any('batch_stats' in jax.tree_util.keystr(p) for p, _ in flat_a)
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


NNX_GIN = """
include 'run.gin'
include 'datasets/digits.gin'
include 'optimizers/adam.gin'
import flax_models
train.model = @models.nnx_model()
nnx_model.module = @flax_models.NnxMLP
NnxMLP.features = 64
optimizer.learning_rate = 0.01
train.num_epochs = None
train.num_steps = 120
train.batch_size = 64
train.log_every = 40
train.eval_every = 60
train.parallelism = 'single'
"""


def test_nnx_module_with_dropout_trains_through_the_adapter(tmp_path):
  gin_file = _gin(tmp_path, NNX_GIN)
  first = {}
  for rate in (0.0, 0.5):
    workdir = tmp_path / f'nnx{rate}'
    assert _run(workdir, gin_file, f'--gin.NnxMLP.dropout={rate}') == 0
    first[rate] = _records(workdir, 'train')[0]['loss']
    final = _records(workdir, 'eval')[-1]
    assert final['accuracy'] > 0.85, final
  assert first[0.0] != first[0.5]  # dropout on in training
  params = _latest(tmp_path / 'nnx0.5')['state']['params']
  assert params['hidden']['kernel'].shape == (64, 64)
