"""Held-out bits per byte against wall time of two LM runs (a BPE run and a
byte run), from their ``metrics.jsonl``: the language-model guide's figure.

    python bench/plot_bpe_vs_byte.py BPE_WORKDIR BYTE_WORKDIR OUT.png

Wall time is counted from each run's process start (the ``process_start`` of
its goodput records), so the two curves compare at the same time spent.
"""

import json
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def curve(workdir):
  """``[(minutes since the process started, bits per byte)]`` of the
  eval records."""
  with open(f'{workdir}/metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  start = min(r['process_start'] for r in records if 'process_start' in r)
  return [((r['time'] - start) / 60, r['bits_per_byte']) for r in records
          if r.get('split') == 'eval' and 'bits_per_byte' in r]


def main(bpe, byte, out):
  fig = Figure(figsize=(5, 3.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, workdir in (('BPE-1024', bpe), ('byte', byte)):
    points = curve(workdir)
    ax.plot(*zip(*points), marker='o', label=label)
    for (t, bpb) in points:
      print(f'{label}\t{t:.1f} min\t{bpb:.3f} bits/byte')
  ax.set_xlabel('wall time (minutes, 2 shared CPU cores)')
  ax.set_ylabel('held-out bits per byte')
  ax.set_title('lm.gin: BPE-1024 vs bytes, 200 steps')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out)


if __name__ == '__main__':
  main(*sys.argv[1:4])
