"""``gintrain eval``: evaluate a checkpoint with its run's own config.

    gintrain eval --workdir=DIR [--checkpoint=STEP|PATH] [--gin_file=...]
        [--gin.NAME=VALUE ...]

The config is the workdir's ``config.parsed.gin`` (the one the run was
started with) unless ``--gin_file`` flags are given; ``--gin_bindings``
(``--gin.NAME=VALUE``) apply after it either way, e.g. to change
``train.eval_batch_size``. The checkpoint is the latest in
``<workdir>/checkpoints`` unless ``--checkpoint`` names a step (looked up in
``checkpoints/``, then ``best_checkpoints/``) or a file or directory. The
metrics are evaluated exactly as the run evaluates (same task, eval data
and batches; :func:`evaluate_checkpoint`), printed
on one line and appended to ``<workdir>/metrics.jsonl`` as a record with
``split`` ``'eval_only'``. Nothing is trained and no checkpoint is written.
The workdir and the checkpoint may be object-store URLs (``s3://...``).
"""

import jax
import numpy as np
from absl import flags

from gintrain.lib import checkpoints as lib_checkpoints
from gintrain.lib import storage
from gintrain.runner import errors
from gintrain.runner.errors import RunnerError
from gintrain.runner.cli import frozen_base
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.outputs import writers
from gintrain.runner.parallel import distributed
from gintrain.runner.training import config as config_lib
from gintrain.runner.training import frozen
from gintrain.runner.training import steps
from gintrain.runner.training import assembly

__all__ = ['CHECKPOINT', 'SPLIT', 'find_checkpoint', 'evaluate',
           'evaluate_checkpoint']

SPLIT = 'eval_only'

CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None,
    'gintrain eval only: the checkpoint to evaluate, a step (in'
    ' <workdir>/checkpoints, then best_checkpoints) or a file or directory'
    ' path. Default: the latest in <workdir>/checkpoints.')


def find_checkpoint(workdir: str, checkpoint: str | None,
                    prefix: str = 'checkpoint_') -> str:
  """The checkpoint file that ``--checkpoint`` names (see the module doc).

  Raises:
    RunnerError: nothing there.
  """
  ckpt_dir = workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)
  if checkpoint is None or storage.isdir(checkpoint):
    folder = ckpt_dir if checkpoint is None else checkpoint
    if storage.isdir(workdir_lib.path(folder, workdir_lib.CHECKPOINT_DIR)):
      folder = workdir_lib.path(folder, workdir_lib.CHECKPOINT_DIR)
    path = (lib_checkpoints.latest_checkpoint(folder, prefix)
            if storage.isdir(folder) else None)
    if path is None:
      flag = '--workdir' if checkpoint is None else '--checkpoint'
      raise RunnerError(f'{flag}: {folder} holds no checkpoint'
                        f' ({prefix}<step>).')
    return path
  if checkpoint.isdigit():
    for folder in (ckpt_dir, workdir_lib.path(workdir, workdir_lib.BEST_DIR)):
      path = storage.join(folder, f'{prefix}{int(checkpoint)}')
      if storage.exists(path):
        return path
    try:
      steps_there = lib_checkpoints.available_steps(ckpt_dir, prefix) if (
          storage.isdir(ckpt_dir)) else []
    except ValueError:
      steps_there = []
    raise RunnerError(f'--checkpoint={checkpoint}: no {prefix}{checkpoint}'
                      f' in {ckpt_dir} or {workdir_lib.BEST_DIR}/ (steps'
                      f' there: {", ".join(map(str, steps_there)) or "none"}).')
  if not storage.exists(checkpoint):
    raise RunnerError(f'--checkpoint={checkpoint}: no such file or directory'
                      ' (give a step or a path).')
  return checkpoint


def evaluate_checkpoint(config: config_lib.TrainConfig, path: str,
                        workdir: str | None = None) -> tuple[int, dict]:
  """``(step, eval metrics)`` of the runner checkpoint file ``path``,
  evaluated as the run of ``config`` evaluates (same task, data, batches).

  Raises:
    RunnerError: the file is unreadable or does not fit the model.
  """
  run = assembly.build(config)
  p = run.partitioner
  target = jax.eval_shape(assembly.state_maker(run))
  if frozen.has_frozen(target):  # the checkpoint holds what trains: the base
    target = frozen_base.base_state(
        run, workdir or path.rsplit('/', 2)[0], path)
  state, _ = checkpoints.restore_state(path, target, p, hint='')
  eval_step = p.compile_eval(steps.make_eval_step(run.task, p.axis_name))
  return int(np.asarray(p.get(state.step))), assembly.evaluate(
      run, eval_step, state)


def evaluate(cfg: config_lib.TrainConfig, workdir: str,
             checkpoint: str | None) -> tuple[str, int, dict]:
  """Evaluates the checkpoint ``--checkpoint`` names with ``cfg``.

  Prints ``eval_only step N (<path>): name=value ...`` and appends the
  record to ``<workdir>/metrics.jsonl`` (process 0).

  Returns:
    ``(checkpoint path, step, metrics)``.

  Raises:
    RunnerError: no such checkpoint, or one that does not fit the config.
  """
  prefix = cfg.checkpoint.prefix if cfg.checkpoint else 'checkpoint_'
  path = find_checkpoint(workdir, checkpoint, prefix)
  step, metrics = evaluate_checkpoint(cfg, path, workdir)
  if distributed.is_main_process():
    with errors.activity('writing the metrics'), writers.JsonlWriter(
        workdir) as writer:
      writer.write_scalars(step, metrics, SPLIT)
    shown = ' '.join(f'{k}={v:.6g}' for k, v in metrics.items())
    print(f'{SPLIT} step {step} ({path}): {shown}', flush=True)
  return path, step, metrics
