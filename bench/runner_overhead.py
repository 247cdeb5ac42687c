"""The runner's training throughput against a bare jitted loop.

Both train the same model on the same batches (``runner.batching`` order)
with the same step math (loss, gradient, optimizer update, accuracy):

* bare: ``state, metrics = jitted_step(state, batch)`` in a ``for`` loop;
* runner: ``runner.train.main_with_flags`` on the same config (evaluation
  and periodic checkpoints outside the timed steps), so the timed steps
  include everything its loop does per step: batch assembly, dispatch,
  metric buffering, the actions, the preemption check, and every ``window``
  steps a log line with its metric fetch and records (train and goodput).

Timing is interleaved in one process so that load from other jobs on the
machine hits both alike, in ABBA rounds: the runner runs a timing hook (an
action due every ``window`` = ``log_every`` steps, after the log step's
metrics fetch and records, so no runner work is pending then), which closes
a runner window (``window`` steps, timed from the end of its previous
work). After the first runner window of a round the hook runs two bare windows
(each ended by ``block_until_ready``), after the second nothing: runner,
bare, bare, runner. Each round gives a ratio runner/bare (tokens/s, or
steps/s: the same batches); the table shows the median over the rounds after
``warmup`` windows (compilation excluded) and the quartiles.

Control: the same ABBA rounds with two identical bare loops (A/A). Its
ratio would be 1.000 on a quiet machine; its distance from 1 is the bias
and noise of the method (on a shared 2-core machine a few percent, more for
short windows). "corrected" divides runner/bare by it.

    python bench/runner_overhead.py [--scale=1] [--only=default,llama]
        [--profile]

The target is a ratio >= 0.97. Also printed: the main thread's CPU time a
step, runner and bare (medians of the windows), which load from other jobs
disturbs far less than the ratios; ``--profile`` prints where the runner
windows' host time goes (cProfile, which slows them: not for the ratios).
"""

import argparse
import cProfile
import pstats
import re
import statistics
import sys
import tempfile
import time

import jax
import optax
from absl import logging

from gintrain.runner.actions import base as actions_base
from gintrain.runner.data import batching
from gintrain.runner.data import datasets
from gintrain.runner.tasks import losses
from gintrain.runner.models import plain as models
from gintrain.runner.training import state as state_lib
from gintrain.runner import train as runner_train

# (name, model, batch size, window = log_every, windows: an even number).
# The first two are the default experiment's model and data, logging every
# 500 and every 50 steps (a log line costs about a millisecond of host time);
# 'LM' the language model of gin/lm.gin, reduced (width 64, 2 blocks, 64
# tokens), on the grain text source, without and with 2 grain worker
# processes; 'Llama tiny' the preset gin/llama_tiny.gin as shipped (model,
# optimizer with its schedule and clipping, 128-token grain batches of 16),
# logging every 20 steps.
LM_LENGTH = 64
LLAMA_LENGTH = 128  # gin/datasets/text_files.gin
CONFIGS = (
    ('default, log every 500', (128,), 64, 500, 40),
    ('default, log every 50', (128,), 64, 50, 150),
    ('wide 512x512, batch 256', (512, 512), 256, 100, 30),
    ('LM, grain in-process', 'lm:0', 16, 20, 12),
    ('LM, 2 grain workers', 'lm:2', 16, 20, 12),
    ('Llama tiny preset', 'llama:0', 16, 20, 12),
)
TOKENS = {'lm': LM_LENGTH, 'llama': LLAMA_LENGTH}
LEARNING_RATE = 0.01
LM_FLAGS = ['--gin_file=lm.gin', '--gin.transformer.width=64',
            '--gin.transformer.depth=2', f'--gin.transformer.max_len={LM_LENGTH}',
            f'--gin.text_files.length={LM_LENGTH}',
            '--gin.text_files.max_eval_examples=16', '--gin.train.actions=[]',
            '--gin.optimizer.learning_rate=0.001']


class BareLoop:
  """A hand-written jitted training loop, run a window at a time."""

  def __init__(self, features, batch_size, seed=0):
    self.data = datasets.digits()
    model = models.mlp(features=features, num_classes=10)
    variables = model.init(jax.random.key(seed), self.data.x_train[:1])
    self.state = state_lib.create_train_state(variables, model.apply,
                                              optax.adam(LEARNING_RATE))
    self.batch_size, self.seed, self.step = batch_size, seed, 0

    @jax.jit
    def step(state, batch):
      def objective(params):
        logits = model.apply({'params': params}, batch['x'])
        return losses.cross_entropy_loss(logits, batch['y']), logits
      (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(
          state.params)
      return state.apply_gradients(grads=grads), {
          'loss': loss, 'accuracy': losses.accuracy(logits, batch['y'])}

    self._step = step

  def run(self, steps: int) -> float:
    """Runs ``steps`` steps; returns their wall-clock seconds."""
    x, y, n = self.data.x_train, self.data.y_train, len(self.data.x_train)
    start = time.perf_counter()
    for _ in range(steps):
      idx = batching.global_batch_indices(n, self.batch_size, self.seed,
                                          self.step)
      self.state, _ = self._step(self.state, {'x': x[idx], 'y': y[idx]})
      self.step += 1
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


class LMBareLoop:
  """A hand-written jitted loop over the same LM, optimizer and grain
  batches as the runner's (same seed, so the same order). ``kind``: 'lm'
  (the reduced gin/lm.gin transformer, adamw at 0.001) or 'llama' (the
  gin/llama_tiny.gin preset: its model and its optimizer, built by the same
  ``runner.training.optimizers.optimizer`` with the same schedule)."""

  def __init__(self, kind, workers, batch_size, seed=0):
    # pylint: disable=g-import-not-at-top
    from gintrain.runner.data import base
    from gintrain.runner.data import text
    from gintrain.runner.tasks import lm
    # pylint: enable=g-import-not-at-top
    length = TOKENS[kind]
    self.source = text.text_files(length=length, worker_count=workers,
                                  max_eval_examples=16)
    self.source.bind(base.Spec(batch_size, batch_size, seed))
    model, tx = _lm_model(kind)
    task = lm.LanguageModel(model)
    variables = model.init(jax.random.key(seed), None)
    self.state = state_lib.create_train_state(variables, model.apply, tx)

    @jax.jit
    def step(state, batch):
      def objective(params):
        loss, metrics, _ = task.loss(params, {}, batch, None)
        return loss, metrics
      (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
          state.params)
      return state.apply_gradients(grads=grads), {'loss': loss, **metrics}

    self._step = step

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.state, _ = self._step(self.state, self.source.next_batch())
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


def _lm_model(kind):
  """``(model, optax transformation)`` of the 'lm' or 'llama' config."""
  # pylint: disable=g-import-not-at-top
  from gintrain.runner.models import llama
  from gintrain.runner.models import transformer
  from gintrain.runner.training import optimizers
  # pylint: enable=g-import-not-at-top
  if kind == 'lm':
    return (transformer.transformer(width=64, depth=2, max_len=LM_LENGTH),
            optax.adamw(0.001, weight_decay=0.01))
  # gin/llama_tiny.gin's values
  model = llama.llama(hidden_size=96, intermediate_size=256, num_layers=3,
                      num_heads=4, num_kv_heads=2, max_len=128)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=0.003, warmup_steps=50, decay_steps=600,
      end_value=0.0003)
  spec = optimizers.optimizer('adamw', schedule, weight_decay=0.01,
                              clip_grad_norm=1.0)
  return model, spec.build(1)


def _bare(model, batch_size):
  if isinstance(model, str):
    kind, workers = model.split(':')
    return LMBareLoop(kind, int(workers), batch_size)
  return BareLoop(model, batch_size)


def _runner_flags(model, batch_size):
  if isinstance(model, str):
    kind, workers = model.split(':')
    flags = (LM_FLAGS if kind == 'lm' else
             ['--gin_file=llama_tiny.gin', '--gin.train.actions=[]',
              '--gin.text_files.max_eval_examples=16'])
    return [*flags, f'--gin.text_files.worker_count={workers}',
            f'--gin.train.eval_batch_size={batch_size}']
  return [f'--gin.mlp.features={tuple(model)}',
          f'--gin.optimizer.learning_rate={LEARNING_RATE}']


class _EveryWindow(actions_base.Action):
  """The timing hook as an action (``hooks=`` takes actions too), due only
  at the end of a window: the other steps cost the runner no call."""

  def __init__(self, hook, window):
    self.hook, self.window = hook, window

  def due(self, step, last):
    return step % self.window == 0

  def __call__(self, step, state, metrics):
    self.hook(step)


def measure(model, batch_size, windows, window, warmup, extra=(),
            profile=None):
  """``([(runner steps/s, bare steps/s)], (runner, bare) host CPU µs a
  step)``: one pair per ABBA round (``windows`` runner windows, so
  ``windows // 2`` rounds); the host CPU is the main thread's (medians of
  the windows: the Python work, not the device's), which load from other
  jobs disturbs far less than wall time. ``profile``: a
  ``cProfile.Profile`` enabled during the runner's windows only."""
  bare = _bare(model, batch_size)
  bare.run(window)  # compile
  runner_s, bare_s, runner_cpu, bare_cpu = [], [], [], []
  last = [None, None]

  def bare_window():
    cpu = time.thread_time()
    seconds = bare.run(window)
    bare_cpu.append(time.thread_time() - cpu)
    return seconds

  def hook(step):
    if step % window:
      return
    now, cpu = time.perf_counter(), time.thread_time()
    if profile is not None:
      profile.disable()
    if last[0] is not None and step > warmup * window:
      runner_s.append(now - last[0])
      runner_cpu.append(cpu - last[1])
      if len(runner_s) % 2:  # runner, [bare, bare], runner
        bare_s.extend([bare_window(), bare_window()])
    if profile is not None and warmup * window <= step < total:
      profile.enable()
      profile.windows = getattr(profile, 'windows', 0) + 1
    last[0], last[1] = time.perf_counter(), time.thread_time()

  total = (warmup + windows + 1) * window
  timer = _EveryWindow(hook, window)
  with tempfile.TemporaryDirectory() as workdir:
    code = runner_train.main_with_flags([
        'bench', f'--workdir={workdir}', '--gin.train.num_epochs=None',
        f'--gin.train.num_steps={total}', f'--gin.train.batch_size={batch_size}',
        *_runner_flags(model, batch_size),
        f'--gin.train.log_every={window}', f'--gin.train.eval_every={total}',
        '--gin.checkpoint_policy.every_steps=0',
        '--gin.train.parallelism="single"', *extra], hooks=[timer])
  if code:
    raise SystemExit(f'runner failed with status {code}')
  return _rounds(runner_s, bare_s, window), (
      statistics.median(runner_cpu) / window * 1e6,
      statistics.median(bare_cpu) / window * 1e6)


def _rounds(a_s, b_s, window):
  """``[(a steps/s, b steps/s)]`` of ABBA rounds from the windows' seconds
  (``a_s[2i], a_s[2i+1]`` around ``b_s[2i], b_s[2i+1]``)."""
  n = min(len(a_s), len(b_s)) // 2
  return [(2 * window / (a_s[2 * i] + a_s[2 * i + 1]),
           2 * window / (b_s[2 * i] + b_s[2 * i + 1])) for i in range(n)]


def control(model, batch_size, rounds, window):
  """``[(a steps/s, b steps/s)]`` of two identical bare loops in ABBA
  rounds."""
  a, b = _bare(model, batch_size), _bare(model, batch_size)
  a.run(window)
  b.run(window)
  a_s, b_s = [], []
  for _ in range(rounds):
    a_s.append(a.run(window))
    b_s.extend([b.run(window), b.run(window)])
    a_s.append(a.run(window))
  return _rounds(a_s, b_s, window)


def _print_profile(profile, windows, top=25):
  """The ``top`` functions by own time, in microseconds per window."""
  stats = pstats.Stats(profile).stats
  rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
  total = sum(v[2] for v in stats.values())
  print(f'  {total / windows * 1e6:10.1f} us own time per window in all',
        file=sys.stderr)
  for (path, line, func), (_, calls, own, cum, _) in rows:
    where = f'{path.rsplit("/", 2)[-2:][-1]}:{line}({func})'
    print(f'  {own / windows * 1e6:10.1f} us own {cum / windows * 1e6:10.1f}'
          f' us cum {calls / windows:8.1f} calls  {where}', file=sys.stderr)


def _summary(pairs):
  ratios = sorted(x / y for x, y in pairs)
  q1, _, q3 = statistics.quantiles(ratios, n=4)
  return (statistics.median(y for _, y in pairs),
          statistics.median(x for x, _ in pairs),
          statistics.median(ratios), q1, q3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--scale', type=float, default=1.0,
                      help='multiplies the number of windows')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--only', default='',
                      help='comma-separated config name prefixes (e.g.'
                      ' "default,llama"; case-insensitive), or a whole name'
                      ' ("default, log every 50"); default: all')
  parser.add_argument('--profile', action='store_true',
                      help="cProfile the runner's timed windows and print"
                      ' where their host time goes (the profiler slows the'
                      ' runner: its ratios are then not the figures)')
  parser.add_argument('--runner_flag', action='append', default=[],
                      help='a further runner flag (repeatable), e.g.'
                      ' --runner_flag=--gin.train.spike_guard=False to see'
                      ' what a part of the loop costs')
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  # ',' separates patterns, ', ' is part of a name ('default, log every 50')
  only = [p.strip().lower() for p in re.split(r',(?! )', args.only)
          if p.strip()]
  # A pattern that is a whole config name picks that one only (the name
  # 'default, log every 50' is also the start of '... 500').
  picked = [([c for c in CONFIGS if c[0].lower() == p] or
             [c for c in CONFIGS if c[0].lower().startswith(p)]) for p in only]
  configs = [c for c in CONFIGS if not only or any(c in cs for cs in picked)]
  if not configs:
    raise SystemExit(f'--only={args.only}: no config starts with that; the'
                     f' configs: {", ".join(c[0] for c in CONFIGS)}.')
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}'
        f' ({jax.device_count()} device); ABBA rounds of log_every-step'
        f' windows, after {args.warmup} warm-up windows', flush=True)
  rows = []
  for name, model, batch_size, window, windows in configs:
    windows = 2 * max(2, int(windows * args.scale) // 2)
    profile = cProfile.Profile() if args.profile else None
    pairs, cpu = measure(model, batch_size, windows, window, args.warmup,
                         args.runner_flag, profile)
    if profile is not None:
      print(f'--- {name}: the runner windows under cProfile, per window'
            f' ({window} steps)', file=sys.stderr)
      _print_profile(profile, profile.windows)
    runner = _summary(pairs)
    aa = _summary(control(model, batch_size, len(pairs), window))
    rows.append((name, model, batch_size, runner, aa, cpu))
    print(f'  {name}: {len(pairs)} ABBA rounds of {window}-step windows',
          file=sys.stderr, flush=True)
  print(f'{"config":26} {"bare steps/s":>12} {"runner steps/s":>14}'
        f' {"runner/bare (quartiles)":>24} {"A/A":>6} {"corrected":>9}')
  for name, _, _, (bare, run, ratio, q1, q3), aa, _ in rows:
    print(f'{name:26} {bare:12.1f} {run:14.1f} {ratio:9.3f} ({q1:.3f}-{q3:.3f})'
          f' {aa[2]:6.3f} {ratio / aa[2]:9.3f}')
  print('host CPU of the main thread, µs a step (the Python work; less'
        ' disturbed by load than the ratios):')
  for name, _, _, _, _, (run, bare) in rows:
    print(f'  {name:26} runner {run:7.1f}  bare {bare:7.1f}  extra'
          f' {run - bare:7.1f}')
  for name, model, batch_size, (bare, run, *_), _, _ in rows:
    if isinstance(model, str):
      tokens = batch_size * TOKENS[model.split(':')[0]]
      print(f'{name}: tokens/s bare {bare * tokens:.0f}, runner'
            f' {run * tokens:.0f}')
  worst = min(r[3][2] for r in rows)
  worst_corrected = min(r[3][2] / r[4][2] for r in rows)
  print(f'worst runner/bare {worst:.3f}, corrected by the A/A control'
        f' {worst_corrected:.3f} (target >= 0.97)')


if __name__ == '__main__':
  main()
