"""runner.outputs.writers: the MetricWriter interface and its back ends."""

import doctest
import glob
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import api_pb2
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2

from gintrain.runner.outputs import writers

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


def hparams_data(events, tag):
  """The HParamsPluginData of the last summary tagged ``tag``."""
  found = [v for e in events for v in e.summary.value if v.tag == tag]
  assert found, f'no {tag} summary'
  assert found[-1].metadata.plugin_data.plugin_name == 'hparams'
  return plugin_hparams_pb2.HParamsPluginData.FromString(
      found[-1].metadata.plugin_data.content)


def read_jsonl(workdir, keep_time=False):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  if not keep_time:
    for record in records:
      assert isinstance(record.pop('time'), float)
  return records


# --- A user-defined writer, as the module doc shows. -----------------------


class ListWriter(writers.MetricWriter):
  """Keeps what it is given; no super().__init__() needed."""

  def __init__(self):
    self.rows = []
    self.closes = 0

  def _write_scalars(self, step, scalars, split):
    self.rows.append((step, split, scalars))

  def _write_hparams(self, hparams, metrics):
    self.rows.append(('hparams', hparams, metrics))

  def _close(self):
    self.closes += 1


class FailingWriter(ListWriter):
  """Records the call, then fails (as a full disk or a dead socket would)."""

  def _write_scalars(self, step, scalars, split):
    super()._write_scalars(step, scalars, split)
    raise OSError(f'disk full at step {step}')

  def _flush(self):
    raise OSError('flush failed')

  def _close(self):
    super()._close()
    raise OSError('close failed')


# --- JsonlWriter -------------------------------------------------------------


def test_jsonl_writer_records_every_numeric_type_with_time(tmp_path):
  workdir = str(tmp_path / 'run')  # created by the writer
  writer = writers.JsonlWriter(workdir)
  before = time.time()
  writer.write_scalars(np.int64(1), {'loss': np.float32(2.5),
                                     'lr': jnp.asarray(0.125)})
  writer.write_scalars(jnp.asarray(2, jnp.int32),
                       {'loss': 1.5, 'correct': np.int32(7),
                        'finite': np.bool_(True)})
  writer.write_scalars(2, {'loss': 1.75, 'accuracy': np.float64(0.5)},
                       split='eval')
  after = time.time()
  writer.flush()
  records = read_jsonl(workdir, keep_time=True)
  assert [list(r) for r in records][0] == ['step', 'split', 'time', 'loss',
                                           'lr']
  times = [r.pop('time') for r in records]
  assert before <= times[0] <= times[1] <= times[2] <= after
  assert records == [
      {'step': 1, 'split': 'train', 'loss': 2.5, 'lr': 0.125},
      {'step': 2, 'split': 'train', 'loss': 1.5, 'correct': 7, 'finite': True},
      {'step': 2, 'split': 'eval', 'loss': 1.75, 'accuracy': 0.5},
  ]
  assert isinstance(records[1]['correct'], int)
  assert not isinstance(records[1]['correct'], bool)
  assert writer.metrics_path == os.path.join(workdir, 'metrics.jsonl')
  writer.close()
  writer.close()  # idempotent
  writer.flush()  # a no-op once closed
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_scalars(3, {'loss': 1.0})
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_hparams({'lr': 0.1})
  assert len(read_jsonl(workdir)) == 3


def test_jsonl_writer_appends_on_resume_and_keeps_non_finite(tmp_path):
  with writers.JsonlWriter(tmp_path) as writer:
    writer.write_scalars(1, {'loss': 1.0})
  with writers.JsonlWriter(tmp_path) as writer:
    writer.write_scalars(2, {'loss': float('nan'), 'grad': np.float32(np.inf),
                             'low': -math.inf})
    assert len(read_jsonl(tmp_path)) == 2  # on disk at once, no flush needed
  with open(tmp_path / 'metrics.jsonl') as f:
    assert 'NaN' in f.read()
  records = read_jsonl(tmp_path)
  assert [r['step'] for r in records] == [1, 2]
  assert math.isnan(records[1]['loss']) and records[1]['grad'] == math.inf
  assert records[1]['low'] == -math.inf


def test_jsonl_writer_hparams_json(tmp_path):
  with writers.JsonlWriter(tmp_path) as writer:
    writer.write_hparams({'lr': 0.1})
    writer.write_hparams({'lr': np.float32(0.5), 'batch_size': 32,
                          'model': 'mlp', 'features': (128, 64),
                          'widths': [1, 2], 'nesterov': False,
                          'schedule': None, 'act': np.tanh},
                         metrics=['eval/accuracy'])
  with open(tmp_path / 'hparams.json') as f:
    assert json.load(f) == {'lr': 0.5, 'batch_size': 32, 'model': 'mlp',
                            'features': '(128, 64)', 'widths': '[1, 2]',
                            'nesterov': False, 'schedule': None,
                            'act': 'tanh'}
  assert sorted(os.listdir(tmp_path)) == ['hparams.json', 'metrics.jsonl']


# --- TensorBoardWriter -------------------------------------------------------


def test_tensorboard_writer_one_event_per_call(tmp_path):
  with writers.TensorBoardWriter(tmp_path / 'run') as writer:
    writer.write_scalars(np.int64(1), {'loss': np.float32(2.5),
                                       'lr': jnp.asarray(0.125)})
    writer.write_scalars(2, {'loss': 1.5, 'finite': np.bool_(True)})
    writer.write_scalars(2, {'accuracy': 0.5}, split='eval')
    writer.write_scalars(3, {})  # nothing to show: no event
    writer.flush()
    events = read_events(tmp_path / 'run' / 'tensorboard')
    assert events[0].file_version.startswith('brain.Event:')
    summaries = [e for e in events if e.HasField('summary')]
    assert [(e.step, len(e.summary.value)) for e in summaries] == [
        (1, 2), (2, 2), (2, 1)]
  assert sorted(scalars_of(read_events(tmp_path / 'run' / 'tensorboard'))) == [
      (1, 'train/loss', 2.5), (1, 'train/lr', 0.125), (2, 'eval/accuracy', 0.5),
      (2, 'train/finite', 1.0), (2, 'train/loss', 1.5)]
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_scalars(4, {'loss': 1.0})


def test_tensorboard_writer_flushes_now_and_then(tmp_path):
  with writers.TensorBoardWriter(tmp_path) as writer:
    writer.FLUSH_SECS = 0.0
    writer.write_scalars(1, {'loss': 1.0})
    assert scalars_of(read_events(tmp_path / 'tensorboard')) == [
        (1, 'train/loss', 1.0)]


def test_tensorboard_writers_get_unique_files_and_keep_non_finite(tmp_path):
  # Two writers started in the same second must not truncate each other.
  with writers.TensorBoardWriter(tmp_path) as writer:
    writer.write_scalars(1, {'loss': 1.0})
  with writers.TensorBoardWriter(tmp_path) as writer:
    writer.write_scalars(2, {'loss': float('nan'), 'grad': np.float32(np.inf)})
  assert len(glob.glob(str(tmp_path / 'tensorboard' / '*tfevents*'))) == 2
  scalars = sorted(scalars_of(read_events(tmp_path / 'tensorboard')))
  assert [(s, t) for s, t, _ in scalars] == [
      (1, 'train/loss'), (2, 'train/grad'), (2, 'train/loss')]
  assert scalars[1][2] == math.inf and math.isnan(scalars[2][2])


def test_tensorboard_hparams_declare_the_metric_columns(tmp_path):
  with writers.TensorBoardWriter(tmp_path) as writer:
    writer.write_hparams({'lr': np.float32(0.5), 'batch_size': 32,
                          'model': 'mlp', 'features': (128, 64),
                          'nesterov': False, 'schedule': None},
                         metrics=('eval/accuracy', 'train/loss',
                                  'eval/accuracy'))
    writer.write_scalars(5, {'accuracy': 0.75}, split='eval')
  events = read_events(tmp_path / 'tensorboard')
  start = hparams_data(events, '_hparams_/session_start_info')
  hp = start.session_start_info.hparams
  assert hp['lr'].number_value == 0.5 and hp['batch_size'].number_value == 32
  assert hp['model'].string_value == 'mlp'
  assert hp['features'].string_value == '(128, 64)'
  assert hp['nesterov'].bool_value is False and 'nesterov' in hp
  assert 'schedule' not in hp
  assert start.session_start_info.start_time_secs > 0
  experiment = hparams_data(events, '_hparams_/experiment').experiment
  # The HParams table's metric columns: declared by tag, with no fake values.
  assert [m.name.tag for m in experiment.metric_infos] == [
      'eval/accuracy', 'train/loss']
  assert all(m.name.group == '' for m in experiment.metric_infos)
  types = {h.name: h.type for h in experiment.hparam_infos}
  assert types == {'lr': api_pb2.DATA_TYPE_FLOAT64,
                   'batch_size': api_pb2.DATA_TYPE_FLOAT64,
                   'model': api_pb2.DATA_TYPE_STRING,
                   'features': api_pb2.DATA_TYPE_STRING,
                   'nesterov': api_pb2.DATA_TYPE_BOOL}
  # The only scalars are the real ones.
  assert scalars_of(events) == [(5, 'eval/accuracy', 0.75)]


# --- Input checks (shared by every writer) -----------------------------------


@pytest.mark.parametrize('args,kwargs,word', [
    ((-1, {'loss': 1.0}), {}, 'step'),
    ((1.5, {'loss': 1.0}), {}, 'step'),
    ((True, {'loss': 1.0}), {}, 'step'),
    ((1, {'loss': 1.0}), {'split': ''}, 'split'),
    ((1, {'loss': 1.0}), {'split': 'a b'}, 'split'),
    ((1, {'loss': np.ones(3)}), {}, "'loss'"),
    ((1, {'ok': 1.0, 'name': 'text'}), {}, "'name'"),
    ((1, {'step': 3}), {}, 'reserved'),
    ((1, {'time': 3}), {}, 'reserved'),
    ((1, {'split': 3}), {}, 'reserved'),
    ((1, {'': 3}), {}, 'name'),
    ((1, {'a b': 3}), {}, "'a b'"),
    ((1, [('loss', 1.0)]), {}, 'mapping'),
])
@pytest.mark.parametrize('kind', ['jsonl', 'tensorboard', 'multi'])
def test_bad_scalars_raise_and_write_nothing(tmp_path, kind, args, kwargs,
                                             word):
  collected = ListWriter()
  writer = {'jsonl': lambda: writers.JsonlWriter(tmp_path),
            'tensorboard': lambda: writers.TensorBoardWriter(tmp_path),
            'multi': lambda: writers.MultiWriter(
                [writers.JsonlWriter(tmp_path), collected]),
           }[kind]()
  with writer:
    writer.write_scalars(0, {'loss': 3.0})
    with pytest.raises(ValueError, match=word) as error:
      writer.write_scalars(*args, **kwargs)
    assert '\n' not in str(error.value)
  if kind == 'tensorboard':
    assert len(scalars_of(read_events(tmp_path / 'tensorboard'))) == 1
  else:
    assert read_jsonl(tmp_path) == [{'step': 0, 'split': 'train', 'loss': 3.0}]
  if kind == 'multi':
    assert collected.rows == [(0, 'train', {'loss': 3.0})]


def test_bad_hparams_name_the_key(tmp_path):
  with writers.MultiWriter([writers.JsonlWriter(tmp_path),
                            writers.TensorBoardWriter(tmp_path)]) as writer:
    with pytest.raises(ValueError, match="'optimizer'.*mapping"):
      writer.write_hparams({'lr': 0.1, 'optimizer': {'name': 'adam'}})
    with pytest.raises(ValueError, match="'rng'"):
      writer.write_hparams({'rng': np.zeros(2)})
    with pytest.raises(ValueError, match='mapping'):
      writer.write_hparams([('lr', 0.1)])
    with pytest.raises(ValueError, match='name'):
      writer.write_hparams({'': 0.1})
    with pytest.raises(ValueError, match='sequence'):
      writer.write_hparams({'lr': 0.1}, metrics='eval/accuracy')
    with pytest.raises(ValueError, match="'eval accuracy'"):
      writer.write_hparams({'lr': 0.1}, metrics=['eval accuracy'])
  assert not (tmp_path / 'hparams.json').exists()
  events = read_events(tmp_path / 'tensorboard')
  assert not [v for e in events for v in e.summary.value]


def test_to_json_scalar():
  assert writers.to_json_scalar(np.float16(0.5)) == 0.5
  three = writers.to_json_scalar(np.uint8(3))
  assert three == 3 and isinstance(three, int) and not isinstance(three, bool)
  assert writers.to_json_scalar(jnp.ones((1, 1))) == 1.0
  assert writers.to_json_scalar(np.array([True])) is True
  with pytest.raises(ValueError, match="'acc'"):
    writers.to_json_scalar(np.array(['x']), 'acc')
  with pytest.raises(ValueError, match='single number'):
    writers.to_json_scalar(None)


# --- The interface, user writers, MultiWriter, NullWriter --------------------


def test_user_writer_gets_checked_plain_values():
  writer = ListWriter()
  writer.write_scalars(jnp.asarray(3), {'loss': jnp.asarray([0.5]),
                                        'n': np.int16(4)}, split='eval')
  writer.write_hparams({'lr': np.float64(0.1), 'layers': (2, 3)},
                       metrics=['eval/loss'])
  assert writer.rows == [(3, 'eval', {'loss': 0.5, 'n': 4}),
                         ('hparams', {'lr': 0.1, 'layers': '(2, 3)'},
                          ('eval/loss',))]
  # pylint: disable=unidiomatic-typecheck
  assert type(writer.rows[0][0]) is int
  assert type(writer.rows[0][2]['loss']) is float
  # pylint: enable=unidiomatic-typecheck
  with writer:
    pass
  writer.close()
  assert writer.closes == 1
  with pytest.raises(RuntimeError, match=r'ListWriter\(\) is closed'):
    writer.write_scalars(4, {'loss': 0.1})


def test_a_writer_must_implement_the_writing():
  class Incomplete(writers.MetricWriter):

    def _write_scalars(self, step, scalars, split):
      pass

  with pytest.raises(TypeError, match='_write_hparams'):
    Incomplete()  # pylint: disable=abstract-class-instantiated


def test_multi_writer_fans_out_to_every_writer(tmp_path):
  first, last = ListWriter(), ListWriter()
  multi = writers.MultiWriter([first, writers.JsonlWriter(tmp_path),
                               writers.TensorBoardWriter(tmp_path), last])
  with multi:
    multi.write_scalars(1, {'loss': np.float32(0.5)})
    multi.write_scalars(1, {'accuracy': 0.25}, split='eval')
    multi.write_hparams({'lr': 0.1}, metrics=['eval/accuracy'])
    multi.flush()
    assert len(read_jsonl(tmp_path)) == 2
  expected = [(1, 'train', {'loss': 0.5}), (1, 'eval', {'accuracy': 0.25}),
              ('hparams', {'lr': 0.1}, ('eval/accuracy',))]
  assert first.rows == expected and last.rows == expected
  assert first.closes == 1 and last.closes == 1
  for writer in multi.writers:
    with pytest.raises(RuntimeError, match='closed'):
      writer.write_scalars(2, {'loss': 0.1})
  assert read_jsonl(tmp_path) == [
      {'step': 1, 'split': 'train', 'loss': 0.5},
      {'step': 1, 'split': 'eval', 'accuracy': 0.25}]
  events = read_events(tmp_path / 'tensorboard')
  assert sorted(scalars_of(events)) == [(1, 'eval/accuracy', 0.25),
                                        (1, 'train/loss', 0.5)]
  experiment = hparams_data(events, '_hparams_/experiment').experiment
  assert [m.name.tag for m in experiment.metric_infos] == ['eval/accuracy']
  with pytest.raises(RuntimeError, match='closed'):
    multi.write_scalars(2, {'loss': 0.1})
  assert 'MultiWriter([ListWriter(), JsonlWriter(' in repr(multi)


def test_multi_writer_reaches_all_writers_then_raises_the_first_error():
  before, broken, other_broken, after = (ListWriter(), FailingWriter(),
                                         FailingWriter(), ListWriter())
  multi = writers.MultiWriter([before, broken, other_broken, after])
  with pytest.raises(OSError, match='disk full at step 7'):
    multi.write_scalars(7, {'loss': 1.0})
  for writer in (before, broken, other_broken, after):
    assert writer.rows == [(7, 'train', {'loss': 1.0})]
  multi.write_hparams({'lr': 0.1})  # FailingWriter only fails on scalars
  assert after.rows[-1] == ('hparams', {'lr': 0.1}, ())
  with pytest.raises(OSError, match='flush failed'):
    multi.flush()
  with pytest.raises(OSError, match='close failed'):
    multi.close()
  # Every writer was closed, the failing ones and those after them too.
  assert [w.closes for w in (before, broken, other_broken, after)] == [
      1, 1, 1, 1]
  multi.close()  # closed already: nothing is closed twice
  assert [w.closes for w in (before, broken, other_broken, after)] == [
      1, 1, 1, 1]


def test_multi_writer_takes_only_writers():
  with pytest.raises(TypeError, match=r'writers\[1\]'):
    writers.MultiWriter([ListWriter(), writers.JsonlWriter])
  empty = writers.MultiWriter([])
  empty.write_scalars(1, {'loss': 1.0})
  with pytest.raises(ValueError, match='step'):
    empty.write_scalars(-1, {'loss': 1.0})  # still checks its input
  empty.close()


def test_null_writer_touches_nothing_and_checks_nothing(tmp_path):
  workdir = tmp_path / 'not_created'
  writer = writers.NullWriter()
  assert isinstance(writer, writers.MetricWriter)
  with writer:
    writer.write_scalars(1, {'loss': 1.0})
    writer.write_scalars(-1, {'bad': 'values are not even checked'})
    writer.write_hparams({'lr': 0.1}, metrics=['eval/accuracy'])
    writer.flush()
  writer.close()
  writer.write_scalars(2, {'loss': 1.0})  # no error after close either
  multi = writers.MultiWriter([writers.NullWriter(), writers.NullWriter()])
  multi.write_scalars(1, {'loss': 1.0})
  multi.close()
  assert not workdir.exists()
  assert not os.listdir(tmp_path)


# --- WandbWriter -------------------------------------------------------------


def read_wandb_records(path):
  """The protobuf records of a W&B ``.wandb`` file, checksums verified.

  The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1,
  version 0), then 32 KiB blocks of chunks, each ``crc32 (4) | length (2) |
  type (1) | data``, where type 1 is a whole record and 2/3/4 are its
  first/middle/last parts.
  """
  # pylint: disable-next=g-import-not-at-top
  from wandb.proto import wandb_internal_pb2
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B' and struct.unpack('<HB', data[4:7]) == (0xBEE1, 0)
  block, pos, pending, records = 32768, 7, b'', []
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # the block's tail is padding
      pos += left
      continue
    crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    body = data[pos + 7:pos + 7 + length]
    assert crc == zlib.crc32(body, zlib.crc32(bytes([kind]))), path
    pos += 7 + length
    pending += body
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(pending))
      pending = b''
  return records


def _item_key(item):
  return item.key or '/'.join(item.nested_key)


def test_wandb_writer_offline_logs_history_and_config(tmp_path):
  pytest.importorskip('wandb')
  workdir = tmp_path / 'run'
  with writers.WandbWriter(workdir, name='unit-test',
                           config={'seed': 3}) as writer:
    assert writer.run.offline
    writer.write_scalars(1, {'loss': np.float32(0.5), 'ok': np.bool_(True)})
    writer.write_scalars(1, {'accuracy': jnp.asarray(0.25)}, split='eval')
    writer.write_scalars(2, {'loss': float('nan')})
    writer.write_hparams({'lr': 0.1, 'model': 'mlp'}, ['eval/accuracy'])
    with pytest.raises(ValueError, match="'bad'"):
      writer.write_scalars(3, {'bad': 'text'})
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_scalars(4, {'loss': 1.0})
  # wandb's service process may still be writing the run file after
  # finish() returns: wait (bounded) for its exit record.
  deadline = time.monotonic() + 60
  while True:
    files = glob.glob(str(workdir / 'wandb' / 'offline-run-*' /
                          'run-*.wandb'))
    try:
      records = read_wandb_records(files[0]) if len(files) == 1 else []
    except (AssertionError, struct.error):  # a file still being written
      records = []
    kinds = [r.WhichOneof('record_type') for r in records]
    if 'exit' in kinds or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  assert kinds[0] == 'header' and 'exit' in kinds
  run = next(r.run for r in records if r.HasField('run'))
  assert run.project == 'gintrain' and run.display_name == 'unit-test'
  history = []
  for r in records:
    if r.HasField('history'):
      row = {_item_key(i): json.loads(i.value_json) for i in r.history.item}
      history.append({k: v for k, v in row.items() if not k.startswith('_')})
  assert history[:2] == [{'step': 1, 'train/loss': 0.5, 'train/ok': True},
                         {'step': 1, 'eval/accuracy': 0.25}]
  assert history[2]['step'] == 2 and math.isnan(history[2]['train/loss'])
  assert len(history) == 3
  config = {}
  for r in records:
    if r.HasField('config') or r.HasField('run'):
      updates = (r.config if r.HasField('config') else r.run.config).update
      config.update({_item_key(u): json.loads(u.value_json) for u in updates})
  assert config['seed'] == 3 and config['lr'] == 0.1
  assert config['model'] == 'mlp'


def test_wandb_writer_without_wandb_says_how_to_install_it(tmp_path):
  code = (
      'import sys\n'
      'sys.modules["wandb"] = None  # makes `import wandb` fail\n'
      'from gintrain.runner.outputs import writers\n'
      'try:\n'
      f'  writers.WandbWriter({str(tmp_path / "run")!r})\n'
      'except ImportError as e:\n'
      '  print(type(e).__name__, e)\n'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, check=True)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout + result.stderr
  assert lines[0].startswith('ImportError ')
  assert 'pip install wandb' in lines[0]
  assert not (tmp_path / 'run').exists()


# --- Docs --------------------------------------------------------------------


def test_docstring_examples_run():
  result = doctest.testmod(writers, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0
