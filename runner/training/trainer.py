"""The trainer: the loop that steps a built run and runs its actions.

``runner.training.assembly`` builds and checks the run (:func:`train`
calls its ``build``); :func:`train` trains it:

1. the actions (``runner.training.action_list.default_actions``), then the
   train state: fresh, or resumed from ``<workdir>/checkpoints`` with the
   data position and each checkpointed action's state
   (``runner.training.start``);
2. for each step: this process's batch from the data source, the compiled
   step on the partitioner's devices; at log steps the train record
   (``metrics['train']``, ``runner.training.records``); then the actions
   that are due (``runner.actions.base`` has the protocol);
3. after the final step, each action's end-of-run call (the final
   checkpoint first, then the final eval, samples, report, ..., the
   metrics plot last); the result is read from what they put into the
   metrics.

The loop names no action: which actions run, and in which order, is
``action_list``'s business; ``train.replace_actions`` swaps any of them.

Multi-process: every process loads only its share of each global batch;
process 0 alone writes logs, metrics and files; all processes make the same
checkpoint and preemption calls in the same order.
"""

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging

from gintrain.runner import errors
from gintrain.runner.actions import base as actions_base
from gintrain.runner.actions import finite
from gintrain.runner.actions import preempt
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import lock as lock_lib
from gintrain.runner.outputs import settings as settings_lib
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.parallel import distributed
from gintrain.runner.parallel import watchdog
from gintrain.runner.training import action_list
from gintrain.runner.training import assembly
from gintrain.runner.training import config as config_lib
from gintrain.runner.training import goodput
from gintrain.runner.training import memory
from gintrain.runner.training import records
from gintrain.runner.training import start as start_lib
from gintrain.runner.training import steps

TrainResult = records.TrainResult

__all__ = ['TrainResult', 'Trainer', 'train', 'Preempted']

Preempted = preempt.Preempted
_RUNNING_AN_ACTION = errors.activity('running an action')
_READING_DATA = errors.activity('reading the data')


class Trainer:
  """Runs a built ``assembly.Run`` in ``workdir`` (see the module doc).

  ``actions``: more actions, after the goodput report (``train(hooks=)``
  as actions, ``action_list.hook_actions``)."""

  def __init__(self, run: assembly.Run, workdir: str, resume: str = 'auto',
               init_from: str | None = None, settings=None,
               actions: Sequence[actions_base.Action] = (),
               files: dict | None = None):
    self.run, self.workdir = run, workdir
    self.resume_mode, self.init_from = resume, init_from
    self.settings, self.extra = settings, list(actions)
    self.files = dict(files or {})
    self.main = distributed.is_main_process()
    self.dstate = None  # the placed train state, while training
    self.ckpt = checkpoints.Checkpointer(workdir, run.policy)
    self.actions: list = []  # made by fit()
    self._parts: list = []  # goodput.part_of each action (made by fit())
    self._steps: dict = {}   # compiled train step variants
    self.eval_step = None
    self.eval_seconds = 0.0  # spent evaluating (kept out of the rates)

  # -- pieces -------------------------------------------------------------

  def snapshot(self, step: int) -> dict:
    """The checkpoint tree at ``step``.

    Raises:
      RunnerError: the parameters are not finite (nothing is saved).
    """
    if not bool(finite.all_finite(self.dstate.params)):
      finite.diverged(step, 'params', float('nan'), self.ckpt)
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
    begin = time.perf_counter()
    try:
      return assembly.evaluate(self.run, self.eval_step, dstate)
    finally:
      self.eval_seconds += time.perf_counter() - begin

  def _install(self, dstate) -> None:
    self.dstate = dstate

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

  # -- the loop -----------------------------------------------------------

  def fit(self) -> TrainResult:
    """Trains to the last step; see the module doc.

    Raises:
      RunnerError: a checkpoint that does not fit, a bad resume mode.
      Preempted: after saving, when a preemption signal arrived.
    """
    run = self.run
    writer = start_lib.writer(self)
    try:
      make = assembly.state_maker(run)
      self.actions = action_list.default_actions(
          run, self.workdir, writer, self.ckpt, self.snapshot, self.evaluate,
          self._install, self.main, lambda: jax.eval_shape(make), self.extra)
      self._parts = [goodput.part_of(a) for a in self.actions]
      memory.check(run, make, None if self.settings is None else
                   settings_lib.flatten(self.settings).get(
                       'flags.memory_budget'))  # before any checkpoint I/O
      dstate, start, resumed = start_lib.resume_or_start(self, make)
      # The resume check passed: now the workdir may be written.
      if self.main:
        for name, text in self.files.items():
          workdir_lib.write_text(self.workdir, name, text)
        writer.open()
        if self.settings is not None:
          start_lib.record_settings(self, writer, resumed)
      result = self._loop(dstate, start)
    finally:
      start_lib.close(self, writer)
    return result

  def _start(self, dstate, start) -> bool:
    """Compiles the eval step, binds and starts the actions; whether one
    of them stops the run at once."""
    run, p = self.run, self.run.partitioner
    self._steps = {}
    self.eval_step = p.compile_eval(steps.make_eval_step(run.task,
                                                         p.axis_name))
    self.dstate = dstate
    if self.main:
      logging.info('Training %s (%s) on %s: steps %d..%d of %d, batch %d,'
                   ' parallelism %s on %d device(s).', run.task.caller.name,
                   run.task.name, run.source.name, start + 1, run.total,
                   run.total, run.config.batch_size, p.name,
                   jax.device_count())
    stop = False
    for action in self.actions:
      with _RUNNING_AN_ACTION:
        action.bind(run, self.workdir)
        stop = bool(action.on_start(start)) or stop
    return stop

  def _loop(self, dstate, start) -> TrainResult:
    run, cfg = self.run, self.run.config
    p = run.partitioner
    stop = self._start(dstate, start)
    zero = p.put_state({k: np.zeros((), np.float32)
                        for k in run.train_metrics})
    sums, since, step, metrics, ran, last_train = zero, start, start, {}, (), {}
    rates = records.Rates(start, cfg.batch_size, lambda: self.eval_seconds,
                   run.source.info.get('tokens_per_example'))
    saves = self.ckpt.saves
    clock = goodput.CLOCK
    clock.begin_loop(step)
    while step < run.total and not stop:
      try:
        with clock.span('input'):
          batch = p.put_batch(run.source.next_batch())
      except BaseException as e:  # free while nothing fails (a with is not)
        _READING_DATA.note(e)
        raise
      log = (step + 1) % cfg.log_every == 0 or step + 1 == run.total
      # Variants: with the gradient and parameter norms (log steps only),
      # and without donating the state (the step after a checkpoint, whose
      # writer may still read the arrays).
      out = self._step_fn(log, donate=saves == self.ckpt.saves)(
          self.dstate, sums, batch)
      saves = self.ckpt.saves
      self.dstate, sums = out[0], out[1]
      step += 1
      watchdog.beat(step)  # no host sync: see runner.parallel.watchdog
      if not rates.started:
        rates.after_first_step(step, sums)
        clock.first_step()
      metrics = {}
      if log:
        host_sums, norms = p.get((sums, out[2]))  # waits for the step
        metrics['train'] = last_train = records.train_record(
            run, rates.means(step, host_sums, since), norms, step,
            first=since == start)
        sums, since = zero, step
      stop, ran = (self._run_actions(step, metrics) if step < run.total
                   else (False, set()))
    clock.end_loop()
    self._end(step, metrics, ran)
    return TrainResult(p.result(self.dstate), step, last_train,
                       metrics.get('eval', {}),
                       metrics.get('stop_reason') == 'early_stopping',
                       list(metrics.get('best', [])))

  def _run_actions(self, step, metrics) -> tuple[bool, set]:
    """Runs the actions due after ``step``; ``(stop asked, ids of the
    actions that ran)``."""
    stop, ran = False, set()
    try:
      for action, part in zip(self.actions, self._parts):
        if action.records_only and not metrics:
          continue
        if action.due(step, False):
          ran.add(id(action))
          with goodput.CLOCK.span(part):
            stop = bool(action(step, self.dstate, metrics)) or stop
    except BaseException as e:  # free while nothing fails (a with is not)
      _RUNNING_AN_ACTION.note(e)
      raise
    return stop, ran

  def _end(self, step, metrics, ran) -> None:
    """The end-of-run calls (``Action.end``): the ``end_first`` actions,
    then the others, in order. When an action stopped the run after
    ``step``, one that ran then gets no default end call (an overriding
    ``end`` is always called)."""
    order = ([a for a in self.actions if a.end_first] +
             [a for a in self.actions if not a.end_first])
    for action in order:
      if id(action) in ran and type(action).end is actions_base.Action.end:
        continue
      with goodput.CLOCK.span(goodput.part_of(action)), _RUNNING_AN_ACTION:
        action.end(step, self.dstate, metrics)
    for action in self.actions:
      with goodput.CLOCK.span(goodput.part_of(action)), _RUNNING_AN_ACTION:
        action.after_end(step, self.dstate, metrics)


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
                   action_list.hook_actions(hooks), files).fit()
  finally:
    lock.release()
