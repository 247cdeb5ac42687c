"""Input throughput: the recent-document cache of packing (a row reads its
document once, not once per row; the rows are the same bytes with and
without it) and ``data_wait_fraction`` in a real LM run's train records:
in [0, 1] and, for a source slow on purpose, the share of each logging
interval the goodput clock counted as input wait.

One tiny LM run (about 10 s on 2 cores idle)."""

import json
import threading
import time

import gin
import numpy as np
import pytest

from gintrain.runner.cli import main as cli_main
from gintrain.runner.data import corpora
from gintrain.runner.data import packing
from gintrain.runner.data import sources


class _Docs(sources.Documents):
  """Documents of 50-400 tokens counting their reads."""

  def __init__(self, n=40, seed=0):
    rng = np.random.default_rng(seed)
    self.docs = [rng.integers(1, 255, size=int(rng.integers(50, 400)))
                 .astype(np.int32) for _ in range(n)]
    self.reads = 0
    self.tokenizer = None

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    self.reads += 1
    return self.docs[int(i)], 0

  def _compute_lengths(self):
    return np.asarray([len(d) for d in self.docs], np.int64)


def test_rows_read_each_document_once_per_epoch():
  docs = _Docs()
  rows = packing.Rows(docs, length=16, seed=1)
  rows.cached_documents = 2  # a row spans at most 2 documents here
  got = [rows[i] for i in range(len(rows))]
  assert docs.reads == len(docs), (docs.reads, len(docs))
  got += [rows[i] for i in range(len(rows), 2 * len(rows))]
  assert docs.reads <= 2 * len(docs), (docs.reads, len(docs))
  # without the cache: the same rows, but a read per document piece
  plain = _Docs()
  uncached = packing.Rows(plain, length=16, seed=1)
  uncached.cached_documents = 0
  for i, row in enumerate(got):
    want = uncached[i]
    assert all(np.array_equal(row[k], want[k]) for k in want), i
  assert plain.reads > 4 * docs.reads


def test_the_cache_keeps_its_budgets():
  docs = _Docs(n=60)
  rows = packing.Rows(docs, length=8, seed=0)
  rows.cached_documents, rows.cached_tokens = 5, 600
  biggest = 0
  for i in range(len(rows)):
    rows[i]
    cached = rows._docs  # pylint: disable=protected-access
    assert len(cached) <= 5
    tokens = sum(len(t) for t, _ in cached.values())
    assert tokens == rows._docs_tokens  # pylint: disable=protected-access
    assert len(cached) == 1 or tokens <= 600, tokens
    biggest = max(biggest, len(cached))
  assert biggest >= 2  # it does keep more than the last one
  # a single document over the token budget is still kept (the last read)
  rows.cached_tokens = 1
  rows[0]
  assert len(rows._docs) == 1  # pylint: disable=protected-access


class _SlowDocs(sources.Documents):
  """``docs`` whose reads take ``delay_s`` each, one at a time."""
  _lock = threading.Lock()

  def __init__(self, docs, delay_s):
    self.docs, self.delay_s = docs, delay_s
    self.tokenizer, self.name = docs.tokenizer, docs.name

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    with self._lock:
      time.sleep(self.delay_s)
    return self.docs[i]

  def _compute_lengths(self):
    return self.docs.lengths()


@gin.configurable('slow_jsonl', module='test_data_throughput')
def slow_jsonl(path, delay_s=0.02):
  docs = sources.JsonlDocs(path)
  train, held = corpora.Subset(docs, range(0, 150)), corpora.Subset(
      docs, range(150, 160))
  # 2 batches read ahead: the compilation does not hide the slow reads
  return corpora.lm_source(_SlowDocs(train, delay_s), held, length=32,
                           name='slow jsonl', prefetch=2)


@pytest.fixture(scope='module')
def slow_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('wait')
  rng = np.random.default_rng(0)
  with open(tmp / 'docs.jsonl', 'w', encoding='utf-8') as f:
    for _ in range(160):
      f.write(json.dumps({'text': ' '.join(rng.choice(
          ['alpha', 'beta', 'def', '(', ')'], size=int(rng.integers(3, 12)))
                                            )}) + '\n')
  gin_file = tmp / 'run.gin'
  gin_file.write_text(f"""include 'lm.gin'
train.dataset = @test_data_throughput.slow_jsonl()
slow_jsonl.path = '{tmp / 'docs.jsonl'}'
transformer.vocab_size = 256
transformer.width = 16
transformer.depth = 1
transformer.heads = 2
transformer.max_len = 32
train.num_steps = 16
train.batch_size = 8
train.eval_every = 100
train.log_every = 4
train.eval_batch_size = 8
train.actions = []
""")
  workdir = tmp / 'run'
  assert cli_main.main_with_flags(['gintrain', f'--workdir={workdir}',
                                   f'--gin_file={gin_file}']) == 0
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def test_train_records_carry_the_wait_fraction_of_the_goodput_clock(
    slow_run):
  train = [r for r in slow_run if r.get('split') == 'train']
  clock = {r['step']: r for r in slow_run if r.get('split') == 'goodput'}
  assert [r['step'] for r in train] == [4, 8, 12, 16], train
  assert all(0 <= r['data_wait_fraction'] <= 1 for r in train), train
  # the intervals 4-8 and 8-12 (the first holds the compilation, which the
  # clock counts apart; the last goodput record comes after the final
  # checkpoint): the record's fraction of the interval's wall time is the
  # input seconds the clock counted (which add the batch's placement on
  # the devices)
  for before, record in zip(train[:2], train[1:3]):
    a, b = clock[before['step']], clock[record['step']]
    wall = b['wall_seconds'] - a['wall_seconds']
    waited = b['input_seconds'] - a['input_seconds']
    share = record['data_wait_fraction']
    assert waited / wall > 0.2, (waited, wall)  # slow on purpose
    assert abs(share * wall - waited) <= 0.1 * wall + 0.05, (
        share, wall, waited)
