"""Where a run starts: the fresh state (or ``--init_from``'s parameters), or
the newest checkpoint with the data position and the actions' states; the
run's writers and recorded settings. Used by ``runner.training.trainer``."""

import jax
import numpy as np
from absl import logging

from gintrain.runner import errors
from gintrain.runner.actions import base as actions_base
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import settings as settings_lib
from gintrain.runner.outputs import writers as writers_lib
from gintrain.runner.training import frozen
from gintrain.runner.training import init_from as init_from_lib
from gintrain.runner.training import resume_guard

__all__ = ['writer', 'resume_or_start', 'record_settings', 'close']


def writer(trainer):
  """The run's writers, made once the resume check passed (nothing in the
  workdir is written before)."""
  if not trainer.main:
    return writers_lib.NullWriter()
  factories = trainer.run.config.writers
  if factories is None:
    factories = (writers_lib.JsonlWriter, writers_lib.TensorBoardWriter)
  return _WritingMetrics(writers_lib.OpenLater(lambda: writers_lib.MultiWriter(
      [f(trainer.workdir) for f in factories])))


_WRITING_METRICS = errors.activity('writing the metrics')


class _WritingMetrics(writers_lib.MetricWriter):
  """``writer``, whose file errors say the run was writing the metrics
  (``runner.errors.activity``), whoever calls it: the trainer, the
  actions."""

  def __init__(self, writer: writers_lib.OpenLater):
    self.writer = writer

  def __repr__(self):
    return repr(self.writer)

  @_WRITING_METRICS
  def open(self) -> writers_lib.MetricWriter:
    return self.writer.open()

  @_WRITING_METRICS
  def write_scalars(self, step, scalars, split='train'):
    self.writer.write_scalars(step, scalars, split)

  @_WRITING_METRICS
  def write_hparams(self, hparams, metrics=()):
    self.writer.write_hparams(hparams, metrics)

  @_WRITING_METRICS
  def flush(self):
    self.writer.flush()

  @_WRITING_METRICS
  def close(self):
    self.writer.close()

  def _write_scalars(self, step, scalars, split):  # write_scalars forwards
    raise NotImplementedError

  def _write_hparams(self, hparams, metrics):  # write_hparams forwards
    raise NotImplementedError


def resume_or_start(trainer, make):
  """``(placed state, start step, resumed)`` as ``--resume`` says; the
  fresh state is built by ``make`` where the partitioner places it."""
  ckpt, mode = trainer.ckpt, trainer.resume_mode
  latest = ckpt.latest_step()
  if mode == 'require' and latest is None:
    raise RunnerError(f'--resume=require but {ckpt.dir} holds no'
                      f' checkpoint ({ckpt.policy.prefix}<step>).')
  if mode == 'never' and latest is not None:
    raise RunnerError(
        f'--resume=never but {ckpt.dir} already holds checkpoints (latest'
        f' step {latest}); use --resume=auto to continue that run, or a new'
        ' --workdir.')
  if latest is None:
    return _fresh(trainer, make), 0, False
  resume_guard.check(trainer.workdir, trainer.settings)  # changes: refused
  target = jax.eval_shape(make)
  if frozen.has_frozen(target):  # the checkpoint holds what trains: the base
    target = _fresh(trainer, make)
  while True:
    try:
      state, raw = checkpoints.restore_state(
          ckpt.path(latest), target, trainer.run.partitioner,
          ckpt.read(latest), latest)
      break
    except checkpoints.CorruptCheckpointError as e:  # agreed: all fall back
      latest = ckpt.reject(latest, ' '.join(str(e).split()))
      if latest is None and mode != 'require':
        return _fresh(trainer, make), 0, False
      if latest is None:
        raise
  step = int(np.asarray(state.step))
  _restore_positions(trainer, raw, ckpt.path(latest), step)
  if trainer.main:
    logging.info('Resumed from %s (step %d).', ckpt.path(latest), step)
    if trainer.init_from:
      logging.info('--init_from=%s ignored: the run resumes.',
                   trainer.init_from)
  return state, step, True


def _fresh(trainer, make):
  """The placed fresh state (its params from ``--init_from``, if set)."""
  p = trainer.run.partitioner
  if not trainer.init_from:
    return p.create_state(make)
  state = jax.device_get(jax.jit(make)())
  state = frozen.rehash(state.replace(params=init_from_lib.load_params(
      trainer.init_from, state.params)))
  if trainer.main:
    logging.info('Initialised params from %s.', trainer.init_from)
  return p.put_state(state)


def _restore_positions(trainer, raw, path, step) -> None:
  """The data position and each checkpointed action's state."""
  source = trainer.run.source
  data = raw.get('data') or {}
  if 'step' in data and int(data['step']) != step:
    raise RunnerError(f'{path}: data position {data["step"]} differs from'
                      f' the train state step {step}.')
  try:
    source.set_state(data)
  except (KeyError, ValueError) as e:
    raise RunnerError(f'{path}: cannot restore the data position of'
                      f' {source.name}: {e}') from e
  for action in trainer.actions:
    if actions_base.is_stateful(action):
      action.set_state(raw.get(action.checkpoint_key))


def record_settings(trainer, writer_, resumed) -> None:
  """Saves the settings, writes them as hparams, warns on resume changes."""
  workdir = trainer.workdir
  flat = settings_lib.flatten(trainer.settings)
  if resumed:
    try:
      previous = settings_lib.load(workdir)
    except (OSError, ValueError) as e:
      logging.warning('Cannot read the previous %s: %s',
                      settings_lib.SETTINGS_FILE, e)
      previous = None
    diff = settings_lib.changes(previous, flat) if previous else []
    if diff:
      logging.warning('Resuming with changed settings (%d): %s', len(diff),
                      '; '.join(diff))
  settings_lib.save(workdir, trainer.settings)
  writer_.write_hparams(flat, [f'eval/{m}' for m in trainer.run.eval_metrics])


def close(trainer, writer_) -> None:
  """Closes the actions, the checkpointer, the source and the writers
  (each also when an earlier one fails)."""
  try:
    for action in trainer.actions:
      action.close()
    trainer.ckpt.close()
  finally:
    try:
      trainer.run.source.close()
    finally:
      writer_.close()
