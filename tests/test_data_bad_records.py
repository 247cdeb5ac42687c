"""A bad JSONL record found when read, mid-run: with ``on_bad_line='skip'``
a warning names it (file:line) with the running count of bad records, once
per record, and the record becomes an empty document (padding); with
``'error'`` one error names it."""

import json
import logging
import os

import numpy as np
import pytest

from gintrain.runner.data import base
from gintrain.runner.data import corpora
from gintrain.runner.errors import RunnerError

N = 24


def _write(path):
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{oops\n')  # line 1: bad when indexed (skipped, counted there)
    for i in range(N):
      f.write(json.dumps({'text': f'doc{i:02d} ' + 'ab' * (i % 5)}) + '\n')
      if i == 5:
        f.write('\n')  # a blank line: not a record
        f.write(json.dumps({'txt': 'no text field'}) + '\n')


def _corrupt(path, line_number):
  """Overwrites one line in place (same size, same mtime): the file changed
  after the run indexed it."""
  st = os.stat(path)
  with open(path, 'rb') as f:
    lines = f.readlines()
  old = lines[line_number - 1]
  lines[line_number - 1] = b'x' * (len(old) - 1) + b'\n'
  with open(path, 'wb') as f:
    f.writelines(lines)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _source(path, on_bad_line):
  held = path.parent / 'held.jsonl'
  held.write_text(json.dumps({'text': 'held out'}) + '\n')
  source = corpora.jsonl(str(path), length=16, packing='pad', shuffle=False,
                         holdout_fraction=0.0, eval_paths=str(held),
                         on_bad_line=on_bad_line, cache_dir=str(
                             path.parent / 'cache'))
  source.bind(base.Spec(batch_size=4, eval_batch_size=4, seed=0))
  return source


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and 'skipped (' in r.getMessage()]


def test_bad_records_warn_with_location_and_count(tmp_path, caplog):
  path = tmp_path / 'docs.jsonl'
  _write(path)
  caplog.set_level(logging.WARNING)
  source = _source(path, 'skip')
  # the record without the field (line 9), met when the lengths are read
  assert _warnings(caplog) == [
      f"jsonl: {path}:9: no field 'text' (fields: txt); skipped (1 bad"
      ' record(s) so far in this file).']
  caplog.clear()
  # mid-run: lines 12 (doc08) and 20 (doc16) change under the run
  _corrupt(path, 12)
  _corrupt(path, 20)
  seen = []
  for _ in range(2 * (N + 1) // 4):  # two epochs
    batch = source.next_batch()
    for row, weights in zip(batch['tokens'], batch['weights']):
      text = bytes(row.astype(np.uint8)).rstrip(b'\0').decode()
      seen.append(text.split(' ')[0])
      assert (text == '') == (weights.sum() == 0)
  got = _warnings(caplog)  # once each (read ahead: in either order)
  assert len(got) == 2, got
  for line in (12, 20):
    assert sum(m.startswith(
        f'jsonl: {path}:{line}: not a JSON object (the file changed since it'
        ' was indexed?); skipped (') for m in got) == 1, got
  assert sorted(m[-30:] for m in got) == [
      '(2 bad record(s) so far in this file).'[-30:],
      '(3 bad record(s) so far in this file).'[-30:]], got
  want = [f'doc{i:02d}' for i in range(N)]
  want.insert(6, '')  # the record without the field
  want[want.index('doc08')] = want[want.index('doc16')] = ''
  assert seen == (want + want)[:len(seen)] and len(seen) > len(want)


def test_bad_record_mid_run_is_an_error_when_asked(tmp_path):
  path = tmp_path / 'docs.jsonl'
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(N):
      f.write(json.dumps({'text': f'doc{i:02d}'}) + '\n')
  source = _source(path, 'error')
  _corrupt(path, 7)
  with pytest.raises(RunnerError, match=rf'{path}:7: not a JSON object .*'
                     r"jsonl.on_bad_line='error'"):
    for _ in range(N // 4):
      source.next_batch()
