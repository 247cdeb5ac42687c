"""runner.outputs.writers: event files checksummed in C, and the checks the
combinators skip for input they have checked already (issue 17: the cost
of a log step)."""

import glob
import os

import google_crc32c
import numpy as np
import pytest

from gintrain.runner.outputs import writers

# pylint: disable=protected-access
writers._import_tensorboardx()  # no torch
# pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
# pylint: enable=g-import-not-at-top,wrong-import-position


def _records(path):
  """The framed records of the file ``path`` (lengths and checksums
  checked with tensorboardX's own pure-Python CRC-32C)."""
  with open(path, 'rb') as f:
    data = f.read()
  out, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    length = int.from_bytes(header, 'little')
    assert int.from_bytes(data[pos + 8:pos + 12], 'little') == (
        record_writer.masked_crc32c(header))
    body = data[pos + 12:pos + 12 + length]
    assert int.from_bytes(data[pos + 12 + length:pos + 16 + length],
                          'little') == record_writer.masked_crc32c(body)
    out.append(data[pos:pos + 16 + length])
    pos += 16 + length
  assert pos == len(data)
  return out


def _event(step):
  value = summary_pb2.Summary.Value
  return event_pb2.Event(
      wall_time=1.5e9 + step, step=step, summary=summary_pb2.Summary(value=[
          value(tag='train/loss', simple_value=0.25 * step),
          value(tag='goodput/idle', simple_value=step)]))


def test_the_checksums_are_google_crc32c_in_c():
  assert google_crc32c.implementation == 'c'
  assert writers._crc32c_function() is google_crc32c.value
  assert google_crc32c.value(b'123456789') == 0xE3069283  # RFC 3720's check


def test_event_records_are_the_bytes_tensorboardx_writes(tmp_path):
  """The same events through tensorboardX's RecordWriter and through the
  writer's event file: the same bytes, record for record."""
  ours = writers._EventFile(str(tmp_path / 'ours'), '.x')
  theirs = record_writer.RecordWriter(str(tmp_path / 'theirs'))
  for step in (0, 1, 7, 300, 2**40):
    event = _event(step)
    ours.write(event)
    theirs.write(event.SerializeToString())
  ours.close()
  theirs.close()
  mine = _records(ours.path)
  first = event_pb2.Event.FromString(mine[0][12:-4])
  assert first.file_version == 'brain.Event:2'
  assert mine[1:] == _records(tmp_path / 'theirs')
  name = os.path.basename(ours.path)
  assert name.startswith('ours.out.tfevents.') and name.endswith('.x')


def test_python_checksums_write_the_same_file(tmp_path, monkeypatch):
  """Without google-crc32c's C code the writer falls back to tensorboardX's
  checksum: the same records."""
  paths = []
  for crc in (writers._crc32c_function(), record_writer.crc32c):
    monkeypatch.setattr(writers._EventFile, '_CRC', crc)
    events = writers._EventFile(str(tmp_path / f'run{len(paths)}'))
    events.write(_event(3))
    events.close()
    paths.append(events.path)
  assert _records(paths[0])[1:] == _records(paths[1])[1:]


def test_tensorboard_writer_events_read_back(tmp_path):
  with writers.TensorBoardWriter(tmp_path) as writer:
    writer.write_scalars(5, {'loss': np.float32(0.5), 'n': 3, 'ok': True})
    writer.write_scalars(6, {'loss': 0.25}, split='eval')
  (path,) = glob.glob(str(tmp_path / 'tensorboard' / '*tfevents*'))
  events = [event_pb2.Event.FromString(r[12:-4]) for r in _records(path)]
  assert [(e.step, v.tag, v.simple_value) for e in events
          for v in e.summary.value] == [
              (5, 'train/loss', 0.5), (5, 'train/n', 3.0), (5, 'train/ok', 1.0),
              (6, 'eval/loss', 0.25)]


class _Rows(writers.MetricWriter):

  def __init__(self):
    self.rows = []

  def _write_scalars(self, step, scalars, split):
    scalars['mutated'] = 1.0  # a writer's own copy
    self.rows.append((step, split, scalars))

  def _write_hparams(self, hparams, metrics):
    pass


@pytest.mark.parametrize('wrap', ['multi', 'open_later'])
def test_combinators_check_once_and_still_refuse(wrap):
  inner, other = _Rows(), _Rows()
  writer = (writers.MultiWriter([inner, other]) if wrap == 'multi' else
            writers.OpenLater(lambda: writers.MultiWriter([inner, other])))
  writer.write_scalars(np.int64(2), {'loss': np.float32(0.5), 'n': 3})
  assert inner.rows == other.rows == [
      (2, 'train', {'loss': 0.5, 'n': 3, 'mutated': 1.0})]
  assert inner.rows[0][2] is not other.rows[0][2]  # a copy each
  assert type(inner.rows[0][2]['loss']) is float
  # a name seen before does not let a bad name or value through
  for bad in ({'loss': 'text'}, {'step': 1.0}, {'lo ss': 1.0},
              {'loss': np.ones(2)}, {1: 1.0}):
    with pytest.raises(ValueError):
      writer.write_scalars(3, bad)
  assert len(inner.rows) == 1
  inner.close()  # a closed writer inside still refuses (RuntimeError)
  with pytest.raises(RuntimeError, match='closed'):
    writer.write_scalars(4, {'loss': 1.0})
  assert other.rows[-1][0] == 4  # and the others still got it


def test_known_names_stay_bounded(monkeypatch):
  monkeypatch.setattr(writers, '_GOOD_NAMES', set())
  monkeypatch.setattr(writers, '_GOOD_NAMES_MAX', 3)
  rows = _Rows()
  for i in range(10):
    rows.write_scalars(i, {f'm{i}': 1.0})
  assert writers._GOOD_NAMES == {'m0', 'm1', 'm2'}
  with pytest.raises(ValueError, match='reserved'):
    rows.write_scalars(1, {'time': 1.0})


@pytest.mark.parametrize('step', [0, 1, 127, 128, 300, 2**40])
def test_hand_encoded_events_are_protobufs_bytes(step):
  """``_scalars_event`` writes what protobuf's serializer writes for the
  same messages, byte for byte."""
  long_name = 'x' * 200  # a tag of more than 127 bytes: a 2-byte length
  scalars = {'loss': 0.25, 'zero': 0.0, 'negative_zero': -0.0, 'n': 7,
             'flag': True, 'nan': float('nan'), 'inf': float('inf'),
             'tiny': 1e-45, 'big': 3e38, long_name: -2.5,
             **{f'goodput_{i}': i / 7 for i in range(40)}}
  value = summary_pb2.Summary.Value
  expected = event_pb2.Event(
      wall_time=1765000000.123456, step=step, summary=summary_pb2.Summary(
          value=[value(tag=f'train/{k}', simple_value=float(v))
                 for k, v in scalars.items()])).SerializeToString()
  for _ in range(2):  # the tag heads made, then cached
    assert writers._scalars_event(1765000000.123456, step, 'train',
                                  scalars) == expected


def test_values_beyond_float32_are_written_as_infinities(tmp_path):
  with writers.TensorBoardWriter(tmp_path) as writer:
    writer.write_scalars(3, {'huge': 1e40, 'fine': 1.0})
  (path,) = glob.glob(str(tmp_path / 'tensorboard' / '*tfevents*'))
  (event,) = [e for e in (event_pb2.Event.FromString(r[12:-4])
                          for r in _records(path)) if e.summary.value]
  assert [(v.tag, v.simple_value) for v in event.summary.value] == [
      ('train/huge', float('inf')), ('train/fine', 1.0)]
