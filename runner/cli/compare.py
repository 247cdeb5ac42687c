"""``gintrain compare``: several runs' curves on one figure.

    gintrain compare RUN_DIR... [--out=compare.png] [--metrics=loss,accuracy]
        [--labels=a,b]

Each run's ``metrics.jsonl`` is read (``runner.outputs.plots.read_metrics``)
and drawn, one colour per run: the loss (train solid, eval dashed) and the
eval metrics, one panel each. A fault prints one line,
``gintrain compare: error: ...``, and exits with status 1.
"""

import argparse
import os
import sys

from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import plots
from gintrain.runner.outputs import writers

__all__ = ['main', 'compare']


def _labels(run_dirs) -> list[str]:
  """Short distinct labels: the folder names, or more of the path."""
  paths = [os.path.abspath(d).rstrip(os.sep).split(os.sep) for d in run_dirs]
  for depth in range(1, max(len(p) for p in paths) + 1):
    labels = ['/'.join(p[-depth:]) for p in paths]
    if len(set(labels)) == len(labels):
      return labels
  return [os.path.abspath(d) for d in run_dirs]


def compare(run_dirs, out: str, metrics=None, labels=None) -> str:
  """Plots ``run_dirs``' curves into ``out``; returns ``out``.

  Raises:
    RunnerError: a run without ``metrics.jsonl``, a bad line in one, or
      labels that do not match the runs.
  """
  if not run_dirs:
    raise RunnerError('give at least one RUN_DIR.')
  labels = labels or _labels(run_dirs)
  if len(labels) != len(run_dirs):
    raise RunnerError(f'--labels: {len(labels)} labels for {len(run_dirs)}'
                      ' runs.')
  runs = []
  for label, run_dir in zip(labels, run_dirs):
    path = os.path.join(run_dir, writers.METRICS_FILE)
    if not os.path.isfile(path):
      raise RunnerError(f'{run_dir}: no {writers.METRICS_FILE} (not a run'
                        ' directory?).')
    runs.append((label, path))
  try:
    return plots.plot_runs(runs, out, metrics)
  except ValueError as e:
    raise RunnerError(str(e)) from e


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise RunnerError(f'{message} (see gintrain compare --help)')


def main(args) -> int:
  """``gintrain compare ARGS``; returns the exit status."""
  parser = _Parser(prog='gintrain compare',
                   description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', metavar='RUN_DIR')
  parser.add_argument('--out', default='compare.png', help='the PNG to write')
  parser.add_argument('--metrics', default=None,
                      help='comma-separated metrics (default: loss and the'
                      ' eval metrics)')
  parser.add_argument('--labels', default=None,
                      help='comma-separated names of the runs (default:'
                      ' their folder names)')
  try:
    parsed = parser.parse_args(list(args))
    out = compare(parsed.runs, parsed.out,
                  parsed.metrics.split(',') if parsed.metrics else None,
                  parsed.labels.split(',') if parsed.labels else None)
  except RunnerError as e:
    print(f'gintrain compare: error: {e}', file=sys.stderr, flush=True)
    return 1
  except SystemExit as e:  # --help
    return int(e.code or 0)
  print(f'Wrote {out}')
  return 0
