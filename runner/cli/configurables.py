"""Registers the runner's building blocks with gin (t5x style).

``lib/`` and the runner's modules stay free of gin: each function is wrapped
here, at registration time, with ``gin.external_configurable``. The wrapped
versions are what gin's ``@name`` references resolve to;
``configurables.train()`` builds the checked ``TrainConfig`` from the
bindings.

Names (the module part may be dropped where the name is unique, e.g.
``@mlp()`` for ``@models.mlp()``):

==========================  ===============================================
``runner.train``            the run's settings (``training.config.TrainConfig``)
``runner.checkpoint_policy``  ``outputs.checkpoints.CheckpointPolicy``
``runner.early_stopping``   ``training.state.early_stopping``
``runner.spike_guard``      ``actions.spike_guard.spike_guard`` (``train.spike_guard``)
``runner.create_train_state``  ``training.state.create_train_state``
``runner.init_from``        fine-tuning rules for ``--init_from``
                            (``outputs.checkpoints.InitFrom``)
``models.mlp/cnn``          ``models.plain`` (plain JAX, flax names)
``models.nnx_model``        ``models.nnx`` (adapter for flax nnx modules)
``models.transformer``      ``models.transformer`` (decoder-only LM)
``models.llama``            ``models.llama`` (Llama/Mistral/Qwen2 decoder)
``models.lora``             ``models.lora`` (LoRA adapters; with ``train.trainable``)
``datasets.digits/synthetic/diabetes``  ``data.datasets`` (in memory)
``data.iterable_source``    ``data.iterable`` (any iterable of batches)
``data.text_files``         ``data.text`` (byte-level text, grain)
``data.jsonl/parquet/array_record/packed_text_files``  ``data.corpora``
                            (documents packed into rows, any tokenizer)
``data.mixture``            ``data.mixture`` (weighted sources)
``tasks.classification/regression/language_model``  ``tasks``
``losses.cross_entropy_loss/accuracy``  ``tasks.losses``
``writers.jsonl/tensorboard/wandb``  ``outputs.writers`` (``train.writers``)
``actions.callback``        ``actions.base.Callback`` (``train.actions``)
``actions.write_samples``   ``actions.samples.WriteSamples``
``optimizers.optimizer``    ``training.optimizers.optimizer`` (any optax
                            optimizer by name, clipping, weight decay)
``schedules.constant/stepped/cosine``  ``lib.lr_schedule`` (epochs)
``optax.<schedule>``        optax schedules (steps)
``optax.<optimizer>``       optax optimizers, e.g. ``@optax.sgd()``
==========================  ===============================================

Your own model, data source, task, action or metric writer: decorate it
with ``@gin.configurable`` in your module, import the module from gin
(``import my_module`` in a gin file, or ``--gin_bindings='import
my_module'``), and bind it: ``train.model``, ``train.dataset``,
``train.task`` (a factory called with ``model=``), ``train.actions`` (a
list), ``train.writers`` (a list of factories called with the workdir).
``@my_module.f`` (no parentheses) hands the factory to the runner, which
calls it; ``@my_module.f()`` has gin call it.
"""

import gin
import optax

from gintrain.runner.actions import base as actions_base
from gintrain.runner.actions import spike_guard
from gintrain.runner.actions import samples
from gintrain.runner.data import corpora
from gintrain.runner.data import datasets
from gintrain.runner.data import iterable
from gintrain.runner.data import mixture
from gintrain.runner.data import text
from gintrain.runner.models import nnx
from gintrain.runner.models import plain as models
from gintrain.runner.models import llama
from gintrain.runner.models import lora
from gintrain.runner.models import transformer
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import writers
from gintrain.runner.parallel import partitioners
from gintrain.runner.tasks import classification
from gintrain.runner.tasks import lm
from gintrain.runner.tasks import losses
from gintrain.runner.tasks import regression
from gintrain.runner.training import config
from gintrain.runner.training import optimizers
from gintrain.runner.training import schedules
from gintrain.runner.training import state

__all__ = ['train', 'init_from', 'INIT_FROM_DEFAULTS', 'REGISTERED', 'OPTAX_SCHEDULES', 'OPTAX_OPTIMIZERS']

OPTAX_SCHEDULES = ('constant_schedule', 'linear_schedule',
                   'cosine_decay_schedule', 'warmup_cosine_decay_schedule',
                   'warmup_constant_schedule', 'exponential_decay',
                   'warmup_exponential_decay_schedule',
                   'piecewise_constant_schedule', 'polynomial_schedule',
                   'cosine_onecycle_schedule', 'linear_onecycle_schedule',
                   'sgdr_schedule', 'join_schedules')
OPTAX_OPTIMIZERS = ('sgd', 'adam', 'adamw', 'nadam', 'rmsprop', 'adagrad',
                    'adafactor', 'lamb', 'lion', 'adabelief')

# 'module.name' of everything registered here (for did-you-mean hints).
REGISTERED: list[str] = []


def _register(fn, name, module, denylist=None):
  REGISTERED.append(f'{module}.{name}')
  return gin.external_configurable(fn, name=name, module=module,
                                   denylist=denylist)


INIT_FROM_DEFAULTS = {'path': None, 'include': ('.*',), 'exclude': (),
                      'rename': ()}


def _init_from_rules(path=None, include=('.*',), exclude=(), rename=()):
  """Which weights ``--init_from`` loads (``outputs.checkpoints.InitFrom``).

  Args:
    path: the checkpoint (``--init_from`` wins when given).
    include: regular expressions (``re.search``) on '/'-joined parameter
      paths, e.g. ``'Dense_1/kernel'``: the leaves to load.
    exclude: regular expressions: leaves left at their initial value (a new
      head, say).
    rename: ``(pattern, replacement)`` pairs applied (``re.sub``) to the
      checkpoint's paths, giving the model path each loads into.

  Returns:
    The arguments as a dict; the CLI builds the ``InitFrom``.
  """
  return {'path': path, 'include': tuple(include) if not isinstance(
      include, str) else (include,), 'exclude': tuple(exclude) if not
          isinstance(exclude, str) else (exclude,),
          'rename': tuple(tuple(p) if isinstance(p, list) else p
                          for p in rename)}


train = _register(config.TrainConfig, 'train', 'runner')
init_from = _register(_init_from_rules, 'init_from', 'runner')
_register(checkpoints.CheckpointPolicy, 'checkpoint_policy', 'runner')
_register(spike_guard.spike_guard, 'spike_guard', 'runner')
_register(partitioners.partitioner, 'partitioner', 'runner')
_register(state.early_stopping, 'early_stopping', 'runner')
_register(state.create_train_state, 'create_train_state', 'runner',
          denylist=['variables', 'apply_fn', 'tx'])

for _name in ('mlp', 'cnn'):
  _register(getattr(models, _name), _name, 'models')
_register(nnx.nnx_model, 'nnx_model', 'models')
_register(transformer.transformer, 'transformer', 'models')
_register(llama.llama, 'llama', 'models')
_register(lora.lora, 'lora', 'models')
for _name in ('digits', 'synthetic', 'diabetes'):
  _register(getattr(datasets, _name), _name, 'datasets')
_register(iterable.iterable_source, 'iterable_source', 'data')
_register(text.text_files, 'text_files', 'data')
for _name in ('jsonl', 'parquet', 'array_record', 'packed_text_files'):
  _register(getattr(corpora, _name), _name, 'data')
_register(mixture.mixture, 'mixture', 'data')
_register(classification.classification, 'classification', 'tasks',
          denylist=['model'])
_register(regression.regression, 'regression', 'tasks', denylist=['model'])
_register(lm.language_model, 'language_model', 'tasks', denylist=['model'])
for _name in ('cross_entropy_loss', 'accuracy'):
  _register(getattr(losses, _name), _name, 'losses')
for _name, _cls in (('jsonl', writers.JsonlWriter),
                    ('tensorboard', writers.TensorBoardWriter),
                    ('wandb', writers.WandbWriter)):
  _register(_cls, _name, 'writers', denylist=['workdir'])
_register(actions_base.Callback, 'callback', 'actions')
_register(samples.WriteSamples, 'write_samples', 'actions')

_register(optimizers.optimizer, 'optimizer', 'optimizers')
for _name in ('constant', 'stepped', 'cosine'):
  _register(getattr(schedules, _name), _name, 'schedules')
for _name in OPTAX_SCHEDULES + OPTAX_OPTIMIZERS:
  if hasattr(optax, _name):
    _register(getattr(optax, _name), _name, 'optax')
