"""The language model on streaming text: grain source sharding and exact
resume, microbatches, bfloat16, flat memory as the corpus grows, SIGKILL
and relaunch (1 process here; 2 processes, sharded, in tests/test_sharding.py)."""

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
from gintrain.runner.data import base
from gintrain.runner.data import grain_source
from gintrain.runner.data import text

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(HERE, 'user_plugins')
sys.path.insert(0, os.path.join(HERE, 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

# A small LM on the standard library's .py files: fast on 2 CPU cores.
TINY_LM = """
include 'lm.gin'
transformer.width = 32
transformer.depth = 1
transformer.heads = 2
transformer.max_len = 32
text_files.length = 32
text_files.max_eval_examples = 64
train.batch_size = 8
train.num_steps = 30
train.log_every = 10
train.eval_every = 30
train.eval_batch_size = 32
train.parallelism = 'single'
train.actions = []
checkpoint_policy.every_steps = 10
warmup_cosine_decay_schedule.warmup_steps = 5
warmup_cosine_decay_schedule.decay_steps = 200
"""


@pytest.fixture(name='gin_file')
def _gin_file(tmp_path):
  path = tmp_path / 'tiny_lm.gin'
  path.write_text(TINY_LM)
  return str(path)


def _latest(workdir):
  return checkpoints.restore_checkpoint(str(workdir / 'checkpoints'), None)


def _records(workdir, split):
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  return [r for r in rows if r['split'] == split]


def test_text_files_split_is_stable_and_examples_are_windows(tmp_path):
  for i in range(40):
    (tmp_path / f'f{i}.txt').write_bytes(bytes(range(65, 65 + 30)) * (i + 1))
  source = text.text_files(str(tmp_path), '*.txt', length=16,
                           holdout_fraction=0.2, shuffle=False)
  again = text.text_files(str(tmp_path), '*.txt', length=16,
                          holdout_fraction=0.2, shuffle=False)
  assert source.info == again.info and source.info['heldout_files'] > 0
  source.bind(base.Spec(batch_size=4, eval_batch_size=4))
  batch = source.next_batch()
  assert batch['tokens'].shape == (4, 17) and batch['tokens'].dtype == np.int32
  # windows overlap by one byte: every byte but the first is a target once
  assert batch['tokens'][0, 16] == batch['tokens'][1, 0]


def test_grain_source_reads_only_its_rows_of_the_global_batch():
  examples = [{'x': np.array([i], np.int32)} for i in range(64)]
  one = grain_source.GrainSource(examples)
  one.bind(base.Spec(batch_size=8, eval_batch_size=8, seed=3))
  shards = []
  for p in range(2):
    s = grain_source.GrainSource(examples)
    s.bind(base.Spec(batch_size=8, eval_batch_size=8, seed=3,
                     process_index=p, process_count=2))
    shards.append(s)
  for _ in range(20):  # across epoch boundaries too
    whole = one.next_batch()['x'][:, 0]
    parts = [s.next_batch()['x'][:, 0] for s in shards]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
  # The position is the global step, the same on every process.
  assert one.get_state() == shards[0].get_state() == shards[1].get_state()


def test_microbatches_give_the_same_update(tmp_path, gin_file):
  params = {}
  for n in (1, 4):
    workdir = tmp_path / f'mb{n}'
    assert train.main_with_flags([
        'gintrain', f'--workdir={workdir}', f'--gin_file={gin_file}',
        '--gin.train.num_steps=50', f'--gin.train.microbatches={n}']) == 0
    params[n] = _latest(workdir)['state']['params']
  for a, b in zip(jax.tree_util.tree_leaves(params[1]),
                  jax.tree_util.tree_leaves(params[4])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_microbatches_must_divide_the_batch(tmp_path, gin_file, capsys):
  assert train.main_with_flags([
      'gintrain', f'--workdir={tmp_path / "x"}', f'--gin_file={gin_file}',
      '--gin.train.microbatches=3']) == 1
  assert 'train.microbatches=3 must divide' in capsys.readouterr().err


def test_bfloat16_reaches_float32_loss(tmp_path, gin_file):
  loss = {}
  for dtype in ('float32', 'bfloat16'):
    workdir = tmp_path / dtype
    assert train.main_with_flags([
        'gintrain', f'--workdir={workdir}', f'--gin_file={gin_file}',
        '--gin.train.num_steps=150', '--gin.train.eval_every=150',
        f'--gin.transformer.dtype="{dtype}"']) == 0
    final = _records(workdir, 'eval')[-1]
    loss[dtype] = final['loss']
    assert _latest(workdir)['state']['params']['Embed_0'][
        'embedding'].dtype == np.float32  # params stay float32
  assert abs(loss['bfloat16'] - loss['float32']) <= 0.05 * loss['float32']


def _launch(workdir, gin_file, *args):
  env = dict(harness.env(), PYTHONPATH=os.pathsep.join(
      [PLUGINS, harness.env()['PYTHONPATH']]))
  return subprocess.run(
      [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={workdir}',
       f'--gin_file={gin_file}', *args], env=env, capture_output=True,
      text=True, timeout=600, check=False)


def _assert_same_state(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a['state'])
  flat_b = jax.tree_util.tree_leaves_with_path(b['state'])
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_sigkill_mid_epoch_and_relaunch_is_bitwise_identical(tmp_path,
                                                             gin_file):
  straight = _launch(tmp_path / 'straight', gin_file)
  assert straight.returncode == 0, straight.stderr[-2000:]
  killed = _launch(tmp_path / 'killed', gin_file,
                   '--gin_bindings=import plugins',
                   '--gin.train.actions=[@plugins.KillAt()]',
                   '--gin.KillAt.step=17')
  assert killed.returncode == -9, killed.stderr[-2000:]
  ckpt = checkpoints.restore_checkpoint(
      str(tmp_path / 'killed' / 'checkpoints' / 'checkpoint_10'), None)
  # The grain iterator's own state is in the checkpoint: 10 batches taken.
  assert json.loads(ckpt['data']['grain']) == {'next_index': 10}
  resumed = _launch(tmp_path / 'killed', gin_file)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert re.search(r'Resumed from \S+checkpoint_10 \(step 10\)',
                   resumed.stderr), resumed.stderr[-3000:]
  a, b = _latest(tmp_path / 'straight'), _latest(tmp_path / 'killed')
  assert int(a['state']['step']) == 30
  _assert_same_state(a, b)
  assert a['data'] == b['data'] == {'grain': '{"next_index": 30}', 'step': 30}


def _peak_rss_mb(workdir, gin_file, *args):
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gintrain.runner.train', f'--workdir={workdir}',
       f'--gin_file={gin_file}', '--gin.train.num_steps=20',
       '--gin.checkpoint_policy.every_steps=0', *args],
      env=harness.env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(proc.pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0
  return usage.ru_maxrss / 1024


def test_memory_stays_flat_as_the_corpus_grows(tmp_path, gin_file):
  plain = _peak_rss_mb(tmp_path / 'plain', gin_file)
  tenfold = _peak_rss_mb(tmp_path / 'tenfold', gin_file,
                         '--gin.text_files.repeat=10')
  assert tenfold <= 1.10 * plain, (plain, tenfold)


