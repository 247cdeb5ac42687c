"""The Action interface: periodic side effects of the training loop.

After every step the loop calls each action that is due, in order::

    for action in actions:
      if action.records_only and not metrics:
        continue  # nothing recorded at this step for it to read
      if action.due(step, last):
        stop = action(step, state, metrics) or stop

* ``step``: steps completed so far (the state's step counter);
* ``state``: the train state as placed on the devices (read it; fetch what
  you need with ``jax.device_get``);
* ``metrics``: a dict shared by the actions of this step. At a log step it
  holds ``metrics['train']`` (the means since the last log step, the
  learning rate and the rates); after an evaluation ``metrics['eval']``.
  Actions may add entries for the ones after them.
* ``last``: whether this is the run's final step (or training stops after
  it); a true return value from an action asks the loop to stop after this
  step (``last`` is then true for the actions after it).

After the final step (the run's last, or the step an action stopped it
at) the loop calls ``action.end(step, state, metrics)`` once on each
action instead (by default: ``action(step, state, metrics)`` if
``action.due(step, True)``), first the ones with ``end_first`` (the spike
guard, the finite check and the checkpoint: the final checkpoint is written
and waited for before a final evaluation or sampling that could hang), then
the others in order; then ``action.after_end(...)`` on each (the checkpoint
is saved again there if a final evaluation changed a checkpointed action's
state, so it holds the run's final state). The actions publish what the run's result needs in
that ``metrics``: ``metrics['eval']`` (the last evaluation),
``metrics['stop_reason']`` (e.g. ``'early_stopping'``) and
``metrics['best']`` (``[(step, value)]`` of the kept-best checkpoints).

Each built-in action has a ``name`` (``'eval'``, ``'checkpoint'``, ...);
``train.replace_actions = {'eval': @my_module.MyEval}`` replaces it with
``MyEval(built_in)`` (see ``runner.training.action_list``).

An action that must survive a restart also has ``checkpoint_key`` (a
string), ``get_state()`` and ``set_state(state)``: its state is saved in
every checkpoint under that key and restored on resume.

A new action in a few lines (bound with ``train.actions = [@my_module.PrintLoss()]``)::

    import gin
    from gintrain.runner.actions import base

    @gin.configurable
    class PrintLoss(base.PeriodicAction):
      def __init__(self, every_steps=100):
        super().__init__(every_steps)
      def __call__(self, step, state, metrics):
        if 'train' in metrics:
          print(step, metrics['train']['loss'])
"""

import abc
from collections.abc import Callable
from typing import Any

from gintrain.runner import validation

__all__ = ['Action', 'PeriodicAction', 'Callback', 'StepHook', 'as_action',
           'is_stateful']


class Action(abc.ABC):
  """Something the loop does after a step (see the module doc)."""

  name: str | None = None  # built-ins: what train.replace_actions calls it
  end_first = False  # ended before the others (see the module doc)
  # True: only reads this step's records; the loop skips it (without
  # calling ``due``) after a step whose ``metrics`` is still empty.
  records_only = False

  def due(self, step: int, last: bool) -> bool:
    """Whether to run after ``step``; every step by default."""
    del step, last
    return True

  def bind(self, run: Any, workdir: str) -> None:
    """Called once before training with the built run
    (``runner.training.assembly.Run``: model, task, data source, ...) and the
    workdir, for actions that need them."""

  def on_start(self, step: int) -> bool | None:
    """Called once before the first step (``step``: where the run starts);
    a true result stops the run at once (e.g. early stopping restored as
    stopped): only the end-of-run calls follow."""

  @abc.abstractmethod
  def __call__(self, step: int, state: Any, metrics: dict) -> bool | None:
    """Does the work; a true result stops training after this step."""

  def end(self, step: int, state: Any, metrics: dict) -> None:
    """Called once after the final step (see the module doc); by default
    the action runs if it is due at the end."""
    if self.due(step, True):
      self(step, state, metrics)

  def after_end(self, step: int, state: Any, metrics: dict) -> None:
    """Called once after every action's ``end`` (e.g. the checkpoint
    saved again if a final evaluation changed a checkpointed state)."""

  def close(self) -> None:
    """Called once when the run ends, also after an error."""


class PeriodicAction(Action):
  """An action due every ``every_steps`` steps and (``at_end``) at the end.

  Args:
    every_steps: the period in steps (None or 0: only at the end).
    at_end: also run after the final step.
  """

  def __init__(self, every_steps: int | None = None, at_end: bool = True):
    validation.check_int(f'{type(self).__name__}.every_steps', every_steps,
                         0, allow_none=True)
    self.every_steps = every_steps
    self.at_end = at_end

  def due(self, step: int, last: bool) -> bool:
    every = self.every_steps
    return bool(every and step % every == 0) or (last and self.at_end)


class Callback(Action):
  """Calls ``fn(step, state, metrics)`` after every step."""

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn

  def __call__(self, step, state, metrics):
    return self.fn(step, state, metrics)


class StepHook(Action):
  """Calls ``hook(step)`` after every step (``train(..., hooks=)``: at a
  log step after the metrics fetch, at the end after the final checkpoint).
  """

  def __init__(self, hook: Callable[[int], Any]):
    self.hook = hook

  def __call__(self, step, state, metrics):
    self.hook(step)


def as_action(obj: Any) -> Action:
  """``obj`` if it is an :class:`Action`, else a :class:`Callback` of it."""
  if isinstance(obj, Action):
    return obj
  if not callable(obj):
    raise TypeError(f'an action must be callable as (step, state, metrics),'
                    f' got {obj!r}.')
  return Callback(obj)


def is_stateful(action: Any) -> bool:
  """Whether ``action`` is checkpointed (``checkpoint_key``, ``get_state``,
  ``set_state``)."""
  return (isinstance(getattr(action, 'checkpoint_key', None), str) and
          callable(getattr(action, 'get_state', None)) and
          callable(getattr(action, 'set_state', None)))
