"""Tasks: classification (incl. token labels), regression, start-up checks."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.runner import train
from gintrain.runner.errors import RunnerError
from gintrain.runner.models import plain
from gintrain.runner.tasks import classification
from gintrain.runner.tasks import regression


class TokenModel:
  """Embeds tokens and maps them to per-position logits (batch, time, C)."""

  def init(self, rng, x):
    return {'params': {'embed': jax.random.normal(rng, (5, 5))}}

  def apply(self, variables, x):
    return variables['params']['embed'][x]


def test_classification_takes_token_labels():
  task = classification.Classification(TokenModel())
  x = np.array([[0, 1, 2], [3, 4, 0]])
  batch = {'x': x, 'y': x, 'weights': np.array([[1, 1, 0], [1, 1, 1.]])}
  variables = task.init(jax.random.key(0), batch)
  loss, metrics, new = task.loss(variables['params'], {}, batch,
                                 jax.random.key(1))
  assert loss.shape == () and new == {}
  logits = variables['params']['embed'][x]
  per = -jax.nn.log_softmax(logits)[np.arange(2)[:, None],
                                    np.arange(3)[None], x]
  np.testing.assert_allclose(loss, (per * batch['weights']).sum() / 5,
                             rtol=1e-6)
  sums = task.eval(variables['params'], {},
                   {**batch, 'mask': np.array([1., 0.])})
  assert float(sums['count']) == 2.0  # row 0, positions with weight 1
  np.testing.assert_allclose(sums['loss'], per[0, :2].sum(), rtol=1e-6)


def test_classification_checks_logits_width():
  task = classification.Classification(plain.mlp(features=(4,),
                                                 num_classes=10))
  batch = {'x': jax.ShapeDtypeStruct((1, 3), jnp.float32),
           'y': jax.ShapeDtypeStruct((1,), jnp.int32)}
  variables = jax.eval_shape(task.init, jax.random.key(0), batch)
  task.check(variables, batch, {'num_classes': 10})
  with pytest.raises(RunnerError, match='outputs 10 logits but the data has'
                     ' 4 classes.*mlp.num_classes=4'):
    task.check(variables, batch, {'num_classes': 4})


def test_regression_loss_and_eval_sums():
  task = regression.Regression(plain.mlp(features=(), num_classes=2))
  batch = {'x': np.ones((3, 4), np.float32),
           'y': np.zeros((3, 2), np.float32),
           'mask': np.array([1., 1., 0.])}
  variables = task.init(jax.random.key(0), batch)
  out = task.model.apply(variables, batch['x'])
  loss, metrics, _ = task.loss(variables['params'], {}, batch, None)
  np.testing.assert_allclose(loss, np.mean(np.square(out)), rtol=1e-6)
  np.testing.assert_allclose(metrics['mae'], np.mean(np.abs(out)), rtol=1e-6)
  sums = task.eval(variables['params'], {}, batch)
  assert float(sums['count']) == 2.0
  np.testing.assert_allclose(sums['loss'],
                             np.mean(np.square(out), -1)[:2].sum(), rtol=1e-6)


def test_regression_experiment_from_gin(tmp_path):
  workdir = tmp_path / 'run'
  assert train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                '--gin_file=regression.gin',
                                '--gin.train.num_epochs=20']) == 0
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  evals = [r for r in rows if r['split'] == 'eval']
  # The target is standardised: predicting a constant scores about 1.
  assert evals[-1]['loss'] < 0.7, evals[-1]
  assert set(evals[-1]) >= {'loss', 'mae', 'time'}
  assert os.path.exists(workdir / 'metrics.png')


def test_logits_width_mismatch_fails_at_start_with_one_line(tmp_path, capsys):
  workdir = tmp_path / 'run'
  code = train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                '--gin.mlp.num_classes=4'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1
  assert err == ['gintrain: error: classification: mlp(features=(128,),'
                 ' num_classes=4) outputs 4 logits but the data has 10'
                 ' classes; set the model\'s number of classes to 10 (e.g.'
                 ' --gin.mlp.num_classes=10).'], err
  assert not os.path.exists(workdir / 'checkpoints')
