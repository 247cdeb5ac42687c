"""``gintrain sweep status``: one row per trial, best first.

Columns: ``trial`` (its workdir name), ``label``, ``status``, ``step`` (the
last step in its ``metrics.jsonl``), the metric (its last eval value by
default: ``--metric=accuracy``, or ``train/loss`` for a train metric), and
``note`` (the failed trial's ``gintrain: error:`` line, or why it was
pruned). Finished trials with the metric come first, best first (``max``
unless the metric's name holds ``loss`` or ``error``), then the rest in
sweep order. Formats: ``table`` (aligned text), ``csv``, ``json``, ``md``.
"""

import csv
import io
import json
import math
import os

from gintrain.runner import validation
from gintrain.runner.outputs import plots
from gintrain.runner.outputs import writers
from gintrain.runner.sweep import trials as trials_lib

__all__ = ['FORMATS', 'rows', 'render', 'default_goal', 'split_metric',
           'read_curve']

FORMATS = ('table', 'csv', 'json', 'md')
COLUMNS = ('trial', 'label', 'status', 'step', None, 'note')


def split_metric(metric: str) -> tuple[str, str]:
  """``('eval', 'accuracy')`` of ``accuracy``; ``('train', 'loss')`` of
  ``train/loss``."""
  if '/' in metric:
    split, name = metric.split('/', 1)
    return split, name
  return 'eval', metric


def default_goal(metric: str) -> str:
  name = split_metric(metric)[1]
  return 'min' if ('loss' in name or 'error' in name) else 'max'


def read_curve(trial_dir: str) -> dict:
  """``{(split, name): (steps, values)}`` of a trial ({} before any)."""
  path = os.path.join(trial_dir, writers.METRICS_FILE)
  if not os.path.isfile(path):
    return {}
  return plots.read_metrics(path)


def rows(sweep, metric='accuracy', goal=None) -> list:
  """The table's rows (dicts), sorted as the module doc says."""
  goal = goal or default_goal(metric)
  validation.check_choice('--goal', goal, ('min', 'max'))
  key = split_metric(metric)
  out = []
  for index, trial in enumerate(sweep.trials()):
    trial_dir = sweep.trial_dir(trial)
    status, record = trials_lib.trial_status(trial_dir)
    series = read_curve(trial_dir)
    last_step = max((steps[-1] for steps, _ in series.values() if steps),
                    default=None)
    value = None
    if key in series and series[key][1]:
      value = series[key][1][-1]
    row = {'index': index, 'trial': trial.name, 'label': trial.label,
           'status': status, 'step': last_step, metric: value,
           'note': record.get('error') or record.get('reason') or '',
           'bindings': trial.bindings}
    out.append(row)

  def order(row):
    value = row[metric]
    has = value is not None and math.isfinite(value) and (
        row['status'] in trials_lib.FINISHED)
    score = (-value if goal == 'max' else value) if has else 0.0
    return (not has, score, row['index'])
  return sorted(out, key=order)


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4f}'
  return str(value)


def render(table_rows, metric, fmt='table') -> str:
  """The rows as ``fmt`` (:data:`FORMATS`)."""
  validation.check_choice('--format', fmt, FORMATS)
  columns = [c or metric for c in COLUMNS]
  if fmt == 'json':
    return json.dumps([{c: r[c] for c in columns + ['bindings']}
                       for r in table_rows], indent=1) + '\n'
  cells = [[_cell(r[c]) for c in columns] for r in table_rows]
  if fmt == 'csv':
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(columns)
    writer.writerows([[('' if r[c] is None else r[c]) for c in columns]
                      for r in table_rows])
    return buf.getvalue()
  if fmt == 'md':
    lines = ['| ' + ' | '.join(columns) + ' |',
             '|' + '|'.join('---' for _ in columns) + '|']
    lines += ['| ' + ' | '.join(c.replace('|', '\\|') for c in row) + ' |'
              for row in cells]
    return '\n'.join(lines) + '\n'
  widths = [max([len(c)] + [len(row[i]) for row in cells])
            for i, c in enumerate(columns)]
  widths[-1] = 0  # the note is last: no padding
  lines = ['  '.join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
  lines += ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in cells]
  return '\n'.join(lines) + '\n'
