"""``gintrain goodput WORKDIR [--out=PNG]``: where a run's time went, over
all its launches.

Reads the ``goodput`` records the runner writes into ``metrics.jsonl`` at
each log step (``runner.training.goodput``). Each launch (restart) is told
apart by its process start; for each it shows the steps it ran, its wall
time split into startup, compile, step, input, checkpoint, eval, agreement
and idle, the steps it lost (done past the checkpoint the next launch
resumed from, by the records: recomputed later) and the gap before the next
launch (from its last record to the next process start: the time the
killed process still ran, and the time it was down). The total line gives
each part's share of the whole time and the goodput: step time that was
not lost, over everything. A stacked bar plot of the same goes to
``--out`` (default ``<workdir>/goodput.png``).
"""

import argparse
import io
import json
import sys

from gintrain.lib import storage
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.training import goodput as goodput_lib

__all__ = ['read_launches', 'summarize', 'format_table', 'plot', 'main']

PARTS = goodput_lib.PARTS
SPLIT = 'goodput'


def read_launches(workdir: str) -> list[dict]:
  """Per launch, in order: ``{'process_start', 'start_step', 'end_step',
  'last_time', 'seconds': {part: s}}`` from the last goodput record of
  each launch (lines that do not parse are skipped)."""
  text = storage.read_bytes(workdir_lib.path(
      workdir, workdir_lib.METRICS_FILE)).decode('utf-8', 'replace')
  launches: dict = {}
  for line in text.split('\n'):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if not isinstance(record, dict) or record.get('split') != SPLIT:
      continue
    try:
      key = round(float(record['process_start']), 2)
      step, when = int(record['step']), float(record['time'])
    except (KeyError, TypeError, ValueError):
      continue
    launch = launches.setdefault(key, {
        'process_start': float(record['process_start']),
        'start_step': int(record.get('start_step', 0)), 'end_step': step,
        'last_time': when, 'seconds': {}})
    launch['end_step'] = max(launch['end_step'], step)
    if when >= launch['last_time'] or not launch['seconds']:
      launch['last_time'] = when
      launch['seconds'] = {p: float(record.get(f'{p}_seconds', 0.0))
                           for p in PARTS}
  return [launches[k] for k in sorted(launches)]


def summarize(workdir: str) -> dict:
  """The launches with ``lost_steps``, ``lost_seconds`` and ``gap_seconds``
  each, and the ``total``: seconds per part, ``lost``, ``gap``,
  ``wall``, fractions, ``goodput`` and ``lost_steps``."""
  launches = read_launches(workdir)
  total = dict.fromkeys(PARTS, 0.0)
  total.update(lost=0.0, gap=0.0, lost_steps=0)
  for i, launch in enumerate(launches):
    nxt = launches[i + 1] if i + 1 < len(launches) else None
    done = launch['end_step'] - launch['start_step']
    lost = max(0, launch['end_step'] - nxt['start_step']) if nxt else 0
    lost = min(lost, max(done, 0))
    per_step = launch['seconds']['step'] / done if done > 0 else 0.0
    launch['lost_steps'] = lost
    launch['lost_seconds'] = lost * per_step
    launch['gap_seconds'] = (max(0.0, nxt['process_start'] -
                                 launch['last_time']) if nxt else 0.0)
    for part in PARTS:
      total[part] += launch['seconds'][part]
    total['lost'] += launch['lost_seconds']
    total['gap'] += launch['gap_seconds']
    total['lost_steps'] += lost
  wall = sum(total[p] for p in PARTS) + total['gap']
  total['wall'] = wall
  total['fractions'] = {p: total[p] / wall if wall else 0.0
                        for p in (*PARTS, 'gap', 'lost')}
  total['goodput'] = ((total['step'] - total['lost']) / wall if wall
                      else 0.0)
  return {'launches': launches, 'total': total}


def format_table(summary: dict) -> str:
  """The table ``gintrain goodput`` prints."""
  head = ['launch', 'steps', *PARTS, 'lost_steps', 'gap']
  rows = []
  for i, launch in enumerate(summary['launches']):
    sec = launch['seconds']
    rows.append([str(i + 1), f'{launch["start_step"]}..{launch["end_step"]}',
                 *[f'{sec[p]:.1f}' for p in PARTS],
                 str(launch['lost_steps']), f'{launch["gap_seconds"]:.1f}'])
  t = summary['total']
  rows.append(['total', '', *[f'{t[p]:.1f}' for p in PARTS],
               str(t['lost_steps']), f'{t["gap"]:.1f}'])
  rows.append(['share', '', *[f'{100 * t["fractions"][p]:.1f}%'
                              for p in PARTS], '',
               f'{100 * t["fractions"]["gap"]:.1f}%'])
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in
           [head] + rows]
  lines.append(f'seconds; wall {t["wall"]:.1f} s over'
               f' {len(summary["launches"])} launch(es); lost work'
               f' {t["lost"]:.1f} s ({t["lost_steps"]} steps recomputed);'
               f' goodput {100 * t["goodput"]:.1f}% (step time not lost /'
               ' wall).')
  return '\n'.join(lines)


_COLORS = {'startup': '#8c8c8c', 'compile': '#9467bd', 'step': '#2ca02c',
           'input': '#ff7f0e', 'checkpoint': '#1f77b4', 'eval': '#17becf',
           'agreement': '#bcbd22', 'idle': '#c7c7c7', 'gap': '#d62728'}


def plot(summary: dict, out: str) -> str:
  """Stacked bars (one per launch, seconds by part, the lost step time
  hatched, the gap after it) written as a PNG to ``out``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  launches = summary['launches']
  fig = Figure(figsize=(max(4.0, 1.2 * len(launches) + 3), 4.0))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  xs = list(range(1, len(launches) + 1))
  bottom = [0.0] * len(launches)
  for part in (*PARTS, 'gap'):
    values = []
    for launch in launches:
      if part == 'gap':
        values.append(launch['gap_seconds'])
      elif part == 'step':
        values.append(launch['seconds']['step'] - launch['lost_seconds'])
      else:
        values.append(launch['seconds'][part])
    ax.bar(xs, values, bottom=bottom, color=_COLORS[part], label=part)
    bottom = [b + v for b, v in zip(bottom, values)]
    if part == 'step':
      lost = [launch['lost_seconds'] for launch in launches]
      ax.bar(xs, lost, bottom=bottom, color=_COLORS['step'], hatch='//',
             edgecolor='black', label='step (lost)')
      bottom = [b + v for b, v in zip(bottom, lost)]
  ax.set_xticks(xs)
  ax.set_xlabel('launch')
  ax.set_ylabel('seconds')
  ax.set_title(f'goodput {100 * summary["total"]["goodput"]:.1f}%')
  ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  storage.write_bytes(out, buf.getvalue())
  return out


def main(args: list[str]) -> int:
  """``gintrain goodput WORKDIR [--out=PNG]``; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog='gintrain goodput',
      description='Where a run\'s wall time went, over all its launches.')
  parser.add_argument('workdir')
  parser.add_argument('--out', default=None,
                      help='the stacked plot (default: WORKDIR/goodput.png)')
  opts = parser.parse_args(args)
  workdir = opts.workdir.rstrip('/') if '://' in opts.workdir else (
      opts.workdir)
  metrics = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
  if not storage.isfile(metrics):
    print(f'gintrain: error: {metrics}: no such file (is {workdir} a run'
          ' directory?).', file=sys.stderr)
    return 1
  summary = summarize(workdir)
  if not summary['launches']:
    print(f'gintrain: error: {metrics} holds no goodput records (written'
          ' at each log step by gintrain 22 and later).', file=sys.stderr)
    return 1
  print(format_table(summary))
  out = plot(summary, opts.out or workdir_lib.path(workdir, 'goodput.png'))
  print(f'plot: {out}')
  return 0
