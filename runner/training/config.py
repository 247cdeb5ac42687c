"""The run's settings as one checked object, built before any JAX work.

:class:`TrainConfig` is what gin's ``train`` binds: every field is checked
when it is created, so a bad value (``train.eval_batch_size=-3``) is one
line naming the binding before anything is loaded or compiled.

    >>> TrainConfig(model=object(), dataset=object(), optimizer=object(),
    ...             num_steps=10, eval_batch_size=-3)
    Traceback (most recent call last):
    ...
    gintrain.runner.errors.RunnerError: train.eval_batch_size must be a positive integer, got -3.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.training import state as state_lib

__all__ = ['TrainConfig', 'eval_batch_rows', 'check_eval_batch']


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything ``train`` is bound to in gin.

  Attributes:
    model: a model (``init``/``apply``: the runner's plain-JAX models, a flax
      linen module, ``models.nnx_model(...)``), or a factory returning one.
    dataset: a ``runner.data.datasets.Dataset`` (in-memory arrays), a
      ``runner.data.base.DataSource``, or a factory returning either.
    optimizer: ``@optimizers.optimizer()`` or an optax transformation.
    task: a task factory called as ``task(model=...)`` (default:
      classification), or a ``Task`` instance.
    batch_size: the global batch size (a multiple of the device count).
    num_steps: steps to train (or give ``num_epochs``).
    num_epochs: epochs to train (needs a source with ``steps_per_epoch``).
    eval_every: steps between evaluations (default: one epoch, or
      ``log_every`` steps for a source without epochs). Always one at the end.
    eval_batch_size: the global eval batch size (rounded up to a multiple
      of the device count; the last batch is padded and masked).
    log_every: steps between train-metric records and log lines.
    seed: seeds the initialisation, the data order and the step keys.
    parallelism: ``'auto'``, ``'single'``, ``'pmap'``, ``'sharded'`` or a
      ``runner.parallel.partitioners.Partitioner``.
    early_stopping: from ``runner.early_stopping`` (None: off).
    checkpoint: the checkpoint policy (None: the default policy).
    state_factory: ``(variables, apply_fn, tx) -> TrainState``.
    writers: metric writer factories, each called as ``factory(workdir)``
      on process 0 (None: JSONL and TensorBoard).
    actions: more actions run after each step (``runner.actions``), e.g.
      ``[@my_module.MyAction()]``.
    profile_steps: ``(first, last)``: trace these steps with
      ``jax.profiler`` into ``<workdir>/profile`` (None: off).
    microbatches: split each batch into this many parts, accumulate their
      gradients and apply one update (gradient accumulation).
    spike_guard: the loss-spike guard (``runner.actions.spike_guard``):
      True (the default settings), False (off) or
      ``@runner.spike_guard()``.
    replace_actions: ``{name: factory}``: each built-in action of that
      name (``report``, ``eval``, ``early_stopping``, ``keep_best``,
      ``checkpoint``, ``preemption``, ``profiler``, ``samples``,
      ``spike_guard``, ``finite_check``, ``goodput``, ``plot``) is
      replaced by ``factory(built_in)``, e.g. ``{'eval': @my_module.MyEval}``
      (``runner.training.action_list``).
    trainable: regular expressions (``re.search``) on '/'-joined parameter
      paths: only those parameters train; the others are frozen, hold no
      optimizer state and stay out of the checkpoints, which record a hash
      of them instead (``runner.training.frozen``; LoRA: ``['lora_']``).
      None: everything trains.
    peak_flops_per_device: the peak FLOP/s of one device, for the train
      records' ``mfu`` (None: looked up from the device kind,
      ``runner.training.flops.PEAKS``).
  """
  model: Any = None
  dataset: Any = None
  optimizer: Any = None
  task: Any = None
  batch_size: int = 128
  num_steps: int | None = None
  num_epochs: int | None = None
  eval_every: int | None = None
  eval_batch_size: int = 1024
  log_every: int = 100
  seed: int = 0
  parallelism: Any = 'auto'
  early_stopping: state_lib.EarlyStopper | None = None
  checkpoint: Any = None
  state_factory: Callable = state_lib.create_train_state
  writers: Sequence[Callable] | None = None
  actions: Sequence[Any] = ()
  profile_steps: tuple[int, int] | None = None
  microbatches: int = 1
  spike_guard: Any = True
  replace_actions: Any = None
  trainable: Sequence[str] | None = None
  peak_flops_per_device: float | None = None

  def __post_init__(self):
    unset = [f'train.{name}' for name in ('model', 'dataset', 'optimizer')
             if getattr(self, name) is None]
    if unset:
      raise RunnerError(
          f'{", ".join(unset)} not set: bind them in a gin file (e.g. include'
          ' default.gin, or run.gin with files from models/, datasets/ and'
          f' optimizers/) or with --gin.{unset[0]}=...')
    if (self.num_steps is None) == (self.num_epochs is None):
      raise RunnerError('set exactly one of train.num_steps and'
                        f' train.num_epochs (got {self.num_steps!r} and'
                        f' {self.num_epochs!r}).')
    for name in ('num_steps', 'num_epochs', 'eval_every'):
      validation.check_positive_int(f'train.{name}', getattr(self, name),
                                    allow_none=True)
    for name in ('batch_size', 'eval_batch_size', 'log_every',
                 'microbatches'):
      validation.check_positive_int(f'train.{name}', getattr(self, name))
    validation.check_int('train.seed', self.seed, 0)
    if self.early_stopping is not None and not isinstance(
        self.early_stopping, state_lib.EarlyStopper):
      validation.fail('train.early_stopping',
                      '@runner.early_stopping() or None', self.early_stopping)
    validation.check_callable('train.state_factory', self.state_factory)
    validation.check_callables(
        'train.writers', self.writers, 'a list of writer factories (called'
        ' with the workdir)', allow_none=True)
    validation.check_callables(
        'train.actions', self.actions, 'a list of actions (callables of'
        ' (step, state, metrics))')
    if self.replace_actions is not None and not (
        isinstance(self.replace_actions, dict) and
        all(isinstance(k, str) and callable(v)
            for k, v in self.replace_actions.items())):
      validation.fail('train.replace_actions', 'a dict of action names to'
                      ' factories (called with the built-in action)',
                      self.replace_actions)
    if not (isinstance(self.spike_guard, bool) or
            hasattr(self.spike_guard, 'max_rollbacks')):
      validation.fail('train.spike_guard', 'True, False or'
                      ' @runner.spike_guard()', self.spike_guard)
    validation.check_number('train.peak_flops_per_device',
                            self.peak_flops_per_device, 0, low_open=True,
                            allow_none=True, unit='FLOP/s')
    if self.trainable is not None:
      from gintrain.runner.training import frozen  # pylint: disable=g-import-not-at-top
      object.__setattr__(self, 'trainable',
                         frozen.check_patterns(self.trainable))
    if self.profile_steps is not None:
      ok = (isinstance(self.profile_steps, (tuple, list)) and
            len(self.profile_steps) == 2 and
            all(validation.is_int(s, 1) for s in self.profile_steps) and
            self.profile_steps[0] <= self.profile_steps[1])
      if not ok:
        validation.fail('train.profile_steps', '(first, last) steps with'
                        ' 1 <= first <= last', self.profile_steps)


def _host_memory() -> int | None:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (AttributeError, OSError, ValueError):
    return None


def _gib(n: float) -> str:
  return f'{n / 2**30:.1f} GiB'


def eval_batch_rows(eval_batch_size: int, source: Any, divisor: int) -> int:
  """The global eval batch in rows: ``train.eval_batch_size`` capped at the
  eval set's size when the source knows it (``num_eval_examples``, or an
  array dataset's ``num_test``), rounded up to a multiple of ``divisor``
  (devices). For :func:`runner.training.assembly.build`, before the source
  is bound.

      >>> eval_batch_rows(10**9, type('S', (), {'num_eval_examples': 100}),
      ...                 8)
      104
  """
  rows = eval_batch_size
  cap = getattr(source, 'num_eval_examples', None)
  if cap is None:
    cap = getattr(getattr(source, 'dataset', None), 'num_test', None)
  if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
    rows = min(rows, cap)
  return -(-rows // divisor) * divisor


def check_eval_batch(eval_batch_size: int, rows: int, sample: Any,
                     process_count: int = 1,
                     memory: int | None = None) -> None:
  """Checks before training that one eval batch (this process's share of
  ``rows``, each row the size of a row of ``sample``, a batch of the
  source) fits in half of this host's memory (``memory``; default: its
  physical memory): input bytes alone, a lower bound of what evaluation
  needs.

  Raises:
    RunnerError: it cannot fit, naming ``train.eval_batch_size``.
  """
  memory = memory if memory is not None else _host_memory()
  if not memory:
    return
  row = 0
  for leaf in _leaves(sample):
    shape, dtype = getattr(leaf, 'shape', None), getattr(leaf, 'dtype', None)
    if shape is None or dtype is None:
      continue
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # arrays or shapes
    row += nbytes // max(shape[0], 1) if len(shape) else nbytes
  need = math.ceil(rows / max(process_count, 1)) * row
  if need > memory / 2:
    raise RunnerError(
        f'train.eval_batch_size={eval_batch_size} is too large: one eval'
        f' batch of {rows} rows takes {_gib(need)} of input alone on each'
        f' host ({row} bytes per example), more than half of this'
        f" host's {_gib(memory)}; lower it.")


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  elif isinstance(tree, (list, tuple)):
    for value in tree:
      yield from _leaves(value)
  else:
    yield tree
