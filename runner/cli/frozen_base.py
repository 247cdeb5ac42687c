"""The frozen base of a ``train.trainable`` run, rebuilt outside training.

A checkpoint of such a run holds the trainable parameters and ``base_hash``
(``runner.training.frozen``). ``gintrain sample``, ``ckpt convert --to=hf``
and ``gintrain eval`` rebuild the base as the run built it (the seed's
initialisation, then the ``--init_from`` its ``settings.json`` records,
with the parsed gin's ``runner.init_from`` rules) and check its hash.
"""

import jax

from gintrain.lib import serialization
from gintrain.runner.cli import configurables
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import settings as settings_lib
from gintrain.runner.training import assembly
from gintrain.runner.training import frozen
from gintrain.runner.training import init_from as init_from_lib

__all__ = ['base_state', 'full_params']


def _recorded_init_from(workdir: str):
  """The ``--init_from`` the run in ``workdir`` started from (its
  ``settings.json``, or the parsed gin's ``init_from.path``), with the
  parsed gin's ``runner.init_from`` rules; None when it had none."""
  rules = configurables.init_from()
  path = (settings_lib.load(workdir) or {}).get('flags.init_from') or (
      rules.pop('path'))
  rules.pop('path', None)
  if not path:
    return None
  if all(rules[k] == configurables.INIT_FROM_DEFAULTS[k] for k in rules):
    return path
  return init_from_lib.InitFrom(path, **rules)


def base_state(run, workdir: str, path: str):
  """The fresh train state (host arrays) of the built ``run`` with its base
  as the run in ``workdir`` built it (the seed's initialisation, then its
  ``--init_from``): a restore target for its checkpoint ``path``.

  Raises:
    RunnerError: the base cannot be read (one line naming ``path``).
  """
  state = jax.device_get(jax.jit(assembly.state_maker(run))())
  base = _recorded_init_from(workdir)
  if base is not None:
    try:
      params = init_from_lib.load_params(base, state.params)
    except RunnerError as e:
      raise RunnerError(f'{path} holds only the trainable parameters; its'
                        f' base cannot be read: {e}') from None
    state = frozen.rehash(state.replace(params=params))
  return state


def full_params(cfg, workdir: str, path: str, partial: dict) -> dict:
  """The whole parameters of the run ``workdir`` (gin already parsed, its
  ``TrainConfig`` ``cfg`` with ``trainable``) at its checkpoint ``path``,
  whose ``partial`` params hold only the trainable ones: the base rebuilt
  by :func:`base_state` and checked against the checkpoint's
  ``base_hash``.

  Raises:
    RunnerError: the base is missing or differs (one line).
  """
  state = base_state(assembly.build(cfg), workdir, path)
  raw = checkpoints.read_runner_checkpoint(path).get('state', {})
  if 'base_hash' not in raw:
    raise RunnerError(f'{path} has no base_hash: not a checkpoint of a run'
                      ' with train.trainable.')
  frozen.check_base(raw['base_hash'], state.base_hash, path)
  return frozen.merge_params(serialization.to_state_dict(state.params),
                             partial)
