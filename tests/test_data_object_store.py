"""JSONL and Parquet sources on an object store (a real local S3 server,
tests/s3_server.py): the LM trains a few steps from a gin file whose
paths are ``s3://`` URLs (a ``*`` pattern for JSONL)."""

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position

from gintrain.lib import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.cli import main as cli_main  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.data import corpora  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def bucket(s3, tmp_path_factory):  # pylint: disable=redefined-outer-name
  root = tmp_path_factory.mktemp('local')
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(['alpha', 'beta', 'def', '(', ')'],
                               size=int(rng.integers(3, 20))))
           for _ in range(80)]
  for part in range(2):
    with open(root / f'docs{part}.jsonl', 'w', encoding='utf-8') as f:
      for t in texts[part::2]:
        f.write(json.dumps({'text': t}) + '\n')
  pq.write_table(pa.table({'text': texts}), root / 'docs.parquet',
                 row_group_size=20)
  s3.create_bucket('corpus')
  for name in ('docs0.jsonl', 'docs1.jsonl', 'docs.parquet'):
    storage.upload_file(str(root / name), f's3://corpus/data/{name}')
  return 's3://corpus/data', texts


def _train(tmp_path, body):
  tmp_path.mkdir(exist_ok=True)
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(f"""include 'lm.gin'
{body}
transformer.vocab_size = 256
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
  workdir = tmp_path / 'run'
  code = cli_main.main_with_flags(['gintrain', f'--workdir={workdir}',
                                   f'--gin_file={gin_file}'])
  records = [json.loads(l) for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  return code, [r for r in records if r.get('split') == 'eval'][-1]


def test_jsonl_and_parquet_train_from_s3(bucket, tmp_path):
  url, texts = bucket
  cache = tmp_path / 'cache'
  code, last = _train(tmp_path / 'j', f"""
train.dataset = @data.jsonl()
data.jsonl.paths = '{url}/docs*.jsonl'
data.jsonl.length = 32
data.jsonl.cache_dir = '{cache}'
""")
  assert code == 0 and np.isfinite(last['bits_per_byte'])
  assert len(os.listdir(cache)) >= 2  # the copies (and their indexes)
  code, last = _train(tmp_path / 'p', f"""
train.dataset = @data.parquet()
data.parquet.paths = '{url}/docs.parquet'
data.parquet.length = 32
""")
  assert code == 0 and np.isfinite(last['bits_per_byte'])

  # the documents read back from the store are the ones written
  source = corpora.parquet(f'{url}/docs.parquet', holdout_fraction=0.5)
  docs = source._train.docs.docs  # pylint: disable=protected-access
  assert [bytes(docs[i][0].astype(np.uint8)).decode() for i in
          range(len(docs))] == texts
  source = corpora.jsonl(f'{url}/docs*.jsonl', holdout_fraction=0.5,
                         cache_dir=str(cache))
  docs = source._train.docs.docs  # pylint: disable=protected-access
  assert [bytes(docs[i][0].astype(np.uint8)).decode() for i in
          range(len(docs))] == texts[0::2] + texts[1::2]


def test_missing_object_is_one_line(bucket, tmp_path, capsys):
  url, _ = bucket
  code = cli_main.main_with_flags([
      'gintrain', f'--workdir={tmp_path / "w"}', '--gin_file=lm.gin',
      '--gin_bindings=train.dataset = @data.parquet()',
      f"--gin_bindings=data.parquet.paths = '{url}/nope.parquet'"])
  err = [l for l in capsys.readouterr().err.splitlines()
         if l.startswith('gintrain: error:')]
  assert code != 0 and len(err) == 1 and 'nope.parquet' in err[0], err
