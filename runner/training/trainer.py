"""The training loop: a flat sequence of steps, evals and checkpoints.

One run of :func:`train`:

1. build the model, dataset and optimizer; create the train state;
2. resume from ``<workdir>/checkpoints`` (train state, early-stopping state,
   kept-best record, data position) or start fresh (optionally from
   ``init_from`` weights);
3. for each step: the batch is a pure function of ``(seed, step)``
   (``runner.batching``), so a resumed run sees exactly the batches an
   uninterrupted one would; log every ``log_every`` steps, evaluate every
   ``eval_every`` steps (early stopping, keep-best), save as the checkpoint
   policy says, stop everywhere at once on preemption;
4. save a final checkpoint, plot the metrics.

Multi-process: every process loads only its share of each global batch;
process 0 alone writes logs, metrics and files; all processes make the same
checkpoint and preemption calls in the same order.
"""

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from gintrain.runner import batching
from gintrain.runner import checkpointing
from gintrain.runner import distributed
from gintrain.runner import losses
from gintrain.runner import metric_writers
from gintrain.runner import parallel
from gintrain.runner import plots
from gintrain.runner import preemption
from gintrain.runner import settings as settings_lib
from gintrain.runner import state as state_lib
from gintrain.runner.errors import RunnerError

__all__ = ['train', 'TrainResult', 'Preempted', 'METRICS_PLOT']

METRICS_PLOT = 'metrics.png'


class Preempted(Exception):
  """Raised after the preemption checkpoint is written; exit and requeue."""

  def __init__(self, step):
    self.step = step
    super().__init__(f'preempted at step {step}; checkpoint saved')


@dataclasses.dataclass
class TrainResult:
  """What a run ends with (host values).

  Attributes:
    state: the final train state (numpy leaves).
    step: the number of steps done (resumed ones included).
    train_metrics: the last logged train metrics.
    eval_metrics: the last eval metrics.
    stopped_early: whether early stopping ended the run.
    best: ``[(step, value)]`` of the kept-best checkpoints, best first.
  """
  state: Any
  step: int
  train_metrics: dict
  eval_metrics: dict
  stopped_early: bool = False
  best: list = dataclasses.field(default_factory=list)


def _resolve(obj, what, attrs):
  """``obj``, or ``obj()`` if it is a factory lacking ``attrs``."""
  if not all(hasattr(obj, a) for a in attrs) and callable(obj):
    obj = obj()
  missing = [a for a in attrs if not hasattr(obj, a)]
  if missing:
    raise RunnerError(
        f'train.{what} must provide {", ".join(attrs)} (or be a factory'
        f' returning such an object); {obj!r} lacks {", ".join(missing)}.')
  return obj


def _positive(name, value, allow_none=False):
  if value is None and allow_none:
    return None
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise RunnerError(f'train.{name} must be a positive integer, got'
                      f' {value!r}.')
  return value


def _num_steps(num_steps, num_epochs, spe):
  if (num_steps is None) == (num_epochs is None):
    raise RunnerError('set exactly one of train.num_steps and'
                      f' train.num_epochs (got {num_steps!r} and'
                      f' {num_epochs!r}).')
  if num_steps is not None:
    return _positive('num_steps', num_steps)
  return _positive('num_epochs', num_epochs) * spe


def _eval_batches(dataset, global_size, backend):
  """The padded test set as placed batches ``{'x', 'y', 'mask'}``."""
  n = dataset.num_test
  count = jax.process_count()
  index = jax.process_index()
  batches = []
  for start in range(0, n, global_size):
    idx = np.arange(start, start + global_size)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    idx, mask = (batching.process_slice(a, index, count) for a in (idx, mask))
    batches.append(backend.put_batch({'x': dataset.x_test[idx],
                                      'y': dataset.y_test[idx],
                                      'mask': mask.astype(np.float32)}))
  return batches


def _evaluate(backend, dstate, batches):
  totals = None
  for batch in batches:
    sums = backend.get(backend.eval_step(dstate, batch))
    totals = sums if totals is None else {k: totals[k] + sums[k]
                                          for k in totals}
  count = float(totals.pop('count'))
  return {k: float(v) / count for k, v in totals.items()}




class _TrainLog:
  """Train-metric records and log lines, written shortly after their sync.

  At a log step the loop fetches the metric sums (which waits for that
  step); the record and the log line (about a millisecond of host work) are
  written once ``WRITE_DELAY`` more steps are dispatched, so the device
  computes meanwhile instead of idling.
  """
  WRITE_DELAY = 8

  def __init__(self, writer, total, start, main):
    self.writer, self.total, self.main = writer, total, main
    self.tick, self.tick_step = time.perf_counter(), start
    self.pending = None
    self.last = {}

  def fetch(self, step, host_sums):
    """Turns the sums since the last fetch into means and a rate."""
    now = time.perf_counter()
    steps = step - self.tick_step
    self.last = {k: float(v) / steps for k, v in host_sums.items()}
    rate = steps / max(now - self.tick, 1e-9)
    self.tick, self.tick_step = now, step
    self.pending = (step, self.last, rate)

  def maybe_write(self, step):
    if self.pending is not None and step >= (
        self.pending[0] + self.WRITE_DELAY):
      self.write()

  def write(self):
    """Writes the pending record, if any."""
    if self.pending is None:
      return
    step, metrics, rate = self.pending
    self.pending = None
    self.writer.write_scalars(step, {**metrics, 'steps_per_sec': rate})
    if self.main:
      logging.info('step %d/%d: %s | %.1f steps/s | ETA %s', step,
                   self.total, _format_metrics(metrics), rate,
                   _format_eta((self.total - step) / rate))


def _format_eta(seconds):
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _format_metrics(metrics):
  return ' '.join(f'{k}={v:.4f}' for k, v in metrics.items())


def train(*, model=None, dataset=None, optimizer=None,
          loss: Callable = losses.cross_entropy_loss,
          metrics: Mapping[str, Callable] | None = None,
          batch_size: int = 128, num_steps: int | None = None,
          num_epochs: int | None = None, eval_every: int | None = None,
          eval_batch_size: int = 1024, log_every: int = 100, seed: int = 0,
          parallelism: str = 'auto',
          early_stopping: state_lib.EarlyStopper | None = None,
          checkpoint: checkpointing.CheckpointPolicy | None = None,
          state_factory: Callable = state_lib.create_train_state,
          workdir: str | None = None, resume: str = 'auto',
          init_from: str | None = None, settings=None,
          hooks: Sequence[Callable[[int], None]] = (),
          dry_run: bool = False) -> TrainResult | dict:
  """Trains ``model`` on ``dataset``; see the module doc.

  Args:
    model: a ``runner.models.Model`` (anything with ``init(rng, x)`` and
      ``apply(variables, x)``), or a factory returning one.
    dataset: a ``runner.datasets.Dataset``, or a factory returning one.
    optimizer: a ``runner.optimizers.OptimizerSpec`` or an optax
      ``GradientTransformation``.
    loss: ``loss(logits, labels) -> batch mean``, minimised.
    metrics: more ``name -> fn(logits, labels) -> batch mean`` to report
      (default: accuracy).
    batch_size: global batch size (a multiple of the device count).
    num_steps: steps to train (or give ``num_epochs``).
    num_epochs: epochs to train (full batches; the remainder is dropped).
    eval_every: steps between evaluations on the test split (default: one
      epoch). There is always one at the end.
    eval_batch_size: global eval batch size (rounded up to a multiple of the
      device count; the test split is padded and masked).
    log_every: steps between train-metric log lines and records.
    seed: seeds the initialisation and the data order.
    parallelism: ``'auto'``, ``'single'``, ``'pmap'`` or ``'sharded'``.
    early_stopping: from ``runner.state.early_stopping`` (None: off).
    checkpoint: the checkpoint policy (None: the default policy).
    state_factory: ``(model, tx, rng, sample_input) -> TrainState``.
    workdir: the run directory (from ``--workdir``).
    resume: ``'auto'``, ``'never'`` or ``'require'`` (from ``--resume``).
    init_from: a checkpoint whose params start a fresh run.
    settings: the run's FrozenConfigDict (``runner.settings``).
    hooks: called as ``hook(step)`` after every step (``step`` counts
      completed steps; at a log step, after the metrics fetch, so the device
      has no work pending then).
    dry_run: build everything, then return a summary instead of training.

  Returns:
    A :class:`TrainResult`, or with ``dry_run`` a dict describing the run.

  Raises:
    RunnerError: a bad setting, or a checkpoint that does not fit.
    Preempted: after saving, when a preemption signal arrived.
  """
  unset = [f'train.{name}' for name, value in (
      ('model', model), ('dataset', dataset), ('optimizer', optimizer))
             if value is None]
  if unset:
    raise RunnerError(
        f'{", ".join(unset)} not set: bind them in a gin file (e.g. include'
        ' default.gin, or run.gin with files from models/, datasets/ and'
        f' optimizers/) or with --gin.{unset[0]}=...')
  model = _resolve(model, 'model', ('init', 'apply'))
  dataset = _resolve(dataset, 'dataset', ('x_train', 'y_train', 'x_test',
                                          'y_test'))
  metric_fns = {'accuracy': losses.accuracy} if metrics is None else dict(
      metrics)
  batch_size = _positive('batch_size', batch_size)
  spe = batching.steps_per_epoch(len(dataset.x_train), batch_size)
  total = _num_steps(num_steps, num_epochs, spe)
  eval_every = _positive('eval_every', eval_every, allow_none=True) or spe
  log_every = _positive('log_every', log_every)
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    raise RunnerError(f'train.seed must be an integer >= 0, got {seed!r}.')
  policy = checkpoint or checkpointing.CheckpointPolicy()
  eval_names = ['loss', *metric_fns]
  for what, name in (('early_stopping.metric', early_stopping and
                      early_stopping.metric),
                     ('checkpoint_policy.best_metric', policy.best_metric)):
    if name and name not in eval_names:
      raise RunnerError(f'{what}={name!r} is not an eval metric; choose one'
                        f' of {", ".join(eval_names)}.')

  backend = parallel.make(parallelism)
  divisor = backend.batch_divisor
  if batch_size % divisor:
    raise RunnerError(
        f'train.batch_size={batch_size} must be a multiple of'
        f' {divisor} (devices) for parallelism={backend.mode!r}.')
  eval_size = -(-min(eval_batch_size, len(dataset.x_test)) // divisor) * (
      divisor)

  if isinstance(optimizer, optax.GradientTransformation):
    tx = optimizer
  elif hasattr(optimizer, 'build'):
    tx = optimizer.build(spe)
  else:
    raise RunnerError('train.optimizer must be @optimizers.optimizer() or an'
                      f' optax GradientTransformation, got {optimizer!r}.')
  rng = jax.random.key(seed)
  sample = dataset.x_train[:1]
  if dry_run:
    shapes = jax.eval_shape(
        lambda: state_factory(model=model, tx=tx, rng=rng,
                              sample_input=sample).params)
    sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)]
    return {'model': getattr(model, 'name', repr(model)),
            'dataset': getattr(dataset, 'name', repr(dataset)),
            'parallelism': backend.mode, 'devices': jax.device_count(),
            'steps': total, 'steps_per_epoch': spe,
            'parameters': sum(sizes),
            'param_shapes': jax.tree_util.tree_map(lambda x: x.shape, shapes)}

  if not workdir:
    raise RunnerError('train needs a workdir (--workdir).')
  main = distributed.is_main_process()
  state = jax.device_get(state_factory(model=model, tx=tx, rng=rng,
                                       sample_input=sample))
  ckpt = checkpointing.Checkpointer(workdir, policy)
  state, stopper, start, resumed = _resume_or_start(
      ckpt, state, early_stopping, resume, init_from, main)
  writer = metric_writers.MetricWriter(workdir, enabled=main)
  if settings is not None and main:
    _record_settings(workdir, settings, writer, resumed)

  backend.compile(loss, metric_fns)
  eval_batches = _eval_batches(dataset, eval_size, backend)
  dstate = backend.put_state(state)
  num_train = len(dataset.x_train)
  index, count = jax.process_index(), jax.process_count()

  def batch_at(step):
    idx = batching.global_batch_indices(num_train, batch_size, seed, step)
    if count > 1:
      idx = batching.process_slice(idx, index, count)
    return backend.put_batch({'x': dataset.x_train[idx],
                              'y': dataset.y_train[idx]})

  def save(step):
    ckpt.save(step, backend.get(dstate), stopper and stopper.state, seed)

  def evaluate(step):
    metrics = _evaluate(backend, dstate, eval_batches)
    writer.write_scalars(step, metrics, split='eval')
    if main:
      logging.info('eval at step %d: %s', step, _format_metrics(metrics))
    return metrics

  if main:
    logging.info('Training %s on %s: steps %d..%d of %d (%d per epoch),'
                 ' batch %d, parallelism %s on %d device(s).',
                 getattr(model, 'name', 'model'),
                 getattr(dataset, 'name', 'dataset'), start + 1, total, total,
                 spe, batch_size, backend.mode, jax.device_count())
  zero_sums = backend.put_state(
      {k: np.zeros((), np.float32) for k in ['loss', *metric_fns]})
  sums = zero_sums
  log = _TrainLog(writer, total, start, main)
  eval_metrics = {}
  stopped_early = bool(stopper and stopper.state.should_stop)
  step = start
  last_eval = None
  preemption.install()
  check_every = preemption.check_interval()
  # In one process should_stop() only reads the local flag: skip the call
  # (a microsecond a step) unless it is set.
  agree = jax.process_count() > 1
  try:
    while step < total and not stopped_early:
      if (agree or preemption.requested()) and preemption.should_stop(
          step, check_every):
        save(step)
        ckpt.wait()
        raise Preempted(step)
      dstate, sums = backend.train_step(dstate, sums, batch_at(step))
      step += 1
      log.maybe_write(step)
      if step % log_every == 0 or step == total:
        log.fetch(step, backend.get(sums))  # waits for this step
        sums = zero_sums
      for hook in hooks:
        hook(step)
      if step % eval_every == 0 or step == total:
        log.write()
        eval_metrics = evaluate(step)
        last_eval = step
        if stopper:
          stopper = stopper.update(eval_metrics)
          stopped_early = bool(stopper.state.should_stop)
        if ckpt.update_best(step, eval_metrics, lambda: backend.get(dstate),
                            stopper and stopper.state, seed) and main:
          logging.info('new best %s=%.4f at step %d', policy.best_metric,
                       eval_metrics[policy.best_metric], step)
      if ckpt.due(step):
        save(step)
      if stopped_early and main:
        logging.info('Early stopping at step %d: %s has not improved for %d'
                     ' evaluations (best %.4f).', step, stopper.metric,
                     stopper.state.patience_count,
                     stopper.state.best_metric)
    log.write()
    if last_eval != step:
      eval_metrics = evaluate(step)
    save(step)
    ckpt.wait()
  finally:
    preemption.uninstall()
    try:
      ckpt.close()
    finally:
      try:
        log.write()
      finally:
        writer.close()
  if main:
    plots.plot_metrics(writer.metrics_path,
                       os.path.join(workdir, METRICS_PLOT))
  return TrainResult(backend.get(dstate), step, log.last, eval_metrics,
                     stopped_early, list(ckpt.best))


def _resume_or_start(ckpt, state, stopper, resume, init_from, main):
  """``(state, stopper, start step, resumed)`` as ``--resume`` says."""
  latest = ckpt.latest_step()
  if resume == 'require' and latest is None:
    raise RunnerError(f'--resume=require but {ckpt.dir} holds no checkpoint'
                      f' ({ckpt.policy.prefix}<step>).')
  if resume == 'never' and latest is not None:
    raise RunnerError(
        f'--resume=never but {ckpt.dir} already holds checkpoints (latest'
        f' step {latest}); use --resume=auto to continue that run, or a new'
        ' --workdir.')
  if latest is None:
    if init_from:
      state = state.replace(params=checkpointing.load_params(init_from,
                                                             state.params))
      if main:
        logging.info('Initialised params from %s.', init_from)
    return state, stopper, 0, False
  restored = ckpt.restore(latest, state, stopper and stopper.state)
  if stopper:
    stopper = stopper._replace(state=restored.early_stopping)
  if main:
    logging.info('Resumed from %s (step %d).', restored.path, restored.step)
    if init_from:
      logging.info('--init_from=%s ignored: the run resumes.', init_from)
  return restored.state, stopper, restored.step, True


def _record_settings(workdir, settings, writer, resumed):
  """Saves the settings, writes them as hparams, warns on resume changes."""
  flat = settings_lib.flatten(settings)
  if resumed:
    try:
      previous = settings_lib.load(workdir)
    except (OSError, ValueError) as e:
      logging.warning('Cannot read the previous %s: %s',
                      settings_lib.SETTINGS_FILE, e)
      previous = None
    diff = settings_lib.changes(previous, flat) if previous else []
    if diff:
      logging.warning('Resuming with changed settings (%d): %s', len(diff),
                      '; '.join(diff))
  settings_lib.save(workdir, settings)
  writer.write_hparams(flat)
