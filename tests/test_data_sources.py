"""JSONL, Parquet and prepared ArrayRecord sources: end-to-end LM training
from gin files, fine-tuning with masked prompts, and one-line errors."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gintrain.runner.cli import main as cli_main
from gintrain.runner.data import base
from gintrain.runner.data import corpora
from gintrain.runner.data import sources

WORDS = ['alpha', 'beta', 'gamma', 'delta', 'def', 'return', '(', ')']


def _texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, size=int(rng.integers(3, 30))))
          for _ in range(n)]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  texts = _texts(120)
  with open(root / 'docs.jsonl', 'w', encoding='utf-8') as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({'text': t, 'id': i}) + '\n')
      if i == 50:
        f.write('{not json\n')
  with open(root / 'chat.jsonl', 'w', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({'prompt': 'Q: ' + t[:10], 'response': t}) + '\n')
  table = pa.table({'text': texts, 'n': list(range(len(texts)))})
  pq.write_table(table, root / 'docs.parquet', row_group_size=40)
  (root / 'raw').mkdir()
  for i, t in enumerate(texts[:60]):
    (root / 'raw' / f'f{i:03d}.txt').write_text(t * 3)
  code = cli_main.main_with_flags(
      ['gintrain', 'tokenizer', 'train', '--vocab_size=300',
       f'--out={root}/tok', str(root / 'raw')])
  assert code == 0
  code = cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', f'--tokenizer={root}/tok',
       '--shard_mb=0.001', '--workers=1', '--no_progress',
       f'--out={root}/prepared', str(root / 'raw')])
  assert code == 0
  return root


def _gin(tmp_path, body, vocab=256):
  path = tmp_path / 'run.gin'
  path.write_text(f"""include 'lm.gin'
{body}
transformer.vocab_size = {vocab}
transformer.width = 16
transformer.depth = 1
transformer.heads = 2
transformer.max_len = 32
train.num_steps = 3
train.batch_size = 8
train.eval_every = 3
train.log_every = 3
train.eval_batch_size = 8
train.actions = []
""")
  return str(path)


def _train(tmp_path, body, vocab=256):
  workdir = tmp_path / 'run'
  code = cli_main.main_with_flags(
      ['gintrain', f'--workdir={workdir}',
       f'--gin_file={_gin(tmp_path, body, vocab)}'])
  records = []
  if (workdir / 'metrics.jsonl').exists():
    records = [json.loads(line) for line in
               (workdir / 'metrics.jsonl').read_text().splitlines()]
  return code, records


def _eval(records):
  return [r for r in records if r.get('split') == 'eval'][-1]


def test_parquet_trains(data, tmp_path):
  code, records = _train(tmp_path, f"""
train.dataset = @data.parquet()
data.parquet.paths = '{data}/docs.parquet'
data.parquet.length = 32
""")
  assert code == 0 and np.isfinite(_eval(records)['bits_per_byte'])


def test_prepared_array_record_trains_with_bpe(data, tmp_path):
  code, records = _train(tmp_path, f"""
train.dataset = @data.array_record()
data.array_record.paths = '{data}/prepared'
data.array_record.length = 32
""", vocab=300)
  assert code == 0
  ev = _eval(records)
  # bits per byte, not per token: the BPE's tokens are longer than a byte
  assert ev['bytes_per_token'] > 1.5
  assert ev['bits_per_byte'] == pytest.approx(
      ev['loss'] / np.log(2) / ev['bytes_per_token'])


def test_finetuning_masks_prompts(data, tmp_path):
  source = corpora.jsonl(f'{data}/chat.jsonl', field='response',
                         prompt_field='prompt', length=32)
  source.bind(base.Spec(batch_size=8, eval_batch_size=8))
  docs = sources.JsonlDocs(f'{data}/chat.jsonl', 'response',
                           prompt_field='prompt')
  prompts = {bytes(docs[i][0][:docs[i][1]].astype(np.uint8))
             for i in range(len(docs))}
  checked = 0
  for row in range(24):
    if row % 8 == 0:
      batch = source.next_batch()
    tokens, w = batch['tokens'][row % 8], batch['weights'][row % 8]
    seg = batch['segment_ids'][row % 8]
    for s in set(seg[seg > 0].tolist()):
      piece = bytes(tokens[seg == s].astype(np.uint8))
      if piece.startswith(b'Q: ') and len(piece) > 13:  # a whole prompt
        assert piece[:13] in prompts
        assert (w[seg == s][:13] == 0).all()
        assert (w[seg == s][13:] == 1).all()
        checked += 1
  code, records = _train(tmp_path, f"""
train.dataset = @data.jsonl()
data.jsonl.paths = '{data}/chat.jsonl'
data.jsonl.field = 'response'
data.jsonl.prompt_field = 'prompt'
data.jsonl.length = 32
""")
  assert code == 0 and np.isfinite(_eval(records)['bits_per_byte'])
  assert checked >= 3
  # the JSONL's offsets index is cached beside the file
  assert os.path.exists(f'{data}/chat.jsonl.gintrain-index.npz')


def _error(tmp_path, capsys, body, vocab=256):
  code, _ = _train(tmp_path, body, vocab)
  err = [line for line in capsys.readouterr().err.splitlines()
         if line.startswith('gintrain: error:')]
  assert code == 1 and len(err) == 1, err
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  return err[0]


def test_bad_inputs_are_one_line(data, tmp_path, capsys):
  # a JSONL line that is not JSON, with on_bad_line='error'
  line = _error(tmp_path, capsys, f"""
train.dataset = @data.jsonl()
data.jsonl.paths = '{data}/docs.jsonl'
data.jsonl.on_bad_line = 'error'
""")
  assert f'{data}/docs.jsonl:52: not a JSON object' in line
  # skipped by default, with a count
  source = corpora.jsonl(f'{data}/docs.jsonl', length=32)
  assert source.info['skipped_lines'] == 1
  # a missing file
  line = _error(tmp_path, capsys, f"""
train.dataset = @data.jsonl()
data.jsonl.paths = '{data}/nope.jsonl'
""")
  assert f'{data}/nope.jsonl: no such file' in line
  # a Parquet file without the field
  line = _error(tmp_path, capsys, f"""
train.dataset = @data.parquet()
data.parquet.paths = '{data}/docs.parquet'
data.parquet.field = 'body'
""")
  assert f"{data}/docs.parquet: no column 'body'" in line
  # the model's tokenizer is not the data's
  line = _error(tmp_path, capsys, f"""
train.dataset = @data.array_record()
data.array_record.paths = '{data}/prepared'
data.array_record.tokenizer = 'byte'
""")
  assert 'manifest.json' in line and 'tokenized with' in line
  # a tokenizer larger than the model's embedding
  line = _error(tmp_path, capsys, f"""
train.dataset = @data.array_record()
data.array_record.paths = '{data}/prepared'
data.array_record.length = 32
""", vocab=256)
  assert 'vocabulary of 300' in line


def test_corrupt_array_record_shard(data, tmp_path, capsys):
  import shutil  # pylint: disable=import-outside-toplevel
  copy = tmp_path / 'prepared'
  shutil.copytree(f'{data}/prepared', copy)
  shard = copy / 'shard-00001.array_record'
  raw = shard.read_bytes()
  shard.write_bytes(raw[:len(raw) // 2])
  line = _error(tmp_path, capsys, f"""
train.dataset = @data.array_record()
data.array_record.paths = '{copy}'
""", vocab=300)
  assert f'{shard}: corrupt or not an ArrayRecord file' in line
