"""Loss and accuracy curves of a run, from its ``metrics.jsonl``.

    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    ...   for step in (1, 2, 3):
    ...     print(json.dumps({'step': step, 'split': 'train', 'loss': 1 / step}), file=f)
    >>> out = plot_metrics(os.path.join(d, 'metrics.jsonl'), os.path.join(d, 'curves.png'))
    >>> open(out, 'rb').read(8) == b'\\x89PNG\\r\\n\\x1a\\n'
    True

Uses matplotlib's Agg canvas directly (no pyplot, no global backend change),
so it is safe in headless runs and threads. Paths may be object-store URLs
(``s3://...``; read and written whole through ``lib.storage``).
"""

import io
import json
import math
import os

from absl import logging

from gintrain.lib import storage
from gintrain.runner import errors

__all__ = ['read_metrics', 'plot_metrics', 'panels', 'plot_runs']

# Train-record entries shown after the eval metrics, when recorded.
_TRAIN_PANELS = ('learning_rate', 'examples_per_sec')
# Not curves: record keys, and the wall time of each record.
_SKIP = ('step', 'split', 'time')


def read_metrics(metrics_jsonl: str | os.PathLike) -> dict:
  """``{(split, name): (steps, values)}`` from a ``metrics.jsonl``.

  Steps are sorted; when a step repeats (a resumed run re-logs it) the last
  record wins. Lines that are not a JSON object with an integer ``step``
  and a string ``split`` (a write cut short by a crash or a full disk, or
  bytes that are not UTF-8), anywhere in the file, are skipped and counted
  in one warning naming the file and the first such lines. A valid last
  line without its newline is kept.

  Raises:
    FileNotFoundError: the file is missing.
  """
  path = os.fspath(metrics_jsonl)
  lines = storage.read_bytes(path).decode('utf-8', 'replace').split('\n')
  series: dict[tuple[str, str], dict[int, float]] = {}
  skipped = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    record = _record(line)
    if record is None:
      skipped.append(lineno)
      continue
    for name, value in record.items():
      if name in _SKIP or isinstance(value, bool):
        continue
      if isinstance(value, (int, float)):
        series.setdefault((record['split'], name), {})[record['step']] = (
            float(value))
  if skipped:
    shown = ', '.join(map(str, skipped[:5]))
    more = ', ...' if len(skipped) > 5 else ''
    logging.warning('%s: skipped %d torn or invalid line(s) (line %s%s).',
                    path, len(skipped), shown, more)
  return {key: (sorted(points), [points[s] for s in sorted(points)])
          for key, points in series.items()}


def _record(line: str) -> dict | None:
  """The metrics record of one line, or None if it is not one."""
  try:
    record = json.loads(line)
  except ValueError:  # json.JSONDecodeError, or a number out of range
    return None
  if (not isinstance(record, dict) or not isinstance(record.get('step'), int)
      or isinstance(record.get('step'), bool)
      or not isinstance(record.get('split'), str)):
    return None
  return record


def panels(series: dict) -> list[str]:
  """The metrics to draw: ``loss``, up to two more eval metrics (e.g.
  ``accuracy``; ``accuracy`` when nothing is recorded yet), then the
  learning rate and throughput when recorded."""
  evals = sorted({name for split, name in series
                  if split == 'eval' and name != 'loss'})
  out = ['loss'] + (evals[:2] or ['accuracy'])
  return out + [n for n in _TRAIN_PANELS if ('train', n) in series]


def _finish_axis(ax, name, title, shown):
  """Title, grid, a log scale for a positive loss, or a note if empty."""
  if not shown:
    ax.text(0.5, 0.5, f'no {name} recorded', ha='center', va='center',
            transform=ax.transAxes)
  elif name == 'loss' and min(shown) > 0:
    ax.set_yscale('log')
  ax.set_title(title)
  ax.set_xlabel('step')
  ax.grid(True, alpha=0.3)


def _save(fig, out_png) -> str:
  out = os.fspath(out_png)
  if storage.local_file(out) is None:  # rendered in memory, uploaded whole
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    storage.write_bytes(out, buf.getvalue())
    return out
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, format='png', dpi=100)
  return out


@errors.activity('writing the metrics plot')
def plot_metrics(metrics_jsonl: str | os.PathLike,
                 out_png: str | os.PathLike) -> str:
  """Draws the run's curves vs step (one line per split) into ``out_png``.

  Panels (see :func:`panels`): ``loss`` (train and eval), the eval metrics
  (e.g. ``accuracy``), the learning rate and examples/s. A panel without data
  says so instead of failing, so a run that stopped before its first eval
  still gets a plot. Returns ``out_png``.

  Raises:
    FileNotFoundError: as ``read_metrics``.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  series = read_metrics(metrics_jsonl)
  names = panels(series)
  fig = Figure(figsize=(4.5 * len(names), 4))
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.92, wspace=0.2)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(names), squeeze=False)[0]
  for ax, name in zip(axes, names):
    title = name.replace('_', ' ')
    keys = sorted((k for k in series if k[1] == name),
                  key=lambda k: (k[0] != 'train', k[0] != 'eval', k[0]))
    for split, _ in keys:
      steps, values = series[(split, name)]
      finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
      marker = 'o' if len(finite) < 30 else None
      ax.plot([s for s, _ in finite], [v for _, v in finite], marker=marker,
              markersize=3, label=f'{split} {name}')
    if keys:
      ax.legend()
    shown = [v for k in keys for v in series[k][1] if math.isfinite(v)]
    _finish_axis(ax, name, title, shown)
  return _save(fig, out_png)


def plot_runs(runs, out_png: str | os.PathLike, names=None) -> str:
  """Draws several runs' curves on one figure, one colour per run.

  Args:
    runs: ``[(label, metrics_jsonl path)]``.
    out_png: the PNG to write.
    names: the metrics to draw (one panel each); default ``loss`` then the
      eval metrics any run recorded (up to three). Train curves are solid,
      eval ones dashed with markers.

  Returns:
    ``out_png``.

  Raises:
    FileNotFoundError: as ``read_metrics``.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  series = [(label, read_metrics(path)) for label, path in runs]
  if not names:
    evals = sorted({n for _, s in series for split, n in s
                    if split == 'eval' and n != 'loss'})
    names = ['loss'] + evals[:3]
  fig = Figure(figsize=(5 * len(names), 4.2))
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(names), squeeze=False)[0]
  for ax, name in zip(axes, names):
    drawn = []
    for i, (label, s) in enumerate(series):
      color = f'C{i % 10}'
      for split, style in (('train', '-'), ('eval', '--')):
        if (split, name) not in s:
          continue
        steps, values = s[(split, name)]
        finite = [(x, v) for x, v in zip(steps, values) if math.isfinite(v)]
        ax.plot([x for x, _ in finite], [v for _, v in finite], style,
                color=color, marker='o' if split == 'eval' else None,
                markersize=3, label=f'{label} ({split})')
        drawn += [v for _, v in finite]
    if drawn:
      ax.legend(fontsize='small')
    _finish_axis(ax, name, name.replace('_', ' '), drawn)
  return _save(fig, out_png)
