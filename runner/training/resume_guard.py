"""The resume guard: a run resumes only with the model, optimizer and data
it was checkpointed with.

On resume the trainer compares the run's settings (``runner.outputs.
settings``) with the ``settings.json`` the previous launch saved. Changes
to how long the run goes, how it logs, evaluates, checkpoints and is laid
out on the devices are free (logged as a warning, as before), and so are
the parameters of any Action or MetricWriter, the user's own included; any other
change of a gin binding (the model and its shapes, the optimizer and its
schedule, the data source, batch size, seeds, the task, gin macros) is
refused with one line listing the changes, before anything in the workdir
is written or deleted, unless ``--allow_config_change``.

    >>> fixed_changes({'gin.train.num_steps': 10, 'gin.mlp.features': [8]},
    ...               {'gin.train.num_steps': 20, 'gin.mlp.features': [16]})
    ['gin.mlp.features: [8] -> [16]']
"""

import inspect
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
import gin

from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import settings as settings_lib

__all__ = ['FREE', 'is_free', 'fixed_changes', 'check']

# Settings (flattened names, regular expressions) that may change on
# resume. Everything else under 'gin.' is fixed.
FREE = tuple(re.compile(p) for p in (
    r'^flags\.', r'^versions\.', r'^devices\.',
    # how long, how often, where written
    r'^gin\.(runner\.)?train\.(num_steps|num_epochs|log_every|eval_every|'
    r'eval_batch_size|writers|actions|profile_steps|early_stopping|'
    r'checkpoint|parallelism|microbatches|spike_guard)$',
    # configurables that only log, evaluate, checkpoint, lay out or guard
    r'^gin\.([\w.]+\.)?(checkpoint_policy|early_stopping|jsonl|'
    r'tensorboard|wandb|write_samples|callback|partitioner|spike_guard)\.',
    r'^gin\.writers\.', r'^gin\.actions\.',
))


def _observer_binding(key: str) -> bool:
  """Whether ``key`` (``gin.<configurable>.<parameter>``) binds a parameter
  of an Action or a MetricWriter, the user's own included: they observe
  the run (log, evaluate, checkpoint, inject a fault in a test) and do not
  change what it computes; or of a configurable this launch does not know."""
  if not key.startswith('gin.') or key.count('.') < 2:
    return False
  name = key[len('gin.'):].rsplit('.', 1)[0].rsplit('/', 1)[-1]
  try:
    target = inspect.unwrap(gin.get_configurable(name))
  except (ValueError, KeyError, TypeError):
    # Not registered in this launch (its module is no longer imported): it
    # takes no part in this run; a model or data change shows in the
    # fixed train.* bindings that would have to name something else.
    return True
  from gintrain.runner.actions import base as actions_base  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import writers  # pylint: disable=g-import-not-at-top
  return inspect.isclass(target) and issubclass(
      target, (actions_base.Action, writers.MetricWriter))


def is_free(key: str) -> bool:
  """Whether the flattened setting ``key`` may change on resume."""
  return any(p.search(key) for p in FREE) or _observer_binding(key)


def fixed_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                  ) -> list[str]:
  """``'key: old -> new'`` of the changed settings that are not free."""
  return [c for c in settings_lib.changes(old, new)
          if not is_free(c.split(': ', 1)[0])]


def check(workdir: str, settings, allow: bool | None = None) -> None:
  """Refuses to resume in ``workdir`` with changed fixed settings.

  Args:
    workdir: the run directory (its ``settings.json`` is the reference; a
      workdir without one passes).
    settings: this launch's settings (FrozenConfigDict; None: no check).
    allow: ``--allow_config_change`` (default: the flag's value recorded
      in ``settings``).

  Raises:
    RunnerError: one line listing the changes and the ways out.
  """
  if settings is None:
    return
  new = settings_lib.flatten(settings)
  if allow is None:
    allow = bool(new.get('flags.allow_config_change'))
  try:
    old = settings_lib.load(workdir)
  except (OSError, ValueError) as e:
    logging.warning('Cannot read the previous %s (%s): the resume guard'
                    ' does not check this resume.', settings_lib.SETTINGS_FILE,
                    e)
    return
  if not old:
    return
  fixed = fixed_changes(old, new)
  if not fixed:
    return
  if allow:
    logging.warning('Resuming with %d changed binding(s) that alter the'
                    ' model, optimizer or data (--allow_config_change): %s',
                    len(fixed), '; '.join(fixed))
    return
  raise RunnerError(
      f'{workdir} was checkpointed with other model/optimizer/data settings;'
      f' changed: {"; ".join(fixed)}. Resume with the original bindings, use'
      ' a new --workdir, or pass --allow_config_change.')
