"""runner.outputs.background.BackgroundWriter: the writes happen on its
thread, in order; bad input raises at the call; a failed write is raised
by the next call and the writers are still closed; the queue is bounded.
And the end-of-run plot action (runner.actions.plot): a run without the
JSON-lines writer ends well, with no plot."""

import json
import os
import threading

import pytest

from gintrain.runner.outputs import background
from gintrain.runner.outputs import writers
from tiny import run


class Recording(writers.MetricWriter):
  """Records each call with the thread that made it; ``fail_at``: the
  step whose write raises OSError; ``gate``: an Event each write waits
  for."""

  def __init__(self, fail_at=None, gate=None):
    self.calls, self.fail_at, self.gate = [], fail_at, gate
    self.closed_on = None

  def _write_scalars(self, step, scalars, split):
    if self.gate is not None:
      self.gate.wait(10)
    if step == self.fail_at:
      raise OSError(28, 'No space left on device')
    self.calls.append((step, dict(scalars), split, threading.get_ident()))

  def _write_hparams(self, hparams, metrics):
    self.calls.append(('hparams', dict(hparams), metrics,
                       threading.get_ident()))

  def _close(self):
    self.closed_on = threading.get_ident()


def test_writes_happen_on_the_thread_in_order():
  inner = Recording()
  w = background.BackgroundWriter(inner)
  for step in range(1, 51):
    w.write_scalars(step, {'loss': 1.0 / step})
  w.write_hparams({'lr': 0.1})
  w.flush()
  main = threading.get_ident()
  assert [c[0] for c in inner.calls] == [*range(1, 51), 'hparams']
  assert inner.calls[1][1] == {'loss': 0.5}
  assert {c[3] for c in inner.calls} != {main}
  assert len({c[3] for c in inner.calls}) == 1
  w.close()
  assert inner.closed_on not in (None, main)
  with pytest.raises(RuntimeError, match='closed'):
    w.write_scalars(51, {'loss': 0.0})


def test_bad_input_raises_at_the_call_and_queues_nothing():
  inner = Recording()
  with background.BackgroundWriter(inner) as w:
    with pytest.raises(ValueError, match="'loss' must be a single number"):
      w.write_scalars(1, {'loss': 'high'})
    with pytest.raises(ValueError, match='step must be'):
      w.write_scalars(-1, {'loss': 1.0})
    w.write_scalars(2, {'loss': 1.0})
  assert [c[0] for c in inner.calls] == [2]


def test_a_failed_write_is_raised_by_the_next_call_and_close_still_closes():
  inner = Recording(fail_at=2)
  w = background.BackgroundWriter(inner)
  w.write_scalars(1, {'loss': 1.0})
  w.write_scalars(2, {'loss': 1.0})  # fails on the thread
  w.write_scalars(3, {'loss': 1.0})  # queued behind it: dropped
  with pytest.raises(OSError, match='No space left'):
    w.flush()
  assert [c[0] for c in inner.calls] == [1]  # what came before is kept
  w.close()
  assert inner.closed_on is not None


def test_close_raises_a_pending_failure_after_closing():
  inner = Recording(fail_at=1)
  w = background.BackgroundWriter(inner)
  w.write_scalars(1, {'loss': 1.0})
  with pytest.raises(OSError, match='No space left'):
    w.close()
  assert inner.closed_on is not None
  w.close()  # idempotent


def test_the_queue_is_bounded():
  gate = threading.Event()
  inner = Recording(gate=gate)
  w = background.BackgroundWriter(inner, max_pending=2)
  done = threading.Event()

  def writer():
    for step in range(1, 7):
      w.write_scalars(step, {'loss': 1.0})
    done.set()

  thread = threading.Thread(target=writer)
  thread.start()
  # the thread holds one call, the queue two: the caller waits at the 4th
  assert not done.wait(0.5)
  gate.set()
  assert done.wait(10)
  thread.join()
  w.close()
  assert [c[0] for c in inner.calls] == list(range(1, 7))


def test_a_run_without_the_jsonl_writer_ends_without_a_plot(tmp_path):
  assert run(tmp_path, '--gin.train.writers=[@writers.tensorboard]') == 0
  assert not os.path.exists(tmp_path / 'metrics.jsonl')
  assert not os.path.exists(tmp_path / 'metrics.png')
  assert os.listdir(tmp_path / 'tensorboard')


def test_a_default_run_plots_after_its_last_records(tmp_path):
  assert run(tmp_path) == 0
  # the TensorBoard writer's thread ended with the run
  assert 'gintrain-metric-writer' not in {t.name for t in threading.enumerate()}
  assert os.path.getsize(tmp_path / 'metrics.png') > 1000
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if r['split'] == 'train'] == [4, 8, 12]


def test_only_buffered_writers_go_to_a_thread(tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from gintrain.runner.training import start
  jsonl = writers.JsonlWriter(str(tmp_path))
  tensorboard = writers.TensorBoardWriter(str(tmp_path))
  try:
    assert start._threaded(jsonl) is jsonl  # each record reaches the OS
    threaded = start._threaded(tensorboard)
    assert isinstance(threaded, background.BackgroundWriter)
    assert threaded.writer is tensorboard
  finally:
    jsonl.close()
    tensorboard.close()
