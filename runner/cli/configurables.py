"""Registers the runner's building blocks with gin (t5x style).

``lib/`` and the runner's modules stay free of gin: each function is wrapped
here, at registration time, with ``gin.external_configurable``. The wrapped
versions are what gin's ``@name`` references resolve to; the module
attributes below (``configurables.train`` ...) are those wrappers, so calling
them applies the bindings.

Names (the module part may be dropped where the name is unique, e.g.
``@mlp()`` for ``@models.mlp()``):

==========================  ===============================================
``runner.train``            the loop (``runner.loop.train``)
``runner.checkpoint_policy``  ``runner.checkpointing.CheckpointPolicy``
``runner.early_stopping``   ``runner.state.early_stopping``
``runner.create_train_state``  ``runner.state.create_train_state``
``models.mlp/cnn``          ``runner.models``
``datasets.digits/synthetic``  ``runner.datasets``
``losses.cross_entropy_loss/accuracy``  ``runner.losses``
``optimizers.optimizer``    ``runner.optimizers.optimizer`` (any optax
                            optimizer by name, clipping, weight decay)
``schedules.constant/stepped/cosine``  ``lib.lr_schedule`` (epochs)
``optax.<schedule>``        optax schedules (steps)
``optax.<optimizer>``       optax optimizers, e.g. ``@optax.sgd()``
==========================  ===============================================

A user's own model or dataset: any function returning an object with
``init``/``apply`` (a model) or ``x_train``/``y_train``/``x_test``/``y_test``
(a dataset). Decorate it with ``@gin.configurable`` in your module and
import the module from gin (``import my_module`` in a gin file, or
``--gin_bindings='import my_module'``); then
``--gin.train.model=@my_module.my_model`` (a factory, called by the loop) or
``=@my_module.my_model()`` (called by gin).
"""

import gin
import optax

from gintrain.runner import checkpointing
from gintrain.runner import datasets
from gintrain.runner import loop
from gintrain.runner import losses
from gintrain.runner import models
from gintrain.runner import optimizers
from gintrain.runner import schedules
from gintrain.runner import state

__all__ = ['train', 'OPTAX_SCHEDULES', 'OPTAX_OPTIMIZERS']

# Arguments the runner itself passes (from flags); not bindable.
_TRAIN_CALLER_ARGS = ['workdir', 'resume', 'init_from', 'settings', 'hooks',
                      'dry_run']

OPTAX_SCHEDULES = ('constant_schedule', 'linear_schedule',
                   'cosine_decay_schedule', 'warmup_cosine_decay_schedule',
                   'warmup_constant_schedule', 'exponential_decay',
                   'warmup_exponential_decay_schedule',
                   'piecewise_constant_schedule', 'polynomial_schedule',
                   'cosine_onecycle_schedule', 'linear_onecycle_schedule',
                   'sgdr_schedule', 'join_schedules')
OPTAX_OPTIMIZERS = ('sgd', 'adam', 'adamw', 'nadam', 'rmsprop', 'adagrad',
                    'adafactor', 'lamb', 'lion', 'adabelief')


def _register(fn, name, module, denylist=None):
  return gin.external_configurable(fn, name=name, module=module,
                                   denylist=denylist)


train = _register(loop.train, 'train', 'runner', denylist=_TRAIN_CALLER_ARGS)
_register(checkpointing.CheckpointPolicy, 'checkpoint_policy', 'runner')
_register(state.early_stopping, 'early_stopping', 'runner')
_register(state.create_train_state, 'create_train_state', 'runner',
          denylist=['model', 'tx', 'rng', 'sample_input'])

for _name in ('mlp', 'cnn'):
  _register(getattr(models, _name), _name, 'models')
for _name in ('digits', 'synthetic'):
  _register(getattr(datasets, _name), _name, 'datasets')
for _name in ('cross_entropy_loss', 'accuracy'):
  _register(getattr(losses, _name), _name, 'losses')

_register(optimizers.optimizer, 'optimizer', 'optimizers')
for _name in ('constant', 'stepped', 'cosine'):
  _register(getattr(schedules, _name), _name, 'schedules')
for _name in OPTAX_SCHEDULES + OPTAX_OPTIMIZERS:
  if hasattr(optax, _name):
    _register(getattr(optax, _name), _name, 'optax')
