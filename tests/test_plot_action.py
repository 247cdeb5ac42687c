"""The end-of-run plot as an action (runner.actions.plot): drawn after the
last records; a run without the JSON-lines writer ends well, with no plot
(it used to fail at its end reading a metrics.jsonl it never wrote)."""

import doctest
import json
import os

from gintrain.runner.actions import plot
from tiny import run


def test_a_run_without_the_jsonl_writer_ends_without_a_plot(tmp_path):
  assert run(tmp_path, '--gin.train.writers=[@writers.tensorboard]') == 0
  assert not os.path.exists(tmp_path / 'metrics.jsonl')
  assert not os.path.exists(tmp_path / 'metrics.png')
  assert os.listdir(tmp_path / 'tensorboard')


def test_a_default_run_plots_after_its_last_records(tmp_path):
  assert run(tmp_path) == 0
  with open(tmp_path / 'metrics.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if r['split'] == 'train'] == [4, 8, 12]
  assert doctest.testmod(plot).failed == 0


def test_the_writer_is_flushed_before_the_file_is_read(tmp_path):
  class Staged:
    """Puts its records in ``workdir`` only when flushed (as a writer
    staging an object-store workdir does)."""

    def __init__(self, workdir):
      self.workdir = workdir

    def flush(self):
      (self.workdir / 'metrics.jsonl').write_text(
          '{"step": 1, "split": "train", "loss": 1.0}\n')

  action = plot.PlotMetrics(Staged(tmp_path))
  action.bind(None, str(tmp_path))
  assert not action.due(1, False) and not action.due(1, True)
  action.after_end(1, None, {})
  assert os.path.getsize(tmp_path / 'metrics.png') > 1000
  other = tmp_path / 'not_main'
  other.mkdir()
  quiet = plot.PlotMetrics(Staged(other), main=False)
  quiet.bind(None, str(other))
  quiet.after_end(1, None, {})
  assert not os.path.exists(other / 'metrics.jsonl')  # not even flushed
  assert not os.path.exists(other / 'metrics.png')
