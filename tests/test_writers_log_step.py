"""What a log step asks of the host (issue 17: the runner's overhead at a
log line every 50 steps): the train record written ``delay`` steps after
its fetch, through the writers (and nothing in between); a one-shot action
(``runner.actions.once.Once``, the operative config's writer) that the loop
skips after the first step; ``hooks=`` taking actions. One tiny run (about
5 s on 2 cores)."""

import doctest
import glob
import json
import types

import pytest

from gintrain.runner.actions import base
from gintrain.runner.actions import deferred
from gintrain.runner.actions import goodput as goodput_action
from gintrain.runner.actions import once
from gintrain.runner.actions import report
from gintrain.runner.training import action_list
import test_writers_events  # pylint: disable=g-bad-import-order
from test_writers import ListWriter
from tensorboardX.proto import event_pb2  # after it: no torch
from tiny import run


def _loop(action, steps, records_at, total):
  """The loop's calls of ``action`` (runner.actions.base): the steps it
  was due at (a record at the steps of ``records_at``), then its end."""
  due = []
  for step in range(1, steps + 1):
    metrics = {'train': {'loss': step / 10}} if step in records_at else {}
    if action.due(step, False):
      due.append(step)
      action(step, None, metrics)
  action.end(total, None, {'train': {'loss': total / 10}}
             if total in records_at else {})
  return due


def test_the_train_record_is_written_delay_steps_after_its_fetch():
  rows = ListWriter()
  action = report.ReportTrain(rows, total=60, log=False, delay=8)
  action.bind(types.SimpleNamespace(config=types.SimpleNamespace(
      log_every=20)), '/unused')
  due, written = [], []  # (the record's step, the step it was written at)
  for step in range(1, 60):
    metrics = {'train': {'loss': step / 10}} if step % 20 == 0 else {}
    if action.due(step, False):
      due.append(step)
      action(step, None, metrics)
      written += [(r[0], step) for r in rows.rows[len(written):]]
  # due at the log steps (20, 40) and 8 steps after each, nowhere else
  assert due == [20, 28, 40, 48], due
  assert written == [(20, 28), (40, 48)], written
  action.end(60, None, {'train': {'loss': 6.0}})
  assert [r[0] for r in rows.rows] == [20, 40, 60]  # the last one at once
  assert [r[2] for r in rows.rows] == [{'loss': 2.0}, {'loss': 4.0},
                                       {'loss': 6.0}]


def test_a_record_comes_out_before_the_next_one_when_logs_are_close():
  rows = ListWriter()
  action = report.ReportTrain(rows, total=12, log=False, delay=8)
  action.bind(types.SimpleNamespace(config=types.SimpleNamespace(
      log_every=1)), '/unused')
  assert _loop(action, 11, set(range(1, 13)), 12) == list(range(1, 12))
  assert [r[0] for r in rows.rows] == list(range(1, 13))
  assert [r[2]['loss'] for r in rows.rows] == [s / 10 for s in range(1, 13)]


def test_the_goodput_record_is_taken_at_the_log_step_and_written_later():
  rows, clock = ListWriter(), iter(range(100))
  action = goodput_action.GoodputReport(
      rows, lambda: {'taken': float(next(clock))}, delay=8)
  action.bind(types.SimpleNamespace(config=types.SimpleNamespace(
      log_every=20)), '/unused')
  due, written = [], []
  for step in range(1, 41):
    metrics = {'train': {'loss': 1.0}} if step % 20 == 0 else {}
    if action.due(step, False):
      due.append(step)
      action(step, None, metrics)
      written += [(r[0], step) for r in rows.rows[len(written):]]
  assert due == [20, 28, 40], due
  assert written == [(20, 28)], written  # taken at 20, written at 28
  action.close()  # the pending one (40), then one as the run ends
  assert [(r[0], r[1], r[2]) for r in rows.rows] == [
      (20, 'goodput', {'taken': 0.0}), (40, 'goodput', {'taken': 1.0}),
      (40, 'goodput', {'taken': 2.0})]
  assert doctest.testmod(deferred).failed == 0


def test_records_are_written_at_once_when_log_steps_are_close():
  rows = ListWriter()
  action = goodput_action.GoodputReport(rows, lambda: {'x': 1.0}, delay=8)
  action.bind(types.SimpleNamespace(config=types.SimpleNamespace(
      log_every=8)), '/unused')
  for step in range(1, 17):
    if action.due(step, False):
      action(step, None, {'train': {}} if step % 8 == 0 else {})
    assert [r[0] for r in rows.rows] == [8, 16][:step // 8], step


def test_once_runs_after_the_first_step_only():
  seen = []
  action = once.Once(seen.append)
  assert _loop(action, 5, set(), 5) == [1]
  assert seen == [1]
  # a launch that runs no step (resumed at its last step): at the end
  late = once.Once(seen.append)
  late.end(7, None, {})
  assert seen == [1, 7]
  assert doctest.testmod(once).failed == 0


def test_hooks_may_be_actions():
  hook, action = (lambda step: None), once.Once(lambda step: None)
  made = action_list.hook_actions([hook, action])
  assert isinstance(made[0], base.StepHook) and made[0].hook is hook
  assert made[1] is action


def test_a_run_calls_a_once_hook_once_and_writes_every_record(tmp_path):
  calls, every = [], []
  assert run(tmp_path, '--gin.train.num_steps=8',
             hooks=[once.Once(calls.append), every.append]) == 0
  assert calls == [1]
  assert every == list(range(1, 9))
  assert (tmp_path / 'config.operative.gin').read_text().strip()
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  steps = lambda split: [r['step'] for r in records if r['split'] == split]
  assert steps('train') == [4, 8]
  assert steps('goodput') == [4, 8, 8]
  # the tensorboard file holds the same records
  (path,) = glob.glob(str(tmp_path / 'tensorboard' / '*tfevents*'))
  tags = {}
  for record in test_writers_events._records(path):
    event = event_pb2.Event.FromString(record[12:-4])
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  assert tags['train/loss'] == [4, 8]
  assert tags['goodput/goodput'] == [4, 8, 8]


if __name__ == '__main__':
  pytest.main([__file__])
