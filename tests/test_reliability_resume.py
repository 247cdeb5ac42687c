"""Resume reliability: torn metrics lines, corrupt latest checkpoints, the
settings diff on resume, the last partial log interval (issue 12, items 4,
8 and 11)."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from gintrain.lib import checkpoints as lib_checkpoints
from gintrain.runner import train
from gintrain.runner.outputs import checkpoints as checkpointing
from gintrain.runner.outputs import plots
from gintrain.runner.outputs import settings
from gintrain.runner.outputs import writers

from tiny import run  # pylint: disable=g-bad-import-order



def first_step_recorder():
  """A hook recording the steps it sees (the first is resume step + 1)."""
  seen = []
  return seen, seen.append


def lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
    return f.read().split(b'\n')


def steps_of(workdir, split):
  series = plots.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return series[(split, 'loss')][0]


def ckpt_names(workdir, folder='checkpoints'):
  return sorted(os.listdir(os.path.join(workdir, folder)))


# --- metrics.jsonl: readers --------------------------------------------------


def _write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def test_valid_last_line_without_newline_is_kept(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write(path, '{"step": 1, "split": "train", "loss": 3.0}\n'
               '{"step": 2, "split": "train", "loss": 2.0}')
  assert plots.read_metrics(path) == {('train', 'loss'): ([1, 2], [3.0, 2.0])}


def test_torn_lines_anywhere_are_skipped_with_one_warning(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  _write(path, '{"step": 1, "split": "train", "loss": 3.0}\n'
               '{"step": 2, "split": "tr\n'          # torn, then appended to
               '[1, 2]\n'                            # not an object
               '{"step": "3", "split": "train"}\n'   # step not an integer
               '{"step": 4, "split": "train", "loss": 1.0}\n'
               '\x00\x00\x00\n'                       # zeros from a crash
               '{"step": 5, "split": "train", "lo')
  with caplog.at_level(logging.WARNING):
    series = plots.read_metrics(path)
  assert series == {('train', 'loss'): ([1, 4], [3.0, 1.0])}
  warnings = [r.getMessage() for r in caplog.records
              if 'torn or invalid' in r.getMessage()]
  assert warnings == [f'{path}: skipped 5 torn or invalid line(s) (line 2,'
                      ' 3, 4, 6, 7).']


def test_bad_utf8_is_a_skipped_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(b'{"step": 1, "split": "train", "loss": 1.0}\n'
                   b'{"step": 2, "split": "train", "loss": 2.0, "x\xe2\x82\n')
  assert plots.read_metrics(path) == {('train', 'loss'): ([1], [1.0])}


def test_replayed_steps_last_record_wins(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write(path, ''.join(json.dumps(r) + '\n' for r in [
      {'step': 4, 'split': 'train', 'loss': 4.0},
      {'step': 8, 'split': 'train', 'loss': 8.0},
      {'step': 8, 'split': 'eval', 'loss': 80.0},
      {'step': 8, 'split': 'train', 'loss': 8.5},   # replayed after resume
      {'step': 12, 'split': 'train', 'loss': 12.0}]))
  series = plots.read_metrics(path)
  assert series[('train', 'loss')] == ([4, 8, 12], [4.0, 8.5, 12.0])
  assert series[('eval', 'loss')] == ([8], [80.0])


# --- metrics.jsonl: the writer repairs a torn tail ---------------------------


@pytest.mark.parametrize('content, expected, action', [
    (b'{"step": 1, "split": "train"}\n{"step": 2, "spl',
     b'{"step": 1, "split": "train"}\n', 'truncated'),
    (b'{"step": 1, "split": "tr', b'', 'truncated'),
    (b'{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}',
     b'{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n',
     'terminated'),
    (b'{"step": 1, "split": "train"}\n', b'{"step": 1, "split": "train"}\n',
     None),
    (b'', b'', None),
])
def test_repair_torn_tail(tmp_path, content, expected, action):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(content)
  assert writers.repair_torn_tail(path) == action
  assert path.read_bytes() == expected
  assert writers.repair_torn_tail(tmp_path / 'missing.jsonl') is None


def test_jsonl_writer_appends_after_a_torn_tail(tmp_path):
  (tmp_path / 'metrics.jsonl').write_bytes(
      b'{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "t')
  with writers.JsonlWriter(tmp_path) as writer:
    writer.write_scalars(2, {'loss': 0.5})
  records = [json.loads(l) for l in lines(tmp_path) if l]
  assert [(r['step'], r['loss']) for r in records] == [(1, 1.0), (2, 0.5)]


# --- end to end ----------------------------------------------------------------


def test_resume_after_torn_metrics_line_exits_0_and_plots(tmp_path, caplog):
  assert run(tmp_path) == 0
  # A crash cut the last record short; an older torn line sits mid-file.
  data = b''.join(lines(tmp_path)[:1]) + b'\n{"step": 3, "sp\n' + b'\n'.join(
      lines(tmp_path)[1:])
  (tmp_path / 'metrics.jsonl').write_bytes(data + b'{"step": 13, "split": "tr')
  os.remove(tmp_path / 'metrics.png')
  seen, hook = first_step_recorder()
  with caplog.at_level(logging.WARNING):
    # optimizer.b1 is bound only now (to adam's default): a setting the old
    # run lacks.
    assert run(tmp_path, '--gin.train.num_steps=16',
               '--gin.optimizer.b1=0.9', '--allow_config_change',
               hooks=[hook]) == 0
  assert seen[0] == 13  # resumed from checkpoint_12
  assert (tmp_path / 'metrics.png').read_bytes()[:4] == b'\x89PNG'
  assert steps_of(tmp_path, 'train') == [4, 8, 12, 16]
  raw = lines(tmp_path)
  assert raw[-1] == b'' and raw[1] == b'{"step": 3, "sp'  # only that one bad
  assert all(json.loads(l) for i, l in enumerate(raw) if l and i != 1)
  assert not any(b'"step": 13, "split": "tr"' in l for l in raw)
  messages = ' | '.join(r.getMessage() for r in caplog.records)
  assert 'removed a torn last line' in messages
  assert ('Resuming with changed settings (2): gin.optimizer.b1: <unset> ->'
          ' 0.9; gin.train.num_steps: 12 -> 16') in messages


def test_settings_changes_report_new_and_removed_keys():
  old = {'gin.train.batch_size': 32, 'flags.workdir': '/w'}
  new = {'gin.train.batch_size': 32, 'flags.workdir': '/w',
         'gin.optimizer.b1': 0.8}
  assert settings.changes(old, new) == ['gin.optimizer.b1: <unset> -> 0.8']
  assert settings.changes(new, old) == ['gin.optimizer.b1: 0.8 -> <unset>']
  assert settings.changes(old, {**new, 'flags.resume': 'require'}) == [
      'gin.optimizer.b1: <unset> -> 0.8']  # flags.resume is ignored


def test_last_partial_log_interval_is_recorded(tmp_path):
  assert run(tmp_path, '--gin.train.num_steps=10') == 0
  assert steps_of(tmp_path, 'train') == [4, 8, 10]
  assert steps_of(tmp_path, 'eval') == [4, 8, 10]
  assert ckpt_names(tmp_path) == ['checkpoint_10', 'checkpoint_4',
                                  'checkpoint_8']


# --- a corrupt latest checkpoint ----------------------------------------------


def _restore(path):
  return lib_checkpoints.restore_checkpoint(str(path), target=None)


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_corrupt_latest_checkpoint_resumes_from_the_previous(
    tmp_path, caplog, damage):
  straight = tmp_path / 'straight'
  assert run(straight, '--gin.train.num_steps=16') == 0
  workdir = tmp_path / 'run'
  assert run(workdir) == 0
  assert ckpt_names(workdir) == ['checkpoint_12', 'checkpoint_4',
                                 'checkpoint_8']
  latest = workdir / 'checkpoints' / 'checkpoint_12'
  data = latest.read_bytes()
  damaged = (data[:len(data) // 2] if damage == 'truncate'
             else np.random.default_rng(0).bytes(len(data)))
  latest.write_bytes(damaged)
  seen, hook = first_step_recorder()
  with caplog.at_level(logging.WARNING):
    assert run(workdir, '--gin.train.num_steps=16', hooks=[hook]) == 0
  assert seen[0] == 9  # resumed from checkpoint_8
  skipped = [r.getMessage() for r in caplog.records
             if 'does not read back' in r.getMessage()]
  assert len(skipped) == 1 and str(latest) in skipped[0], skipped
  # The bad file is kept aside, byte for byte; the run saved 12 and 16 anew.
  moved = workdir / checkpointing.CORRUPT_DIR / 'checkpoint_12'
  assert moved.read_bytes() == damaged
  assert ckpt_names(workdir) == ['checkpoint_12', 'checkpoint_16',
                                 'checkpoint_8']
  got = _restore(workdir / 'checkpoints' / 'checkpoint_16')
  want = _restore(straight / 'checkpoints' / 'checkpoint_16')
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    assert np.array_equal(a, b)  # bitwise as an uninterrupted run


def test_every_checkpoint_corrupt_starts_afresh(tmp_path, caplog):
  assert run(tmp_path, '--gin.train.num_steps=8') == 0
  for name in ckpt_names(tmp_path):
    (tmp_path / 'checkpoints' / name).write_bytes(b'\x81\xa5state')
  seen, hook = first_step_recorder()
  with caplog.at_level(logging.WARNING):
    assert run(tmp_path, '--gin.train.num_steps=8', hooks=[hook]) == 0
  assert seen[0] == 1
  assert sorted(os.listdir(tmp_path / checkpointing.CORRUPT_DIR)) == [
      'checkpoint_4', 'checkpoint_8']
  assert sum('does not read back' in r.getMessage()
             for r in caplog.records) == 2
  # --resume=require finds nothing readable: one line, status 1.
  for name in ckpt_names(tmp_path):
    (tmp_path / 'checkpoints' / name).write_bytes(b'')
  assert run(tmp_path, '--resume=require') == 1
