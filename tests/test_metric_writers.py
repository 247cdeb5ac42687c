"""runner.metric_writers (jsonl + TensorBoard events) and runner.plots."""

import doctest
import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2

from gintrain.runner import metric_writers
from gintrain.runner import plots

# --- A minimal, independent TFRecord reader for event files. ---------------


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir):
  """All events of all event files in ``logdir``, checksums verified."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack('<Q', header)
      (header_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
      assert header_crc == _masked(header), f'{path}: bad length crc'
      body = data[pos + 12:pos + 12 + length]
      tail = data[pos + 12 + length:pos + 16 + length]
      (body_crc,) = struct.unpack('<I', tail)
      assert body_crc == _masked(body), f'{path}: bad data crc'
      events.append(event_pb2.Event.FromString(body))
      pos += 16 + length
  return events


def scalars_of(events):
  return [(e.step, v.tag, v.simple_value) for e in events
          for v in e.summary.value if v.HasField('simple_value')]


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# --- MetricWriter ------------------------------------------------------------


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / 'run')  # created by the writer
  writer = metric_writers.MetricWriter(workdir)
  writer.write_scalars(np.int64(1), {'loss': np.float32(2.5),
                                     'lr': jnp.asarray(0.125)})
  writer.write_scalars(jnp.asarray(2, jnp.int32),
                       {'loss': 1.5, 'correct': np.int32(7),
                        'finite': np.bool_(True)})
  writer.write_scalars(2, {'loss': 1.75, 'accuracy': np.float64(0.5)},
                       split='eval')
  writer.flush()  # visible on disk before close
  records = read_jsonl(workdir)
  assert records == [
      {'step': 1, 'split': 'train', 'loss': 2.5, 'lr': 0.125},
      {'step': 2, 'split': 'train', 'loss': 1.5, 'correct': 7, 'finite': True},
      {'step': 2, 'split': 'eval', 'loss': 1.75, 'accuracy': 0.5},
  ]
  assert isinstance(records[1]['correct'], int)
  assert not isinstance(records[1]['correct'], bool)
  events = read_events(os.path.join(workdir, 'tensorboard'))
  assert events[0].file_version.startswith('brain.Event:')
  assert sorted(scalars_of(events)) == sorted([
      (1, 'train/loss', 2.5), (1, 'train/lr', 0.125), (2, 'train/loss', 1.5),
      (2, 'train/correct', 7.0), (2, 'train/finite', 1.0),
      (2, 'eval/loss', 1.75), (2, 'eval/accuracy', 0.5)])
  writer.close()
  writer.close()  # idempotent
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_scalars(3, {'loss': 1.0})


def test_resumed_writer_appends_and_keeps_non_finite_values(tmp_path):
  with metric_writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {'loss': 1.0})
  with metric_writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(2, {'loss': float('nan'), 'grad': np.float32(np.inf)})
    assert len(read_jsonl(tmp_path)) == 2  # on disk at once, no flush needed
  records = read_jsonl(tmp_path)
  assert [r['step'] for r in records] == [1, 2]
  assert math.isnan(records[1]['loss']) and records[1]['grad'] == math.inf
  assert len(glob.glob(str(tmp_path / 'tensorboard' / '*tfevents*'))) == 2
  tags = scalars_of(read_events(tmp_path / 'tensorboard'))
  assert sorted((s, t) for s, t, _ in tags) == [
      (1, 'train/loss'), (2, 'train/grad'), (2, 'train/loss')]


def test_hparams_go_to_json_and_the_hparams_plugin(tmp_path):
  with metric_writers.MetricWriter(tmp_path) as writer:
    writer.write_hparams({'lr': np.float32(0.5), 'batch_size': 32,
                          'model': 'mlp', 'features': (128, 64),
                          'nesterov': False, 'schedule': None})
  with open(tmp_path / 'hparams.json') as f:
    assert json.load(f) == {'lr': 0.5, 'batch_size': 32, 'model': 'mlp',
                            'features': '(128, 64)', 'nesterov': False,
                            'schedule': None}
  events = read_events(tmp_path / 'tensorboard')
  by_tag = {v.tag: v for e in events for v in e.summary.value}
  start = by_tag['_hparams_/session_start_info']
  assert start.metadata.plugin_data.plugin_name == 'hparams'
  data = plugin_hparams_pb2.HParamsPluginData.FromString(
      start.metadata.plugin_data.content)
  hp = data.session_start_info.hparams
  assert hp['lr'].number_value == 0.5 and hp['batch_size'].number_value == 32
  assert hp['model'].string_value == 'mlp'
  assert hp['features'].string_value == '(128, 64)'
  assert hp['nesterov'].bool_value is False and 'nesterov' in hp
  assert '_hparams_/experiment' in by_tag


def test_disabled_writer_touches_nothing(tmp_path):
  workdir = tmp_path / 'not_created'
  writer = metric_writers.MetricWriter(workdir, enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_scalars(-1, {'bad': 'values are not even checked'})
  writer.write_hparams({'lr': 0.1})
  writer.flush()
  writer.close()
  writer.write_scalars(2, {'loss': 1.0})  # no error after close either
  assert not workdir.exists()


@pytest.mark.parametrize('args,kwargs,word', [
    ((-1, {'loss': 1.0}), {}, 'step'),
    ((1.5, {'loss': 1.0}), {}, 'step'),
    ((1, {'loss': 1.0}), {'split': ''}, 'split'),
    ((1, {'loss': 1.0}), {'split': 'a b'}, 'split'),
    ((1, {'loss': np.ones(3)}), {}, "'loss'"),
    ((1, {'ok': 1.0, 'name': 'text'}), {}, "'name'"),
    ((1, {'step': 3}), {}, 'reserved'),
    ((1, {'': 3}), {}, 'name'),
    ((1, [('loss', 1.0)]), {}, 'mapping'),
])
def test_bad_scalars_raise_and_write_nothing(tmp_path, args, kwargs, word):
  with metric_writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(0, {'loss': 3.0})
    with pytest.raises(ValueError, match=word):
      writer.write_scalars(*args, **kwargs)
  assert read_jsonl(tmp_path) == [{'step': 0, 'split': 'train', 'loss': 3.0}]
  assert len(scalars_of(read_events(tmp_path / 'tensorboard'))) == 1


def test_bad_hparams_name_the_key(tmp_path):
  with metric_writers.MetricWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="'optimizer'"):
      writer.write_hparams({'lr': 0.1, 'optimizer': {'name': 'adam'}})
    with pytest.raises(ValueError, match='mapping'):
      writer.write_hparams([('lr', 0.1)])
  assert not (tmp_path / 'hparams.json').exists()


def test_to_json_scalar():
  assert metric_writers.to_json_scalar(np.float16(0.5)) == 0.5
  three = metric_writers.to_json_scalar(np.uint8(3))
  assert three == 3 and isinstance(three, int) and not isinstance(three, bool)
  assert metric_writers.to_json_scalar(jnp.ones((1, 1))) == 1.0
  assert metric_writers.to_json_scalar(np.array([True])) is True
  with pytest.raises(ValueError, match="'acc'"):
    metric_writers.to_json_scalar(np.array(['x']), 'acc')
  with pytest.raises(ValueError, match='single number'):
    metric_writers.to_json_scalar(None)


# --- plots -------------------------------------------------------------------

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _png_size(path):
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == _PNG_MAGIC
  return struct.unpack('>II', head[16:24])


def test_plot_metrics_from_a_real_writer(tmp_path):
  with metric_writers.MetricWriter(tmp_path) as writer:
    for step in range(1, 40):
      writer.write_scalars(step, {'loss': 2.0 / step, 'lr': 0.1})
      if step % 10 == 0:
        writer.write_scalars(step, {'loss': 2.2 / step, 'accuracy': step / 40},
                             split='eval')
  out = plots.plot_metrics(tmp_path / 'metrics.jsonl',
                           tmp_path / 'plots' / 'curves.png')
  assert out == str(tmp_path / 'plots' / 'curves.png')
  width, height = _png_size(out)
  assert width > 300 and height > 200
  series = plots.read_metrics(tmp_path / 'metrics.jsonl')
  assert series[('eval', 'accuracy')] == ([10, 20, 30], [0.25, 0.5, 0.75])
  assert len(series[('train', 'loss')][0]) == 39


def test_read_metrics_resume_duplicates_and_torn_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(
      '{"step": 2, "split": "train", "loss": 1.0}\n'
      '{"step": 3, "split": "train", "loss": 0.9}\n'
      '\n'
      '{"step": 3, "split": "train", "loss": 0.8, "ok": true}\n'  # resumed
      '{"step": 1, "split": "train", "loss": 1.5}\n'
      '{"step": 4, "split": "tr')  # cut short by a crash
  series = plots.read_metrics(path)
  assert series == {('train', 'loss'): ([1, 2, 3], [1.5, 1.0, 0.8])}
  path.write_text('')
  assert not plots.read_metrics(path)


def test_plot_metrics_without_usable_data_still_draws(tmp_path):
  # A run that diverged at once and never evaluated still gets its plot.
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "split": "train", "loss": NaN}\n')
  assert _png_size(plots.plot_metrics(path, tmp_path / 'nan.png'))[0] > 0


def test_plot_metrics_errors_name_the_file_and_line(tmp_path):
  with pytest.raises(FileNotFoundError):
    plots.plot_metrics(tmp_path / 'missing.jsonl', tmp_path / 'x.png')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"step": 1, "split": "train", "loss": 1}\nnot json\n'
                 '{"step": 2, "split": "train", "loss": 1}\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl:2'):
    plots.plot_metrics(bad, tmp_path / 'x.png')
  bad.write_text('{"split": "train", "loss": 1}\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl:1: .*"step"'):
    plots.read_metrics(bad)
  assert not (tmp_path / 'x.png').exists()


def test_docstring_examples_run():
  for module in (metric_writers, plots,):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__
