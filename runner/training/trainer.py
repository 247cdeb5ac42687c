"""The trainer: the loop that steps a built run and runs its actions.

``runner.training.assembly`` builds and checks the run (:func:`train`
calls its ``build``); :func:`train` trains it:

1. create the train state, or resume it from ``<workdir>/checkpoints`` (train
   state, data position, each checkpointed action's state);
2. for each step: this process's batch from the data source, the compiled
   step on the partitioner's devices; at log steps the metric sums are
   fetched (``metrics['train']``); then the actions that are due
   (``runner.actions``: report, eval, early stopping, keep-best, user
   actions, profiler, checkpoint, preemption);
3. after the last step: the final eval and checkpoint (actions due at the
   end), a plot of the metrics.

Multi-process: every process loads only its share of each global batch;
process 0 alone writes logs, metrics and files; all processes make the same
checkpoint and preemption calls in the same order.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gintrain.runner.actions import base as actions_base
from gintrain.runner.actions import checkpoint as checkpoint_action
from gintrain.runner.actions import early_stop
from gintrain.runner.actions import evaluation
from gintrain.runner.actions import goodput as goodput_action
from gintrain.runner.actions import keep_best
from gintrain.runner.actions import preempt
from gintrain.runner.actions import profiler
from gintrain.runner.actions import report
from gintrain.runner.actions import spike_guard
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import lock as lock_lib
from gintrain.runner.outputs import plots
from gintrain.runner.outputs import settings as settings_lib
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.outputs import writers as writers_lib
from gintrain.runner.parallel import distributed
from gintrain.runner.parallel import watchdog
from gintrain.runner.training import assembly
from gintrain.runner.training import config as config_lib
from gintrain.runner.training import goodput
from gintrain.runner.training import init_from as init_from_lib
from gintrain.runner.training import memory
from gintrain.runner.training import resume_guard
from gintrain.runner.training import steps

__all__ = ['TrainResult', 'Trainer', 'train', 'Preempted', 'METRICS_PLOT']

METRICS_PLOT = workdir_lib.METRICS_PLOT
METRICS_FILE = workdir_lib.METRICS_FILE
Preempted = preempt.Preempted


@dataclasses.dataclass
class TrainResult:
  """What a run ends with (host values).

  Attributes:
    state: the final train state (numpy leaves).
    step: the number of steps done (resumed ones included).
    train_metrics: the last train record.
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


_WATCHED = ('loss', 'grad_norm')


@jax.jit
def _all_finite(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _diverged(step, name, value, ckpt):
  latest = ckpt.latest_step()
  kept = (f'the last finite checkpoint, step {latest}, is kept' if latest
          is not None else 'no checkpoint was written')
  raise RunnerError(
      f'training diverged at step {step}: {name}={value}; {kept}. Lower the'
      ' learning rate (or clip gradients) and resume.')


def _check_finite(record, step, ckpt):
  """Stops the run (RunnerError) if a watched train metric is not finite."""
  for name in _WATCHED:
    if name in record and not np.isfinite(record[name]):
      _diverged(step, name, record[name], ckpt)


class _Rates:
  """Steps/s and examples/s between fetches, with the first (compiling)
  step and the time spent in ``excluded()`` (evaluation) kept out."""

  def __init__(self, start: int, batch_size: int,
               excluded: Callable[[], float], tokens_per_example=None):
    self.batch_size, self.excluded = batch_size, excluded
    self.tokens_per_example = tokens_per_example
    self.tick, self.tick_step = time.perf_counter(), start
    self.tick_excluded = excluded()
    self.started = False

  def after_first_step(self, step, sums):
    """Waits for the first (compiling) step and restarts the clock."""
    jax.block_until_ready(sums)
    self.tick, self.tick_step = time.perf_counter(), step
    self.tick_excluded = self.excluded()
    self.started = True

  def means(self, step, host_sums, since):
    now, excluded = time.perf_counter(), self.excluded()
    out = {k: float(v) / max(step - since, 1) for k, v in host_sums.items()}
    steps_done = step - self.tick_step
    seconds = now - self.tick - (excluded - self.tick_excluded)
    self.tick_excluded = excluded
    if steps_done > 0:
      rate = steps_done / max(seconds, 1e-9)
      out['steps_per_sec'] = rate
      out['examples_per_sec'] = rate * self.batch_size
      if self.tokens_per_example:
        out['tokens_per_sec'] = (rate * self.batch_size *
                                 self.tokens_per_example)
    self.tick, self.tick_step = now, step
    return out


class Trainer:
  """Runs a built ``assembly.Run`` in ``workdir`` (see the module doc)."""

  def __init__(self, run: assembly.Run, workdir: str, resume: str = 'auto',
               init_from: str | None = None, settings=None,
               hooks: Sequence[Callable[[int], None]] = (),
               files: dict | None = None):
    self.run, self.workdir = run, workdir
    self.resume_mode, self.init_from = resume, init_from
    self.settings, self.hooks = settings, hooks
    self.files = dict(files or {})
    self.main = distributed.is_main_process()
    self.dstate = None  # the placed train state, while training
    # Set by fit(): the actions (in order) and the built-in ones the loop
    # reads; the compiled steps; the checkpoint writes seen so far.
    self.actions: list = []
    self.report = self.eval_action = self.early = self.best = None
    self.save = self.guard = None
    self._steps: dict = {}
    self.eval_step = None
    self._saves = 0

  # -- pieces -------------------------------------------------------------

  def _writer(self):
    """The run's writers, made once the resume check passed (nothing in
    the workdir is written before)."""
    if not self.main:
      return writers_lib.NullWriter()
    factories = self.run.config.writers
    if factories is None:
      factories = (writers_lib.JsonlWriter, writers_lib.TensorBoardWriter)
    return writers_lib.OpenLater(lambda: writers_lib.MultiWriter(
        [f(self.workdir) for f in factories]))

  def snapshot(self, step: int) -> dict:
    """The checkpoint tree at ``step``.

    Raises:
      RunnerError: the parameters are not finite (nothing is saved).
    """
    if not bool(_all_finite(self.dstate.params)):
      _diverged(step, 'params', float('nan'), self.save.checkpointer)
    # The placed arrays themselves where the partitioner allows it: the
    # background writer reads them while the next (non-donating) step runs.
    tree = {'state': self.run.partitioner.snapshot(self.dstate),
            'data': self.run.source.get_state()}
    for action in self.actions:
      if actions_base.is_stateful(action):
        tree[action.checkpoint_key] = action.get_state()
    return tree

  def evaluate(self, dstate) -> dict:
    """Means of the task's eval metrics over the source's eval batches."""
    return assembly.evaluate(self.run, self.eval_step, dstate)

  def _step_fn(self, norms: bool, donate: bool):
    """The compiled train step variant, compiled on first use."""
    key = (norms, donate)
    if key not in self._steps:
      run, cfg = self.run, self.run.config
      p = run.partitioner
      self._steps[key] = p.compile_train(
          steps.make_train_step(run.task, cfg.seed, p.axis_name, norms=norms,
                                microbatches=cfg.microbatches),
          donate=donate)
    return self._steps[key]

  def _actions(self, writer, ckpt):
    cfg, run = self.run.config, self.run
    self.report = report.ReportTrain(writer, run.total, self.main)
    self.eval_action = evaluation.Evaluate(self.evaluate, writer,
                                           run.eval_every, self.main)
    actions = [self.report]
    guard = spike_guard.policy_of(cfg.spike_guard)  # issue 22
    self.guard = guard and spike_guard.SpikeGuard(
        guard, ckpt, lambda: jax.eval_shape(assembly.state_maker(run)),
        lambda s: setattr(self, 'dstate', s), writer, self.main)
    actions += [self.guard] if self.guard else []
    actions.append(goodput_action.GoodputReport(
        writer, lambda: goodput.CLOCK.record(), self.main))
    actions += [actions_base.Callback(lambda s, _st, _m, h=h: h(s))
                for h in self.hooks]
    actions.append(self.eval_action)
    self.early = (early_stop.EarlyStop(cfg.early_stopping, self.main)
                  if cfg.early_stopping else None)
    if self.early:
      actions.append(self.early)
    self.best = None
    if run.policy.best_metric:
      self.best = keep_best.KeepBest(ckpt, self.snapshot,
                                     run.policy.best_metric,
                                     run.policy.best_mode,
                                     run.policy.keep_best, self.main)
      actions.append(self.best)
    actions += [actions_base.as_action(a) for a in cfg.actions]
    if cfg.profile_steps:
      actions.append(profiler.Profile(self.workdir, *cfg.profile_steps))
    self.save = (spike_guard.GuardedSave(self.guard, ckpt, self.snapshot,
                                         run.policy.every_steps)
                 if self.guard else checkpoint_action.SaveCheckpoint(
                     ckpt, self.snapshot, run.policy.every_steps))
    actions.append(self.save)
    actions.append(preempt.CheckPreemption(self.save.save, ckpt.wait))
    return actions

  # -- resume -------------------------------------------------------------

  def _resume_or_start(self, ckpt, make):
    """``(placed state, start step, resumed)`` as ``--resume`` says; the
    fresh state is built by ``make`` where the partitioner places it."""
    p = self.run.partitioner
    latest = ckpt.latest_step()
    if self.resume_mode == 'require' and latest is None:
      raise RunnerError(f'--resume=require but {ckpt.dir} holds no'
                        f' checkpoint ({ckpt.policy.prefix}<step>).')
    if self.resume_mode == 'never' and latest is not None:
      raise RunnerError(
          f'--resume=never but {ckpt.dir} already holds checkpoints (latest'
          f' step {latest}); use --resume=auto to continue that run, or a new'
          ' --workdir.')
    if latest is not None:  # changed model/optimizer/data: refused
      resume_guard.check(self.workdir, self.settings)
    if latest is None:
      if self.init_from:
        state = jax.device_get(jax.jit(make)())
        state = state.replace(params=init_from_lib.load_params(
            self.init_from, state.params))
        if self.main:
          logging.info('Initialised params from %s.', self.init_from)
        return p.put_state(state), 0, False
      return p.create_state(make), 0, False
    state, raw = checkpoints.restore_state(
        ckpt.path(latest), jax.eval_shape(make), p, ckpt.read(latest), latest)
    step = int(np.asarray(state.step))
    data = raw.get('data') or {}
    if 'step' in data and int(data['step']) != step:
      raise RunnerError(f'{ckpt.path(latest)}: data position {data["step"]}'
                        f' differs from the train state step {step}.')
    try:
      self.run.source.set_state(data)
    except (KeyError, ValueError) as e:
      raise RunnerError(f'{ckpt.path(latest)}: cannot restore the data'
                        f' position of {self.run.source.name}: {e}') from e
    for action in self.actions:
      if actions_base.is_stateful(action):
        action.set_state(raw.get(action.checkpoint_key))
    if self.best:
      self.best.after_restore(step)
    if self.main:
      logging.info('Resumed from %s (step %d).', ckpt.path(latest), step)
      if self.init_from:
        logging.info('--init_from=%s ignored: the run resumes.',
                     self.init_from)
    return state, step, True

  def _record_settings(self, writer, resumed):
    """Saves the settings, writes them as hparams, warns on resume changes."""
    flat = settings_lib.flatten(self.settings)
    if resumed:
      try:
        previous = settings_lib.load(self.workdir)
      except (OSError, ValueError) as e:
        logging.warning('Cannot read the previous %s: %s',
                        settings_lib.SETTINGS_FILE, e)
        previous = None
      diff = settings_lib.changes(previous, flat) if previous else []
      if diff:
        logging.warning('Resuming with changed settings (%d): %s', len(diff),
                        '; '.join(diff))
    settings_lib.save(self.workdir, self.settings)
    writer.write_hparams(flat, [f'eval/{m}' for m in self.run.eval_metrics])

  # -- the loop -----------------------------------------------------------

  def fit(self) -> TrainResult:
    """Trains to the last step; see the module doc.

    Raises:
      RunnerError: a checkpoint that does not fit, a bad resume mode.
      Preempted: after saving, when a preemption signal arrived.
    """
    run = self.run
    ckpt = checkpoints.Checkpointer(self.workdir, run.policy)
    writer = self._writer()
    self.actions = []
    try:
      self.actions = self._actions(writer, ckpt)
      memory.check(run, assembly.state_maker(run), None if self.settings is None else
                   settings_lib.flatten(self.settings).get(
                       'flags.memory_budget'))  # before any checkpoint I/O
      dstate, start, resumed = self._resume_or_start(ckpt, assembly.state_maker(run))
      # The resume check passed: now the workdir may be written.
      if self.main:
        for name, text in self.files.items():
          workdir_lib.write_text(self.workdir, name, text)
        writer.open()
        if self.settings is not None:
          self._record_settings(writer, resumed)
      result = self._loop(dstate, start)
    finally:
      try:
        for action in self.actions:
          action.close()
        ckpt.close()
      finally:
        try:
          run.source.close()
        finally:
          writer.close()
    if self.main:
      plots.plot_metrics(workdir_lib.path(self.workdir, METRICS_FILE),
                         workdir_lib.path(self.workdir, METRICS_PLOT))
    return result

  def _loop(self, dstate, start) -> TrainResult:
    run, cfg = self.run, self.run.config
    p = run.partitioner
    # Train step variants: with the gradient and parameter norms (log
    # steps only: they cost 10-20% of a small model's step), and without
    # donating the state (the step after a checkpoint, whose writer may
    # still read the arrays).
    self._steps = {}
    self.eval_step = p.compile_eval(steps.make_eval_step(run.task,
                                                         p.axis_name))
    self.dstate = dstate
    zero = p.put_state({k: np.zeros((), np.float32)
                        for k in run.train_metrics})
    sums, since = zero, start
    rates = _Rates(start, cfg.batch_size, lambda: self.eval_action.seconds,
                   run.source.info.get('tokens_per_example'))
    if self.main:
      logging.info('Training %s (%s) on %s: steps %d..%d of %d, batch %d,'
                   ' parallelism %s on %d device(s).', run.task.caller.name,
                   run.task.name, run.source.name, start + 1, run.total,
                   run.total, cfg.batch_size, p.name, jax.device_count())
    for action in self.actions:
      action.bind(run, self.workdir)
      action.on_start(start)
    ckpt_saves = lambda: self.save.checkpointer.saves  # pylint: disable=unnecessary-lambda-assignment
    self._saves = ckpt_saves()
    step = start
    clock = goodput.CLOCK
    clock.begin_loop(step)
    stop = bool(self.early and self.early.should_stop)
    if step >= run.total or stop:
      self._run_actions(step, {}, last=True)
    while step < run.total and not stop:
      with clock.span('input'):
        batch = p.put_batch(run.source.next_batch())
      last = step + 1 == run.total
      log = (step + 1) % cfg.log_every == 0 or last
      out = self._step_fn(log, donate=self._saves == ckpt_saves())(
          self.dstate, sums, batch)
      self._saves = ckpt_saves()
      if log:
        self.dstate, sums, norms = out
      else:
        self.dstate, sums = out
      step += 1
      watchdog.beat(step)  # no host sync: see runner.parallel.watchdog
      if not rates.started:
        rates.after_first_step(step, sums)
        clock.first_step()
      metrics = {}
      if log:
        record = rates.means(step, p.get(sums), since)  # waits for the step
        record.update({k: float(v) for k, v in p.get(norms).items()})
        if not self.guard:  # the guard rolls non-finite values back
          _check_finite(record, step, self.save.checkpointer)
        if run.learning_rate is not None:
          record['learning_rate'] = float(run.learning_rate(step - 1))
        metrics['train'] = record
        sums, since = zero, step
      stop = self._run_actions(step, metrics, last)
    clock.end_loop()
    self.report.write()
    with clock.span('checkpoint'):
      self.save.save(step)
      self.save.checkpointer.wait()
    return TrainResult(p.result(self.dstate), step, self.report.last,
                       self.eval_action.last, bool(self.early and
                                                   self.early.should_stop),
                       list(self.best.best) if self.best else [])

  def _run_actions(self, step, metrics, last) -> bool:
    """Runs the due actions; when one asks to stop, the ones before it that
    are due at the end (e.g. the final eval) run too. Returns the stop."""
    stop, ran = False, set()
    for i, action in enumerate(self.actions):
      if action.due(step, last or stop):
        ran.add(i)
        with goodput.CLOCK.span(goodput.part_of(action)):
          stop = bool(action(step, self.dstate, metrics)) or stop
    if stop and not last:
      for i, action in enumerate(self.actions):
        if i not in ran and action.due(step, True):
          action(step, self.dstate, metrics)
    return stop


def train(config: config_lib.TrainConfig, workdir: str, resume: str = 'auto',
          init_from: str | None = None, settings=None,
          hooks: Sequence[Callable[[int], None]] = (),
          files: dict | None = None) -> TrainResult:
  """Builds the run of ``config`` and trains it in ``workdir``.

  Args:
    config: the checked settings (gin's ``train``).
    workdir: the run directory (from ``--workdir``).
    resume: ``'auto'``, ``'never'`` or ``'require'`` (from ``--resume``).
    init_from: a checkpoint whose params start a fresh run.
    settings: the run's FrozenConfigDict (``runner.outputs.settings``),
      saved and written as hparams.
    hooks: called as ``hook(step)`` after every step (at a log step, after
      the metrics fetch, so the device has no work pending then).
    files: ``{name: text}`` written into the workdir by process 0 once the
      resume check passed (the run's config files).
  """
  if not workdir:
    raise RunnerError('train needs a workdir (--workdir).')
  goodput.reset()
  workdir = workdir_lib.prepare(workdir)  # created and probed, once
  lock = lock_lib.WorkdirLock(workdir)
  if distributed.is_main_process():
    lock.acquire()  # a second run on this workdir stops here, at once
  try:
    return Trainer(assembly.build(config), workdir, resume, init_from, settings,
                   hooks, files).fit()
  finally:
    lock.release()
