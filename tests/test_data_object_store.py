"""JSONL, Parquet and prepared ArrayRecord sources on an object store (a
real local S3 server, tests/s3_server.py): the LM trains a few steps from a
gin file whose paths are ``s3://`` URLs (a ``*`` pattern for JSONL);
``data prepare`` writes to ``s3://`` and the LM trains from that folder
through a local cache checked against the manifest's SHA-256 digests."""

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
from gintrain.runner.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.data import staging  # pylint: disable=g-import-not-at-top,wrong-import-position

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


@pytest.fixture(scope='module')
def prepared_url(s3, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """``data prepare`` straight to ``s3://corpus/prepared`` (staged under a
  HOME of the test's), and the same preparation written locally."""
  root = tmp_path_factory.mktemp('prepare')
  home = root / 'home'
  home.mkdir()
  (root / 'raw').mkdir()
  rng = np.random.default_rng(1)
  for i in range(30):
    words = rng.choice(['alpha', 'beta', 'def', '(', ')'],
                       size=int(rng.integers(20, 200)))
    (root / 'raw' / f'f{i:02d}.txt').write_text(' '.join(words))
  s3.create_bucket('prep')
  old = os.environ.get('HOME')
  os.environ['HOME'] = str(home)
  try:
    for out in ('s3://prep/prepared', str(root / 'local')):
      assert cli_main.main_with_flags(
          ['gintrain', 'data', 'prepare', '--shard_mb=0.002',
           '--no_progress', f'--out={out}', str(root / 'raw')]) == 0
  finally:
    os.environ['HOME'] = old
  return 's3://prep/prepared', root


def test_prepared_folder_on_s3_trains_from_a_verified_cache(prepared_url,
                                                            tmp_path):
  url, root = prepared_url
  manifest = json.loads(storage.read_bytes(f'{url}/manifest.json'))
  assert len(manifest['shards']) >= 3
  # the uploaded bytes are the local preparation's
  for name in sorted(os.listdir(root / 'local')):
    if name != 'plan.json':
      assert storage.read_bytes(f'{url}/{name}') == (
          root / 'local' / name).read_bytes(), name
  cache = tmp_path / 'cache'
  code, last = _train(tmp_path / 'a', f"""
train.dataset = @data.array_record()
data.array_record.paths = '{url}'
data.array_record.length = 32
data.array_record.cache_dir = '{cache}'
""")
  assert code == 0 and np.isfinite(last['bits_per_byte'])
  # the staged documents are the local preparation's documents
  remote = sources.ArrayRecordDocs(url, cache_dir=str(cache))
  local = sources.ArrayRecordDocs(str(root / 'local'))
  assert len(remote) == len(local) == 30
  for i in range(len(local)):
    assert remote[i][0].tolist() == local[i][0].tolist()
  # staged again: nothing downloaded or hashed (the files are unchanged)
  folder = staging.stage_dir_for(url, str(cache))
  shard = os.path.join(folder, manifest['shards'][0]['file'])
  before = {n: os.stat(os.path.join(folder, n)).st_mtime_ns
            for n in os.listdir(folder)}
  assert staging.stage_prepared(url, str(cache)) == folder
  after = {n: os.stat(os.path.join(folder, n)).st_mtime_ns
           for n in os.listdir(folder)}
  assert {n: t for n, t in after.items() if n != 'manifest.json'} == {
      n: t for n, t in before.items() if n != 'manifest.json'}
  # a cached file damaged locally is fetched again and verified
  data = bytearray(open(shard, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  with open(shard, 'wb') as f:
    f.write(data)
  staging.stage_prepared(url, str(cache))
  assert open(shard, 'rb').read() == storage.read_bytes(
      f'{url}/{manifest["shards"][0]["file"]}')


def test_a_corrupt_shard_on_s3_is_one_line(prepared_url, tmp_path, capsys,
                                           monkeypatch):
  url, root = prepared_url
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  manifest = json.loads(storage.read_bytes(f'{url}/manifest.json'))
  name = manifest['shards'][1]['file']
  good = storage.read_bytes(f'{url}/{name}')
  bad = bytearray(good)
  bad[len(bad) // 3] ^= 0x01  # same size, one bit
  storage.write_bytes(f'{url}/{name}', bytes(bad))
  try:
    with pytest.raises(Exception, match='SHA-256'):
      staging.stage_prepared(url, str(tmp_path / 'c1'))
    code = cli_main.main_with_flags([
        'gintrain', f'--workdir={tmp_path / "w"}', '--gin_file=lm.gin',
        '--gin_bindings=train.dataset = @data.array_record()',
        f"--gin_bindings=data.array_record.paths = '{url}'",
        f"--gin_bindings=data.array_record.cache_dir = '{tmp_path / 'c2'}'"])
    err = [l for l in capsys.readouterr().err.splitlines()
           if l.startswith('gintrain: error:')]
    assert code != 0 and len(err) == 1, err
    assert f'{url}/{name}' in err[0] and 'SHA-256' in err[0], err
    assert not os.path.exists(tmp_path / 'c2' / os.path.basename(
        staging.stage_dir_for(url, str(tmp_path / 'c2'))) / name)
  finally:
    storage.write_bytes(f'{url}/{name}', good)
  # the same preparation again: nothing to do (the store's manifest says
  # so); another one into that URL: one line naming it
  assert cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', '--shard_mb=0.002', '--no_progress',
       f'--out={url}', str(root / 'raw')]) == 0
  assert not os.path.exists(tmp_path / 'home' / '.cache')
  capsys.readouterr()
  (root / 'other').mkdir()
  (root / 'other' / 'a.txt').write_text('def alpha(beta): return 1\n' * 9)
  code = cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', '--no_progress', f'--out={url}',
       str(root / 'other')])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and len(err) == 1 and err[0].startswith(
      'gintrain: error:') and url in err[0], err
