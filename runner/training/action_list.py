"""The run's default actions, built in one place, and their replacement.

:func:`default_actions` lists what the loop runs after each step (see
``runner.actions.base`` for the protocol); ``train.replace_actions`` swaps
any built-in one for a user's action, named as below.
"""

from collections.abc import Callable, Sequence
from typing import Any

from gintrain.runner.actions import base
from gintrain.runner.actions import checkpoint
from gintrain.runner.actions import early_stop
from gintrain.runner.actions import evaluation
from gintrain.runner.actions import finite
from gintrain.runner.actions import goodput as goodput_action
from gintrain.runner.actions import keep_best
from gintrain.runner.actions import plot
from gintrain.runner.actions import preempt
from gintrain.runner.actions import profiler
from gintrain.runner.actions import report
from gintrain.runner.actions import spike_guard
from gintrain.runner.errors import RunnerError
from gintrain.runner.training import goodput

__all__ = ['default_actions', 'replace', 'hook_actions']


def default_actions(run, workdir: str, writer, checkpointer,
                    snapshot: Callable[[int], Any],
                    evaluate: Callable[[Any], dict],
                    install: Callable[[Any], None], main: bool,
                    shapes: Callable[[], Any],
                    extra: Sequence[base.Action] = ()) -> list:
  """The actions of ``run``, in the order they run after each step.

  The ordering rule: an action comes after every action whose output it
  reads and before every action that saves what it changes.

  1. ``finite_check`` (or ``spike_guard`` when ``train.spike_guard`` is on:
     it rolls a spiked step back instead), then ``report``: nothing later
     sees a diverged or spiked state;
  2. ``goodput``, then ``extra`` (``train(hooks=...)`` as actions);
  3. ``eval``, then what reads its ``metrics['eval']``: ``early_stopping``,
     ``keep_best``;
  4. the user's ``train.actions``, then ``profiler``;
  5. ``checkpoint``, after everything that changes a checkpointed state at
     this step (so the checkpoint holds it), then ``preemption`` (which
     saves through it);
  6. ``plot``, last: it draws the metrics after every other action's
     end-of-run records are written.

  At the end of the run the ``end_first`` actions (``finite_check``,
  ``spike_guard``, ``checkpoint``) end before the others, so the final
  checkpoint is written before the final evaluation and samples (and
  written again after them if they changed a checkpointed action's state,
  ``after_end``). Finally
  ``train.replace_actions`` puts each named action's replacement in its
  place (:func:`replace`).
  """
  cfg = run.config
  policy = spike_guard.policy_of(cfg.spike_guard)
  guard = policy and spike_guard.SpikeGuard(
      policy, checkpointer, shapes, install, writer, main)
  save = (spike_guard.GuardedSave(guard, checkpointer, snapshot,
                                  run.policy.every_steps, writer, main)
          if guard else
          checkpoint.SaveCheckpoint(checkpointer, snapshot,
                                    run.policy.every_steps, writer, main))
  actions = [guard or finite.CheckFinite(checkpointer),
             report.ReportTrain(writer, run.total, main),
             goodput_action.GoodputReport(writer, goodput.CLOCK.record, main),
             *extra,
             evaluation.Evaluate(evaluate, writer, run.eval_every, main)]
  if cfg.early_stopping:
    actions.append(early_stop.EarlyStop(cfg.early_stopping, main))
  if run.policy.best_metric:
    actions.append(keep_best.KeepBest(
        checkpointer, snapshot, run.policy.best_metric, run.policy.best_mode,
        run.policy.keep_best, main))
  actions += [base.as_action(a) for a in cfg.actions]
  if cfg.profile_steps:
    actions.append(profiler.Profile(workdir, *cfg.profile_steps))
  actions += [save, preempt.CheckPreemption(save.save, checkpointer.wait),
              plot.PlotMetrics(writer, main)]
  return replace(actions, cfg.replace_actions or {})


def replace(actions: list, replacements: dict) -> list:
  """``actions`` with each one whose ``name`` is a key of ``replacements``
  replaced by ``replacements[name](action)`` (an action, or a callable of
  ``(step, state, metrics)``), in its place.

  Raises:
    RunnerError: a name that no action of the run has.
  """
  names = [getattr(a, 'name', None) for a in actions]
  unknown = sorted(set(replacements) - set(names))
  if unknown:
    raise RunnerError(
        f'train.replace_actions: no action named {unknown[0]!r} in this run;'
        f' its actions: {", ".join(n for n in names if n)}.')
  return [base.as_action(replacements[n](a)) if n in replacements else a
          for n, a in zip(names, actions)]


def hook_actions(hooks: Sequence[Callable[[int], Any]]) -> list:
  """``train(hooks=...)`` as actions (:class:`base.StepHook`); an action
  among them is kept as it is (e.g. ``runner.actions.once.Once``)."""
  return [h if isinstance(h, base.Action) else base.StepHook(h)
          for h in hooks]
