"""Tokenizers: byte and tokenizer.json, training a BPE, exact round trips."""

import os

import numpy as np
import pytest

from gintrain.runner.cli import main as cli_main
from gintrain.runner.data import text
from gintrain.runner.data import tokenizer as tokenizer_lib
from gintrain.runner.errors import RunnerError

SLOW = os.environ.get('GINTRAIN_SLOW') == '1'


def _stdlib_files(limit=None):
  root = text.default_root()
  files = [os.path.join(root, p) for p, _ in text.list_files(root)]
  if limit is None:
    return files
  odd = [f for f in files if 'encoded_modules' in f or
         'test_source_encoding' in f or 'badsyntax_pep3120' in f]
  return files[:limit] + odd


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tok') / 'tokenizer.json')
  code = cli_main.main_with_flags(
      ['gintrain', 'tokenizer', 'train', '--vocab_size=400', f'--out={out}',
       *_stdlib_files(20)])
  assert code == 0
  return tokenizer_lib.load(out)


def test_byte_tokenizer_round_trip():
  tok = tokenizer_lib.load('byte')
  data = bytes(range(256)) * 3
  assert tok.decode(tok.encode(data)) == data
  assert tok.token_bytes().tolist() == [1] * 256


def test_bpe_round_trips_utf8_and_other_bytes(bpe):
  assert bpe.vocab_size == 400
  files = _stdlib_files(40)
  non_utf8 = 0
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    try:
      data.decode('utf-8')
    except UnicodeDecodeError:
      non_utf8 += 1
    ids = bpe.encode(data)
    assert ids.dtype == np.int32 and ids.max() < bpe.vocab_size
    assert bpe.decode(ids) == data, path
    # token lengths in bytes add up to the file's bytes (bits per byte)
    assert int(bpe.token_bytes()[ids].sum()) == len(data)
    assert len(ids) < len(data)  # merges happened
  assert non_utf8 >= 1  # Latin-1/KOI8-R sources of the stdlib's tests
  batch = bpe.encode_batch([b'def f(x):\n  return x\n', b'\xff\xfeab'])
  assert [bpe.decode(b) for b in batch] == [b'def f(x):\n  return x\n',
                                            b'\xff\xfeab']


def test_hash_and_folder_loading(bpe, tmp_path):
  folder = tmp_path / 'model'
  folder.mkdir()
  with open(bpe.path, 'rb') as f:
    (folder / 'tokenizer.json').write_bytes(f.read())
  again = tokenizer_lib.load(str(folder))
  assert again.hash == bpe.hash != 'byte'
  assert again.encode(b'import os').tolist() == bpe.encode(
      b'import os').tolist()


def test_bad_tokenizer_files(tmp_path):
  with pytest.raises(RunnerError, match='no such file'):
    tokenizer_lib.load(str(tmp_path / 'missing.json'))
  with pytest.raises(RunnerError, match='has no tokenizer.json'):
    tokenizer_lib.load(str(tmp_path))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"not": "a tokenizer"}')
  with pytest.raises(RunnerError, match='not a tokenizers JSON'):
    tokenizer_lib.load(str(bad))


def test_cli_errors(tmp_path, capsys):
  code = cli_main.main_with_flags(
      ['gintrain', 'tokenizer', 'train', '--vocab_size=100',
       f'--out={tmp_path}/t.json', str(tmp_path / 'nope.txt')])
  assert code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('gintrain: error:')
  assert 'nope.txt' in err[0]


@pytest.mark.skipif(not SLOW, reason='GINTRAIN_SLOW=1: whole stdlib (40 s)')
def test_bpe_round_trips_the_whole_stdlib(bpe):
  files = _stdlib_files()
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    assert bpe.decode(bpe.encode(data)) == data, path
