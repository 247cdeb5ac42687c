"""Issue 17: a workdir on S3 (moto, tests/s3_server.py) works for every
command: training with keep-best pruning and a profile, ``gintrain eval``,
``--init_from=s3://...``, ``gintrain ckpt ls/inspect/diff``, and the
samples action of a language model."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position

from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.lib import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.cli import ckpt  # pylint: disable=g-import-not-at-top,wrong-import-position

from tiny import TINY  # pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order

KEEP_BEST = ["--gin.checkpoint_policy.best_metric='loss'",
             '--gin.checkpoint_policy.keep_best=1',
             '--gin.train.profile_steps=(2, 3)']


@pytest.fixture(scope='module', name='run_url')
def _run_url(s3):  # pylint: disable=redefined-outer-name
  """A finished tiny run on S3 (12 steps, eval and checkpoints every 4)."""
  s3.create_bucket('structure')
  url = 's3://structure/run'
  assert train.main_with_flags(['gintrain', f'--workdir={url}', *TINY,
                                *KEEP_BEST]) == 0
  return url


def test_training_keeps_one_best_and_writes_the_profile(run_url):
  names = storage.listdir(f'{run_url}/best_checkpoints')
  # keep_best=1: the evicted best checkpoints (and sidecars) are gone.
  assert [n for n in names if n.startswith('checkpoint_')] == [
      'checkpoint_12'], names
  assert 'checkpoint_12' in storage.listdir(f'{run_url}/checkpoints')
  profile = f'{run_url}/profile'
  assert storage.isdir(profile), storage.listdir(run_url)
  fs, path = storage.filesystem(profile)
  assert any(f.endswith('.xplane.pb') for f in fs.find(path)), fs.find(path)
  for name in ('config.parsed.gin', 'flags.txt', 'settings.json',
               'metrics.jsonl', 'metrics.png', 'config.operative.gin'):
    assert storage.isfile(f'{run_url}/{name}'), name


def test_eval_of_an_s3_workdir(run_url, capsys):
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', 'eval', f'--workdir={run_url}',
                                '--checkpoint=8']) == 0
  out = capsys.readouterr().out
  assert f'eval_only step 8 ({run_url}/checkpoints/checkpoint_8):' in out
  records = [json.loads(line) for line in storage.read_text(
      f'{run_url}/metrics.jsonl').splitlines()]
  assert records[-1]['split'] == 'eval_only' and records[-1]['step'] == 8


def test_init_from_s3(run_url, tmp_path, capsys):
  def params(workdir):
    tree = checkpoints.restore_checkpoint(f'{workdir}/checkpoints', None)
    return tree['state']['params']

  fresh, fine = tmp_path / 'fresh', f'{run_url}_fine'
  assert train.main_with_flags(['gintrain', f'--workdir={fresh}', *TINY,
                                '--gin.train.num_steps=4']) == 0
  assert train.main_with_flags([
      'gintrain', f'--workdir={fine}', *TINY, '--gin.train.num_steps=4',
      f'--init_from={run_url}/checkpoints/checkpoint_8']) == 0
  a, b = params(fresh), params(fine)  # a local and an S3 workdir
  assert not np.allclose(a['Dense_0']['kernel'], b['Dense_0']['kernel'])
  capsys.readouterr()
  assert train.main_with_flags([  # a workdir URL: its latest checkpoint
      'gintrain', f'--workdir={tmp_path / "bad"}', *TINY,
      '--gin.mlp.features=(8,)', f'--init_from={run_url}']) == 1
  err = capsys.readouterr().err
  assert f'--init_from={run_url} does not match the model' in err, err


def test_ckpt_ls_inspect_diff_on_s3(run_url, capsys):
  capsys.readouterr()
  assert ckpt.main(['ls', run_url]) == 0
  out = capsys.readouterr().out
  assert f'{run_url}/checkpoints: 3 checkpoint(s)' in out, out
  assert f'{run_url}/best_checkpoints: 1 checkpoint(s)' in out, out
  assert out.count('complete') == 4, out
  rows = ckpt.list_checkpoints(f'{run_url}/checkpoints')
  assert [r['step'] for r in rows] == [4, 8, 12]
  info = ckpt.inspect(f'{run_url}/checkpoints/checkpoint_12')
  assert info['step'] == 12 and info['parameters']['arrays'] == 4
  local = ckpt.inspect(run_url)  # a workdir: its latest checkpoint
  assert local['leaves'] == info['leaves']
  d = ckpt.diff(f'{run_url}/checkpoints/checkpoint_8',
                f'{run_url}/checkpoints/checkpoint_12')
  assert any(r['path'] == 'state/step' for r in d['differ']), d
  assert ckpt.diff(f'{run_url}/checkpoints/checkpoint_12',
                   f'{run_url}/best_checkpoints/checkpoint_12')['differ'] == []


TINY_LM = """
include 'lm.gin'
transformer.width = 16
transformer.depth = 1
transformer.heads = 2
transformer.max_len = 16
text_files.length = 16
text_files.max_eval_examples = 8
train.batch_size = 4
train.num_steps = 2
train.log_every = 1
train.eval_every = 2
train.eval_batch_size = 8
train.parallelism = 'single'
train.actions = [@actions.write_samples()]
actions.write_samples.num = 2
actions.write_samples.prompt_length = 4
checkpoint_policy.every_steps = 0
"""


def test_samples_action_on_s3(run_url, tmp_path):
  gin_file = tmp_path / 'lm.gin'
  gin_file.write_text(TINY_LM)
  url = run_url + '_lm'
  assert train.main_with_flags(['gintrain', f'--workdir={url}',
                                f'--gin_file={gin_file}']) == 0
  text = storage.read_text(f'{url}/samples.txt')
  assert text.count('=== prompt (step 2) ===') == 2, text
