"""``gintrain data``: prepare tokenized data for training.

    gintrain data prepare --out=DIR [--tokenizer=byte|PATH] [--field=text]
        [--prompt_field=NAME] [--pattern='*.py'] [--workers=N]
        [--shard_mb=64] [--on_bad_line=skip|error] [--dry_run [--length=128]]
        FILES_OR_FOLDERS...

Writes ArrayRecord shards and ``manifest.json`` (``runner.data.prepare``),
with a progress line and ETA; rerunning after a kill finishes the job
(finished shards are kept) with byte-identical output. ``--dry_run``
tokenizes and counts only (documents, tokens, the packing efficiency at
``--length``). Train on the folder with ``train.dataset =
@data.array_record()`` and ``data.array_record.paths = 'DIR'``. A fault
prints one line, ``gintrain: error: ...``, and exits with status 1.
"""

import argparse
import sys
import time

from gintrain.lib import errors
from gintrain.runner.data import prepare as prepare_lib
from gintrain.runner.errors import RunnerError

__all__ = ['main']


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise RunnerError(f'{message} (see gintrain data --help)')


def main(args) -> int:
  """``gintrain data ARGS``; returns the exit status."""
  parser = _Parser(prog='gintrain data', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('prepare', help='tokenize into ArrayRecord shards')
  p.error = parser.error
  p.add_argument('inputs', nargs='+', metavar='FILE_OR_FOLDER')
  p.add_argument('--out', default=None, help='the output folder')
  p.add_argument('--tokenizer', default='byte')
  p.add_argument('--field', default='text')
  p.add_argument('--prompt_field', default=None)
  p.add_argument('--pattern', default='*')
  p.add_argument('--workers', type=int, default=1)
  p.add_argument('--shard_mb', type=float, default=64.0)
  p.add_argument('--on_bad_line', choices=('skip', 'error'), default='skip')
  p.add_argument('--dry_run', action='store_true')
  p.add_argument('--length', type=int, default=128,
                 help='row length for the packing efficiency (--dry_run)')
  p.add_argument('--no_progress', action='store_true')
  try:
    parsed = parser.parse_args(list(args))
    if not parsed.dry_run and not parsed.out:
      raise RunnerError('data prepare needs --out (or --dry_run).')
    start = time.perf_counter()
    manifest = prepare_lib.prepare(prepare_lib.Options(
        inputs=tuple(parsed.inputs), out=parsed.out or '',
        tokenizer=parsed.tokenizer, field=parsed.field,
        prompt_field=parsed.prompt_field, pattern=parsed.pattern,
        shard_mb=parsed.shard_mb, workers=parsed.workers,
        on_bad_line=parsed.on_bad_line, dry_run=parsed.dry_run,
        length=parsed.length, progress=not parsed.no_progress))
  except (RunnerError, errors.GintrainError) as e:  # the latter: a store's
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    return 1
  except SystemExit as e:  # --help
    return int(e.code or 0)
  seconds = time.perf_counter() - start
  what = 'Would write' if parsed.dry_run else f'Wrote {parsed.out}:'
  line = (f'{what} {len(manifest["shards"])} shards, {manifest["documents"]}'
          f' documents, {manifest["tokens"]} tokens (tokenizer'
          f' {manifest["tokenizer"]["hash"]}) in {seconds:.1f} s')
  if manifest['skipped_lines']:
    line += f'; skipped {manifest["skipped_lines"]} bad JSONL line(s)'
  if parsed.dry_run:
    line += (f'; packing efficiency at length {parsed.length}:'
             f' {manifest["packing_efficiency"]:.2%}')
  print(line + '.')
  return 0
