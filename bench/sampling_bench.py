"""KV-cache sampling against a full forward pass per new token.

Both generate ``--new`` tokens (greedy) after a ``--prompt``-token prompt
from the same Llama, each one compiled function (compilation excluded: one
untimed call first):

* cached: :func:`runner.models.sampling.generate`: one prefill into a
  preallocated key/value cache, then a ``lax.scan`` of one-token steps;
* uncached: :func:`runner.models.sampling.generate_uncached`: every new
  token reruns the model over the whole (padded) sequence.

The two are timed alternately, ``--repeats`` times each, so load from other
jobs hits both alike; the table shows the median tokens/s and the ratio.
The tokens must agree (greedy cached == greedy uncached).

    python bench/sampling_bench.py [--new=256] [--prompt=32] [--batch=1]
        [--hidden=256] [--layers=4]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from gintrain.runner.models import llama
from gintrain.runner.models import sampling


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--new', type=int, default=256)
  p.add_argument('--prompt', type=int, default=32)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args()
  model = llama.llama(vocab_size=256, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3 // 32 * 32,
                      num_layers=args.layers, num_heads=args.hidden // 64,
                      num_kv_heads=max(1, args.hidden // 128))
  params = model.init(jax.random.key(0))['params']
  prompt = np.random.RandomState(0).randint(0, 256, (args.batch, args.prompt))
  fns = {'cached': sampling.generate, 'uncached': sampling.generate_uncached}
  outs = {name: np.asarray(fn(model, params, prompt, args.new))
          for name, fn in fns.items()}  # compile
  assert (outs['cached'] == outs['uncached']).all(), 'tokens differ'
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(model, params, prompt, args.new).block_until_ready()
      times[name].append(time.perf_counter() - start)
  tokens = args.batch * args.new
  rate = {k: tokens / statistics.median(v) for k, v in times.items()}
  print(f'{model.name}, {model.num_params():,} params, batch {args.batch},'
        f' prompt {args.prompt}, {args.new} new tokens, {jax.devices()[0]}')
  print(f'{"":10}{"tokens/s":>12}{"median s":>10}')
  for name in fns:
    print(f'{name:10}{rate[name]:12.1f}{statistics.median(times[name]):10.3f}')
  print(f'cached / uncached: {rate["cached"] / rate["uncached"]:.2f}x'
        ' (greedy tokens identical)')


if __name__ == '__main__':
  main()
