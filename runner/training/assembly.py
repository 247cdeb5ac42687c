"""Assembly: a run's pieces built from its config and checked together.

:func:`build` turns a checked :class:`~.config.TrainConfig` into a
:class:`Run` (model, task, data source, partitioner, optimizer, step count)
and checks that they fit together, using only shapes (``jax.eval_shape``):
a model whose output does not fit the data, or an early-stopping metric the
task does not report, fails here with one line. :func:`state_maker` builds
the fresh train state, :func:`describe` (and :func:`dry_run`) say what a
run holds and how the partitioner lays it out, :func:`evaluate` averages
the task's eval metrics. The loop itself is ``runner.training.trainer``.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from gintrain.runner.data import arrays
from gintrain.runner.data import base as data_base
from gintrain.runner.data import datasets
from gintrain.runner import validation
from gintrain.runner import errors
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.parallel import partitioners
from gintrain.runner.tasks import base as task_base
from gintrain.runner.tasks import classification
from gintrain.runner.training import config as config_lib
from gintrain.runner.training import frozen
from gintrain.runner.training import schedules

__all__ = ['Run', 'build', 'state_maker', 'describe', 'dry_run', 'evaluate']


@dataclasses.dataclass
class Run:
  """The built, mutually checked pieces of a run (see :func:`build`)."""
  config: config_lib.TrainConfig
  model: Any
  task: task_base.Task
  source: data_base.DataSource
  partitioner: partitioners.Partitioner
  tx: optax.GradientTransformation
  learning_rate: Callable[[int], float] | None
  total: int
  steps_per_epoch: int | None
  eval_every: int
  policy: checkpoints.CheckpointPolicy
  variables: Any          # shapes of the model's variables
  train_metrics: list[str]
  eval_metrics: list[str]


def _resolve(obj, what, check, want):
  """``obj``, or ``obj()`` if it is a factory failing ``check``."""
  if not check(obj) and callable(obj) and not isinstance(obj, type):
    obj = obj()
  if not check(obj):
    validation.fail(f'train.{what}', f'{want} (or a factory returning one)',
                    obj)
  return obj


@errors.activity('reading the data')
def _source(dataset) -> data_base.DataSource:
  is_data = lambda d: isinstance(d, (data_base.DataSource, datasets.Dataset))  # pylint: disable=unnecessary-lambda-assignment
  dataset = _resolve(dataset, 'dataset', is_data,
                     'a Dataset or a runner.data.base.DataSource')
  if isinstance(dataset, datasets.Dataset):
    return arrays.ArraySource(dataset)
  return dataset


def _task(task, model) -> task_base.Task:
  if task is None:
    return classification.Classification(model)
  if isinstance(task, task_base.Task):
    return task
  if callable(task):
    task = task(model=model)
  if not isinstance(task, task_base.Task):
    validation.fail('train.task', 'a Task factory called as task(model=...)'
                    ' or a Task', task)
  return task


def _optimizer(optimizer, spe):
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer, None
  if hasattr(optimizer, 'build'):
    if spe is None and isinstance(optimizer.learning_rate,
                                  schedules.EpochSchedule):
      raise RunnerError('an epoch-based learning-rate schedule needs a data'
                        ' source with epochs; use an optax schedule (steps).')
    spe = spe or 1
    lr = schedules.resolve(optimizer.learning_rate, spe)
    lr_fn = lr if callable(lr) else (lambda step, lr=lr: lr)
    return optimizer.build(spe), lr_fn
  validation.fail('train.optimizer', '@optimizers.optimizer() or an optax'
                  ' GradientTransformation', optimizer)


def _with_mask(batch):
  rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
  return {**batch, 'mask': jax.ShapeDtypeStruct((rows,), np.float32)}


@errors.activity('reading the data')
def _bind_source(config, source, partitioner) -> None:
  """Checks the batch sizes against the devices; binds the data source."""
  divisor = partitioner.batch_divisor
  validation.check_multiple(
      'train.batch_size', config.batch_size, divisor,
      f'{divisor} (devices) for parallelism={partitioner.name!r}')
  if (config.batch_size // divisor) % config.microbatches:
    raise RunnerError(
        f'train.microbatches={config.microbatches} must divide the batch of'
        f' each device ({config.batch_size // divisor} = train.batch_size'
        f' {config.batch_size} / {divisor} device(s)).')
  eval_size = config_lib.eval_batch_rows(config.eval_batch_size, source,
                                         divisor)
  spec = data_base.Spec(config.batch_size, eval_size, config.seed,
                        jax.process_index(), jax.process_count())
  try:
    source.bind(spec)
  except ValueError as e:
    raise RunnerError(f'train.dataset ({source.name}): {e}') from e
  # One eval batch must fit this host (input bytes alone), before training.
  config_lib.check_eval_batch(config.eval_batch_size, eval_size,
                              source.sample(), jax.process_count())


def _shaped(config, task, source):
  """``(variables, train metric names, eval metric names)``, from shapes
  only (``jax.eval_shape``); the task checks the model against the data."""
  sample = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
      source.sample())
  rng = jax.random.key(config.seed)
  try:
    variables = jax.eval_shape(task.init, rng, sample)
  except (KeyError, TypeError, ValueError) as e:
    raise RunnerError(f'{task.name}: cannot initialise {task.caller.name}'
                      f' on the batch {_shapes(sample)}: {e}') from e
  task.check(variables, sample, source.info)
  params = variables['params']
  mutable = {k: v for k, v in variables.items() if k != 'params'}
  train_out = jax.eval_shape(task.loss, params, mutable, sample, rng)
  eval_out = jax.eval_shape(task.eval, params, mutable, _with_mask(sample))
  if 'count' not in eval_out:
    raise RunnerError(f'{task.name}.eval must return a "count" with the'
                      f' metric sums; it returned {sorted(eval_out)}.')
  eval_names = [k for k in eval_out if k != 'count']
  eval_names = sorted(task.summarize({k: 0.0 for k in eval_names}),
                      key=lambda k: (k != 'loss', k))
  return variables, ['loss', *train_out[1]], eval_names


def build(config: config_lib.TrainConfig) -> Run:
  """Builds and cross-checks the pieces of a run (no device work).

  Raises:
    RunnerError: pieces that do not fit together, naming the binding.
  """
  model = _resolve(config.model, 'model',
                   lambda m: callable(getattr(m, 'init', None)) and
                   callable(getattr(m, 'apply', None)),
                   'a model with init and apply')
  source = _source(config.dataset)
  task = _task(config.task, model)
  partitioner = partitioners.make(config.parallelism)
  _bind_source(config, source, partitioner)
  spe = source.steps_per_epoch
  if config.num_epochs is not None and not spe:
    raise RunnerError(f'train.num_epochs needs a data source with epochs;'
                      f' {source.name} has none: set train.num_steps.')
  total = config.num_steps or config.num_epochs * spe
  tx, lr_fn = _optimizer(config.optimizer, spe)
  if config.trainable:  # the frozen parameters get no optimizer state
    tx = frozen.mask_optimizer(tx, config.trainable)
  policy = config.checkpoint or checkpoints.CheckpointPolicy()
  variables, train_names, eval_names = _shaped(config, task, source)
  for what, name in (('early_stopping.metric', config.early_stopping and
                      config.early_stopping.metric),
                     ('checkpoint_policy.best_metric', policy.best_metric)):
    if name and name not in eval_names:
      raise RunnerError(f'{what}={name!r} is not an eval metric; choose one'
                        f' of {", ".join(eval_names)}.')
  built = Run(config, model, task, source, partitioner, tx, lr_fn, total,
              spe, config.eval_every or spe or config.log_every, policy,
              variables, train_names, eval_names)
  # Partition rules that cannot split the state fail here, on shapes.
  partitioner.describe(jax.eval_shape(state_maker(built)))
  return built


def _shapes(tree):
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


def state_maker(run: Run) -> Callable[[], Any]:
  """A function building the fresh train state of ``run`` (for ``jax.jit``
  or ``jax.eval_shape``: partitioners trace it, to create the state where
  it belongs)."""
  cfg = run.config
  sample = run.source.sample()

  def make():
    variables = run.task.init(jax.random.key(cfg.seed), sample)
    state = cfg.state_factory(variables, run.model.apply, run.tx)
    return frozen.freeze(state, cfg.trainable) if cfg.trainable else state
  return make


def describe(run: Run) -> dict:
  """What a dry run prints: the pieces, step counts, parameter shapes, and
  how the partitioner lays out the train state (``layout``: per array its
  shape, ``PartitionSpec`` and bytes per device; the total per device).

  Raises:
    RunnerError: a partition rule that cannot split an array.
  """
  sizes = [int(np.prod(x.shape))
           for x in jax.tree_util.tree_leaves(run.variables['params'])]
  layout = run.partitioner.describe(jax.eval_shape(state_maker(run)))
  return {'model': run.task.caller.name, 'task': run.task.name,
          'dataset': run.source.name, 'parallelism': run.partitioner.name,
          'devices': jax.device_count(), 'steps': run.total,
          'steps_per_epoch': run.steps_per_epoch, 'parameters': sum(sizes),
          'train_metrics': run.train_metrics,
          'eval_metrics': run.eval_metrics,
          'param_shapes': _shapes(run.variables['params']),
          'layout': layout}


def dry_run(config: config_lib.TrainConfig) -> dict:
  """:func:`describe` of :func:`build`: everything checked, nothing run."""
  return describe(build(config))



@errors.activity('reading the data')  # the eval batches
def evaluate(run: Run, eval_step: Callable, dstate) -> dict:
  """Means of the task's eval metrics over ``run``'s eval batches, with the
  compiled ``eval_step`` on the placed state ``dstate`` ({} without data)."""
  p = run.partitioner
  totals = None
  for batch in run.source.eval_batches():
    sums = p.get(eval_step(dstate, p.put_batch(batch)))
    totals = sums if totals is None else {k: totals[k] + sums[k]
                                          for k in totals}
  if totals is None:
    return {}
  count = float(totals.pop('count'))
  return run.task.summarize({k: float(v) / count for k, v in totals.items()})
