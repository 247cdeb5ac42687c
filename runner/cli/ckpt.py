"""``gintrain ckpt``: list, inspect and compare checkpoints from the shell.

    gintrain ckpt ls DIR              # steps, sizes, file counts, times, complete or not
    gintrain ckpt inspect PATH [--json]   # the tree: shape, dtype, bytes
    gintrain ckpt diff A B            # leaves that differ, max abs difference
    gintrain ckpt convert SRC DST     # flax msgpack <-> Orbax (runner.cli.convert)
    gintrain ckpt convert --to=hf RUN OUT | --from=hf HF OUT  # runner.cli.hf_convert

``DIR`` is a checkpoint directory or a run's workdir (its ``checkpoints/``
and ``best_checkpoints/``); ``PATH``, ``A`` and ``B`` are checkpoint files,
or directories whose latest checkpoint is used; each may be a local path
or an object-store URL (``s3://...``). An Orbax checkpoint is listed by
``ls`` and refused by ``inspect``/``diff`` with the ``convert`` command to
run. A FIFO or other special file is never opened (nothing blocks), and a
crafted file costs bounded memory and time (``lib.msgpack_stream``).
``inspect`` reads only the
msgpack framing (:mod:`runner.cli.ckpt_structure`): no array data, so it
takes about as long for a 2.5 GiB file as for a small one. ``diff`` reads
the two files one block of one array at a time. A fault prints one line,
``gintrain ckpt: error: ...``, and exits with status 1.
"""

import argparse
import datetime
import json
import os
import sys

import numpy as np

from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints as lib_checkpoints
from gintrain.lib import checkpoints_multiprocess
from gintrain.lib import storage
from gintrain.runner.cli import ckpt_structure
from gintrain.runner.cli import convert as convert_lib
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import workdir as workdir_lib

__all__ = ['main', 'list_checkpoints', 'inspect', 'diff', 'human_bytes']

_PREFIX = 'checkpoint_'


def human_bytes(n: int) -> str:
  """``1536 -> '1.5 KiB'``."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n} B' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n} B'


def _status(path: str, kind: str, temp: bool) -> str:
  """A checkpoint's ``status`` in :func:`list_checkpoints`."""
  if temp:
    return 'temporary'
  if kind == 'link':  # followed: the file it names is read without blocking
    kind = 'directory' if storage.isdir(path) else 'file'
  if kind == 'directory':
    return 'orbax'
  if kind != 'file':
    return f'not a checkpoint: a {kind}'  # never opened: a FIFO blocks
  try:
    ckpt_structure.read_structure(path)
    return 'complete'
  except RunnerError as e:
    return 'incomplete: ' + str(e).split('checkpoint: ', 1)[-1].rstrip('.')


def list_checkpoints(directory: str, prefix: str = _PREFIX) -> list[dict]:
  """``[{'path', 'step', 'bytes', 'files', 'mtime', 'status'}]`` of
  ``directory`` (a local folder or a URL); ``bytes`` and ``files`` count
  every file of a checkpoint (its msgpack file, its sidecar and its sharded
  arrays in ``<name>_gda``).

  ``status``: ``'complete'`` (the msgpack tree parses to the file's end),
  ``'incomplete: <why>'``, ``'temporary'`` (a save in progress or
  interrupted), ``'orbax'`` (an Orbax checkpoint directory), or ``'not a
  checkpoint: a fifo'`` (or another special file, which is never opened).
  Steps are in order; temporaries come last.

  Raises:
    RunnerError: ``directory`` is not a directory.
  """
  if not storage.isdir(directory):
    raise RunnerError(f'{directory}: no such directory.')
  rows = []
  for name in storage.listdir(directory):
    path = storage.join(directory, name)
    temp = (checkpoint_naming.is_tmp_name(name, prefix) or
            checkpoint_naming.ORBAX_TMP_DIR_SUFFIX in name)
    if not (name.startswith(prefix) or temp):
      continue
    tail = name[len(prefix):]
    step = int(tail) if tail.isdigit() and not temp else None
    if step is None and not temp:
      continue
    try:
      st = storage.info(path)
    except FileNotFoundError:
      continue  # removed meanwhile (retention of a live run)
    # The size and file count of all its files: the msgpack file, its
    # sidecar and the sharded arrays in <name>_gda (every process's).
    size, files = (checkpoints_multiprocess.checkpoint_files(path)
                   if st['type'] in ('file', 'directory') else (st['size'], 1))
    rows.append({'path': path, 'step': step, 'mtime': st['mtime'],
                 'bytes': size, 'files': files,
                 'status': _status(path, st['type'], temp)})
  rows.sort(key=lambda r: (r['step'] is None, r['step'] or 0,
                           os.path.basename(r['path'])))
  return rows


def _ls(args) -> int:
  folders = [args.dir]
  if storage.isdir(storage.join(args.dir, workdir_lib.CHECKPOINT_DIR)):
    folders = [storage.join(args.dir, d) for d in
               (workdir_lib.CHECKPOINT_DIR, workdir_lib.BEST_DIR)
               if storage.isdir(storage.join(args.dir, d))]
  for folder in folders:
    rows = list_checkpoints(folder, args.prefix)
    print(f'{folder}: {len(rows)} checkpoint(s)')
    for r in rows:
      when = '-' if r['mtime'] is None else datetime.datetime.fromtimestamp(
          r['mtime']).isoformat(sep=' ', timespec='seconds')
      step = '-' if r['step'] is None else str(r['step'])
      files = f'{r["files"]} file' + ('s' if r['files'] != 1 else '')
      print(f'  {step:>8}  {human_bytes(r["bytes"]):>10}  {files:>9}  {when}'
            f'  {r["status"]:<10}  {os.path.basename(r["path"])}')
  return 0


def _resolve(path: str, prefix: str = _PREFIX) -> str:
  """A checkpoint file: ``path``, or the latest one in the directory.

  Raises:
    RunnerError: nothing there, no checkpoint, or an Orbax checkpoint
      (these tools read msgpack files: the line says how to convert it).
  """
  if not storage.exists(path):
    raise RunnerError(f'{path}: no such file or directory.')
  if storage.isdir(path):
    folder = path
    if storage.isdir(storage.join(path, workdir_lib.CHECKPOINT_DIR)):
      folder = storage.join(path, workdir_lib.CHECKPOINT_DIR)
    if checkpoint_naming.is_orbax_dir(folder):
      latest = folder
    else:
      latest = lib_checkpoints.latest_checkpoint(folder, prefix)
    if latest is None:
      raise RunnerError(f'{path}: holds no checkpoint ({prefix}<step>).')
    if checkpoint_naming.is_orbax_dir(latest):
      raise RunnerError(
          f'{latest} is an Orbax checkpoint; gintrain ckpt inspect and diff'
          ' read msgpack checkpoints: convert it first with'
          f' `gintrain ckpt convert {latest} {latest.rstrip("/")}.msgpack`.')
    return latest
  return path


def _group(path: str) -> str:
  parts = path.split('/')
  depth = 2 if parts[0] == 'state' and len(parts) > 2 else 1
  return '/'.join(parts[:depth])


def inspect(path: str) -> dict:
  """The structure of the checkpoint at ``path`` as a JSON-able dict.

  Keys: ``path``, ``file_bytes``, ``leaves`` (``[{'path', 'kind', 'dtype',
  'shape', 'size', 'bytes'[, 'value']}]``), ``groups`` (``{group:
  {'leaves', 'size', 'bytes'}}`` by top-level entry, ``state/*`` split),
  ``parameters`` (the element count of ``state/params``, ``params`` or, for
  a bare tree, every array) and ``step`` when the tree holds one.

  Raises:
    RunnerError: not a readable msgpack checkpoint.
  """
  structure = ckpt_structure.read_structure(_resolve(path))
  leaves, groups = [], {}
  for leaf in structure.leaves:
    row = {'path': leaf.path, 'kind': leaf.kind,
           'dtype': leaf.dtype.name if leaf.dtype is not None else None,
           'shape': list(leaf.shape), 'size': leaf.size
           if leaf.kind in ('array', 'scalar') else 1, 'bytes': leaf.nbytes}
    if leaf.value is not None:
      value = leaf.value
      row['value'] = value.item() if isinstance(value, np.generic) else (
          value if isinstance(value, (int, float, str, bool)) else repr(value))
    leaves.append(row)
    g = groups.setdefault(_group(leaf.path), {'leaves': 0, 'size': 0,
                                              'bytes': 0})
    g['leaves'] += 1
    g['size'] += row['size'] if leaf.kind == 'array' else 0
    g['bytes'] += leaf.nbytes
  params = None
  for prefix in ('state/params/', 'params/'):
    chosen = [r for r in leaves if r['path'].startswith(prefix)]
    if chosen:
      params = {'prefix': prefix.rstrip('/'), 'arrays': len(chosen),
                'size': sum(r['size'] for r in chosen),
                'bytes': sum(r['bytes'] for r in chosen)}
      break
  if params is None:
    arrays = [r for r in leaves if r['kind'] == 'array']
    params = {'prefix': '', 'arrays': len(arrays),
              'size': sum(r['size'] for r in arrays),
              'bytes': sum(r['bytes'] for r in arrays)}
  out = {'path': structure.path, 'file_bytes': structure.file_size,
         'leaves': leaves, 'groups': groups, 'parameters': params}
  for key in ('state/step', 'step'):
    step = [r.get('value') for r in leaves if r['path'] == key]
    if step and isinstance(step[0], int) and not isinstance(step[0], bool):
      out['step'] = step[0]
      break
  return out


def _table(rows, header):
  widths = [max(len(str(r[i])) for r in [header, *rows])
            for i in range(len(header))]
  def fmt(r):
    return '| ' + ' | '.join(
        str(c).ljust(w) if i < 3 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(r, widths))) + ' |'
  return [fmt(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
          *[fmt(r) for r in rows]]


def _inspect(args) -> int:
  info = inspect(args.path)
  if args.json:
    print(json.dumps(info, indent=1))
    return 0
  step = f', step {info["step"]}' if 'step' in info else ''
  print(f'{info["path"]}: {human_bytes(info["file_bytes"])}'
        f' ({info["file_bytes"]:,} bytes), {len(info["leaves"])} leaves{step}')
  rows = []
  for r in info['leaves']:
    shape = '(' + ', '.join(map(str, r['shape'])) + (
        ',)' if len(r['shape']) == 1 else ')')
    if r['kind'] not in ('array', 'scalar'):
      shape = repr(r.get('value'))[:40]
    rows.append((r['path'], shape, r['dtype'] or r['kind'],
                 f'{r["size"]:,}', f'{r["bytes"]:,}'))
  print('\n'.join(_table(rows, ('Name', 'Shape', 'Dtype', 'Size', 'Bytes'))))
  total = sum(r['size'] for r in info['leaves'] if r['kind'] == 'array')
  print(f'Total: {total:,} elements in'
        f' {sum(r["kind"] == "array" for r in info["leaves"])} arrays,'
        f' {human_bytes(sum(r["bytes"] for r in info["leaves"]))}')
  for name, g in info['groups'].items():
    print(f'  {name}: {g["leaves"]} leaves, {g["size"]:,} elements,'
          f' {human_bytes(g["bytes"])}')
  p = info['parameters']
  where = f' ({p["prefix"]})' if p['prefix'] else ''
  print(f'Parameters{where}: {p["size"]:,} in {p["arrays"]} arrays,'
        f' {human_bytes(p["bytes"])}')
  return 0


def _compare(path_a, a, path_b, b) -> tuple[float, int]:
  """``(max abs difference, differing elements)`` of two array leaves."""
  worst, count = 0.0, 0
  for x, y in zip(ckpt_structure.iter_leaf(path_a, a),
                  ckpt_structure.iter_leaf(path_b, b)):
    if x.dtype.kind in 'SUVb' or x.dtype.names:
      ne = x != y
      count += int(np.count_nonzero(ne))
      worst = max(worst, float(np.any(ne)))
      continue
    xf = x.astype(np.complex128 if x.dtype.kind == 'c' else np.float64)
    yf = y.astype(xf.dtype)
    both_nan = np.isnan(xf) & np.isnan(yf)
    d = np.abs(xf - yf)
    ne = ~(both_nan | (xf == yf))
    count += int(np.count_nonzero(ne))
    d = d[ne & ~np.isnan(d)]
    if d.size:
      worst = max(worst, float(d.max()))
    elif np.any(ne):
      worst = float('nan') if worst == 0.0 else worst
  return worst, count


def diff(path_a: str, path_b: str) -> dict:
  """How the checkpoints at ``path_a`` and ``path_b`` differ.

  Returns:
    ``{'a', 'b', 'only_a': [paths], 'only_b': [paths], 'differ': [{'path',
    'what', 'max_abs_diff', 'elements'}], 'identical': count}``. Array
    leaves are compared block by block (NaN equals NaN); a difference of
    shape or dtype, or of a plain value, is reported in ``what``.

  Raises:
    RunnerError: either is not a readable msgpack checkpoint.
  """
  path_a, path_b = _resolve(path_a), _resolve(path_b)
  a = {l.path: l for l in ckpt_structure.read_structure(path_a).leaves}
  b = {l.path: l for l in ckpt_structure.read_structure(path_b).leaves}
  out = {'a': path_a, 'b': path_b,
         'only_a': [p for p in a if p not in b],
         'only_b': [p for p in b if p not in a], 'differ': [],
         'identical': 0}
  for name, la in a.items():
    lb = b.get(name)
    if lb is None:
      continue
    arrays = la.kind in ('array', 'scalar') and lb.kind in ('array', 'scalar')
    if arrays and (la.shape != lb.shape or la.dtype != lb.dtype):
      out['differ'].append({
          'path': name, 'what': f'{la.dtype.name}{list(la.shape)} vs'
          f' {lb.dtype.name}{list(lb.shape)}', 'max_abs_diff': None,
          'elements': None})
    elif arrays:
      worst, count = _compare(path_a, la, path_b, lb)
      if count:
        out['differ'].append({'path': name, 'what': 'values',
                              'max_abs_diff': worst, 'elements': count})
      else:
        out['identical'] += 1
    elif la.kind != lb.kind or la.value != lb.value:
      out['differ'].append({'path': name, 'what': f'{la.value!r} vs'
                            f' {lb.value!r}', 'max_abs_diff': None,
                            'elements': None})
    else:
      out['identical'] += 1
  return out


def _diff(args) -> int:
  d = diff(args.a, args.b)
  print(f'--- {d["a"]}\n+++ {d["b"]}')
  for name in d['only_a']:
    print(f'- {name}: only in the first')
  for name in d['only_b']:
    print(f'+ {name}: only in the second')
  for row in d['differ']:
    if row['what'] == 'values':
      print(f'! {row["path"]}: max abs difference {row["max_abs_diff"]:.6g}'
            f' ({row["elements"]:,} elements differ)')
    else:
      print(f'! {row["path"]}: {row["what"]}')
  changed = len(d['differ']) + len(d['only_a']) + len(d['only_b'])
  print(f'{"identical" if not changed else f"{changed} leaves differ"};'
        f' {d["identical"]} leaves equal.')
  return 0


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise RunnerError(f'{self.prog}: {message} (see gintrain ckpt --help)')


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='gintrain ckpt', description=__doc__.split('\n')[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True,
                              parser_class=_Parser)
  ls = sub.add_parser('ls', help='steps, sizes, times, complete or not')
  ls.add_argument('dir', help='a checkpoint directory or a run workdir')
  ls.add_argument('--prefix', default=_PREFIX)
  ls.set_defaults(fn=_ls)
  ins = sub.add_parser('inspect', help='the tree, without reading arrays')
  ins.add_argument('path', help='a checkpoint file or directory')
  ins.add_argument('--json', action='store_true', help='print JSON')
  ins.set_defaults(fn=_inspect)
  df = sub.add_parser('diff', help='leaves that differ')
  df.add_argument('a')
  df.add_argument('b')
  df.set_defaults(fn=_diff)
  cv = sub.add_parser('convert', help='flax msgpack <-> Orbax; runs <->'
                      ' Hugging Face (--to=hf, --from=hf)')
  cv.add_argument('src', help='a msgpack checkpoint file or Orbax directory'
                  ' (--to=hf: a run or its checkpoint; --from=hf: an HF'
                  ' folder)')
  cv.add_argument('dst', help='the new checkpoint (the other format)')
  cv.add_argument('--to', choices=['hf'], help='export for transformers'
                  ' (runner.cli.hf_convert)')
  cv.add_argument('--from', dest='from_', choices=['hf'],
                  help='import a Hugging Face folder')
  cv.add_argument('--architecture', default=None,
                  help='--to=hf: LlamaForCausalLM, MistralForCausalLM or'
                  ' Qwen2ForCausalLM (default: from the model)')
  cv.add_argument('--max_shard_bytes', type=int, default=None,
                  help='--to=hf: the largest safetensors shard (5 GB)')
  cv.set_defaults(fn=_convert)
  return parser


def _convert(args) -> int:
  if args.to or args.from_:
    from gintrain.runner.cli import hf_convert  # pylint: disable=g-import-not-at-top
    if args.to and args.from_:
      raise RunnerError('convert: give --to=hf or --from=hf, not both.')
    if args.to:
      files = hf_convert.to_hf(args.src, args.dst, args.architecture,
                               args.max_shard_bytes)
      print(f'{args.src} -> {args.dst} (hf: {", ".join(files)})')
    else:
      print(f'{args.src} -> {hf_convert.from_hf(args.src, args.dst)}'
            f' (and {args.dst}/llama.gin)')
    return 0
  written = convert_lib.convert(args.src, args.dst)
  print(f'{args.src} -> {args.dst} ({written})')
  return 0


def main(args) -> int:
  """``gintrain ckpt ARGS``; returns the exit status."""
  try:
    parsed = _parser().parse_args(list(args))
    return parsed.fn(parsed)
  except RunnerError as e:
    print(f'gintrain ckpt: error: {e}', file=sys.stderr, flush=True)
    return 1
  except SystemExit as e:  # --help
    return int(e.code or 0)
