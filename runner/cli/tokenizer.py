"""``gintrain tokenizer``: train or try a tokenizer.

    gintrain tokenizer train --vocab_size=N --out=PATH [--pattern='*.py'] FILES...
    gintrain tokenizer encode --tokenizer=PATH TEXT
    gintrain tokenizer check --tokenizer=PATH FILES...

``train`` fits a byte-level BPE (``runner.data.tokenizer.train_bpe``) on the
given files (folders are walked for ``--pattern``) and writes a
``tokenizer.json`` to PATH (a file, or a folder). ``check`` encodes and
decodes each file and reports the tokens, bytes per token, and whether
every file came back byte for byte. A fault prints one line,
``gintrain: error: ...``, and exits with status 1.
"""

import argparse
import sys
import time

from gintrain.runner.data import tokenizer as tokenizer_lib
from gintrain.runner.errors import RunnerError

__all__ = ['main']

expand_files = tokenizer_lib.expand_files


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise RunnerError(f'{message} (see gintrain tokenizer --help)')


def _check(tok, files) -> int:
  tokens = size = bad = 0
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    ids = tok.encode(data)
    tokens += len(ids)
    size += len(data)
    if tok.decode(ids) != data:
      bad += 1
      print(f'{path}: does not round-trip')
  print(f'{len(files)} files, {size} bytes, {tokens} tokens'
        f' ({size / max(tokens, 1):.3f} bytes/token); {bad} do not'
        ' round-trip.')
  return 1 if bad else 0


def main(args) -> int:
  """``gintrain tokenizer ARGS``; returns the exit status."""
  parser = _Parser(prog='gintrain tokenizer',
                   description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train a byte-level BPE')
  train.add_argument('files', nargs='+', metavar='FILE')
  train.add_argument('--vocab_size', type=int, required=True)
  train.add_argument('--out', required=True,
                     help='tokenizer.json to write (or a folder)')
  train.add_argument('--pattern', default='*',
                     help='file names to take from folders (fnmatch)')
  train.add_argument('--min_frequency', type=int, default=2)
  encode = sub.add_parser('encode', help='print the ids of TEXT')
  encode.add_argument('text')
  encode.add_argument('--tokenizer', default='byte')
  check = sub.add_parser('check', help='round-trip files')
  check.add_argument('files', nargs='+', metavar='FILE')
  check.add_argument('--tokenizer', default='byte')
  check.add_argument('--pattern', default='*')
  for p in (train, encode, check):
    p.error = parser.error
  try:
    parsed = parser.parse_args(list(args))
    if parsed.command == 'train':
      files = expand_files(parsed.files, parsed.pattern)
      start = time.perf_counter()
      tok = tokenizer_lib.train_bpe(files, parsed.vocab_size, parsed.out,
                                    parsed.min_frequency)
      print(f'Wrote {tok.path}: {tok.vocab_size} tokens from {len(files)}'
            f' files in {time.perf_counter() - start:.1f} s ({tok.hash}).')
      return 0
    tok = tokenizer_lib.load(parsed.tokenizer)
    if parsed.command == 'encode':
      print(' '.join(map(str, tok.encode(parsed.text.encode('utf-8')))))
      return 0
    return _check(tok, expand_files(parsed.files, parsed.pattern))
  except RunnerError as e:
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    return 1
  except SystemExit as e:  # --help
    return int(e.code or 0)
