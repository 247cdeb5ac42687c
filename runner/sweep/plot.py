"""The metric against each swept binding, one panel per binding.

Numeric bindings are drawn on a numeric axis (logarithmic when the
positive values span more than a decade); others (tuples, references,
strings) one position per value. Each point is a trial with the metric;
the best one is ringed. Uses matplotlib's Agg canvas directly, as
:mod:`runner.outputs.plots` does.
"""

import ast
import math

__all__ = ['plot_metric']


def _number(text):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def plot_metric(rows, metric: str, out_png: str) -> str:
  """Draws ``rows`` (``runner.sweep.status.rows``, best first) into
  ``out_png``; returns it.

  Raises:
    ValueError: no trial has the metric yet.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  points = [r for r in rows if r[metric] is not None and
            math.isfinite(r[metric])]
  keys = list(dict.fromkeys(k for r in rows for k in r['bindings']))
  if not keys:
    keys = ['trial']
  fig = Figure(figsize=(4.5 * len(keys), 4))
  fig.subplots_adjust(left=0.1, right=0.97, bottom=0.18, top=0.88,
                      wspace=0.3)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(keys), squeeze=False)[0]
  for ax, key in zip(axes, keys):
    texts = [r['bindings'].get(key, '') if key != 'trial' else r['trial']
             for r in points]
    numbers = [_number(t) for t in texts]
    if points and all(n is not None for n in numbers):
      xs = numbers
      positive = [x for x in xs if x > 0]
      if len(positive) == len(xs) and max(xs) / min(xs) > 10:
        ax.set_xscale('log')
    else:
      categories = list(dict.fromkeys(texts))
      xs = [categories.index(t) for t in texts]
      ax.set_xticks(range(len(categories)))
      ax.set_xticklabels(categories, rotation=30, fontsize=7)
    ys = [r[metric] for r in points]
    ax.scatter(xs, ys, s=22)
    if points:
      ax.scatter(xs[:1], ys[:1], s=120, facecolors='none', edgecolors='red',
                 label='best')
      ax.legend(fontsize=7)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  fig.suptitle(f'{metric} of {len(points)} trials')
  fig.savefig(out_png, dpi=90)
  return out_png
