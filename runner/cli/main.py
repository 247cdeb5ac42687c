r"""gintrain's command line: flags -> gin -> checked config -> trainer.

Usage (``python -m gintrain.runner.train`` or the ``gintrain`` console script)::

    # The default experiment (gin/default.gin: an MLP on the digits data).
    python -m gintrain.runner.train --workdir=/tmp/digits
    # Files by role, later ones win; bindings on the command line win last.
    python -m gintrain.runner.train --workdir=/tmp/cnn --gin_file=default.gin \
        --gin_file=models/cnn.gin --gin_file=datasets/digits_image.gin \
        --gin.train.num_epochs=20 --gin.optimizer.learning_rate=0.003
    # Check a config without training: prints it, every unset
    # %gin.REQUIRED, and what it builds (model size, steps, devices).
    python -m gintrain.runner.train --dry_run --gin_file=run.gin --gin_file=models/cnn.gin

Flags (``gintrain --help`` lists them; ``--helpfull`` adds absl's and
jax's): --gin_file (repeatable), --gin_bindings (repeatable; alias
--gin_param; shorthand --gin.NAME=VALUE), --gin_search_paths, --workdir,
--resume=auto|never|require, --init_from=PATH (weights only; with
``runner.init_from`` rules: include/exclude regular expressions on
parameter paths and rename pairs, for a new head), --dry_run, plus absl's
--jax_* flags and the multi-process flags of runner.distributed.
String values need gin quotes: --gin.optimizer.name="'sgd'". A gin file's
own folder is importable by its ``import`` lines.

Commands (the first argument; none: train)::

    gintrain eval --workdir=DIR [--checkpoint=STEP|PATH]  # runner.cli.evaluate
    gintrain ckpt ls DIR | inspect PATH | diff A B       # runner.cli.ckpt
    gintrain compare RUN_DIR... --out=PNG                # runner.cli.compare
    gintrain goodput WORKDIR [--out=PNG]                 # runner.cli.goodput
    gintrain sample --workdir=RUN|--hf=DIR --prompt=TEXT  # runner.cli.sample

``eval`` evaluates a checkpoint with the run's config.parsed.gin (or the
given --gin_file flags), prints the metrics and appends an ``eval_only``
record to metrics.jsonl, without training.

Your own model, data source, task, action or metric writer, without
editing the runner: write it in your module (a model has flax's
``init``/``apply``; the others subclass ``runner.data.base.DataSource``,
``runner.tasks.base.Task``, ``runner.actions.base.Action``,
``runner.outputs.writers.MetricWriter``), decorate it with
``@gin.configurable``, import its module from gin and bind ``train.model``,
``train.dataset``, ``train.task``, ``train.actions`` or ``train.writers``::

    # my_module.py (in the working directory or on PYTHONPATH)
    import gin
    from gintrain.runner.models import plain as models

    @gin.configurable
    def my_model(width=256):
      return models.mlp(features=(width, width), num_classes=10)

    python -m gintrain.runner.train --workdir=/tmp/mine \
        --gin_bindings='import my_module' \
        --gin.train.model=@my_module.my_model --gin.my_model.width=512

(or put ``import my_module`` and the bindings in a gin file). A reference
without ``()`` passes the factory, which the loop calls; with ``()`` gin
calls it. See runner/cli/configurables.py for every bindable name.

Outputs in the workdir: ``config.parsed.gin`` (before training),
``config.operative.gin`` (after the first step), ``flags.txt`` (reusable as
``--flagfile``), ``settings.json`` (the resolved settings; compared on
resume), ``metrics.jsonl``, ``hparams.json``, ``tensorboard/``,
``checkpoints/`` (and ``best_checkpoints/`` with keep-best), ``profile/``
(with ``train.profile_steps``), and ``metrics.png`` at the end. Running again with the same --workdir resumes
from the latest checkpoint (--resume=auto).

A fault in the input (flags, gin, workdir, checkpoint) prints one line,
``gintrain: error: ...``, and exits with status 1 (so does a checkpoint or
file that cannot be written, e.g. a full disk, naming the path). A
preempted run (SIGTERM/SIGUSR1) saves a checkpoint and exits with
``runner.parallel.preemption.PREEMPTED_EXIT_CODE`` (75); Ctrl-C (SIGINT)
does the same and exits with 130; a second Ctrl-C aborts at once. In a
multi-process run, a step that hangs for ``--step_timeout`` seconds (600;
0: off) prints every thread's stack and one ``gintrain: error:`` line, and
exits with status 3 (:mod:`runner.parallel.watchdog`): relaunch to resume.
"""

import contextlib
import os
import re
import sys
import traceback

import jax
from absl import app
from absl import flags
from absl import logging

from gintrain.lib import checkpoint_io
from gintrain.lib import errors as lib_errors
from gintrain.lib import storage
from gintrain.runner.cli import ckpt
from gintrain.runner.cli import compare
from gintrain.runner.cli import config
from gintrain.runner.cli import configurables
from gintrain.runner.cli import evaluate
from gintrain.runner.cli import goodput as goodput_cli
from gintrain.runner.cli import flags as runner_flags
from gintrain.runner.cli import help as help_lib
from gintrain.runner.cli import sample as sample_cli
from gintrain.runner.cli import sweep as sweep_cli
from gintrain.runner.cli import data as data_cli
from gintrain.runner.cli import tokenizer as tokenizer_cli
from gintrain.runner import errors
from gintrain.runner import validation
from gintrain.runner.actions import once
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.outputs import settings as settings_lib
from gintrain.runner.parallel import distributed
from gintrain.runner.parallel import preemption
from gintrain.runner.parallel import watchdog
from gintrain.runner.training import init_from as init_from_lib
from gintrain.runner.training import memory
from gintrain.runner.training import warm_start
from gintrain.runner.training import assembly
from gintrain.runner.training import trainer

__all__ = ['main_with_flags', 'run', 'PARSED_CONFIG', 'OPERATIVE_CONFIG',
           'FLAGS_FILE']

FLAGS = flags.FLAGS
PARSED_CONFIG = workdir_lib.PARSED_CONFIG
OPERATIVE_CONFIG = workdir_lib.OPERATIVE_CONFIG
FLAGS_FILE = workdir_lib.FLAGS_FILE
_CONFIGURABLE_RE = re.compile(r"In call to configurable '([^']+)'")
# Subcommands (the first argument); none: train. Those without absl flags
# take ``main(args) -> exit status``.
EVAL = 'eval'
TOOLS = {'ckpt': ckpt.main, 'compare': compare.main,
         'tokenizer': tokenizer_cli.main, 'sweep': sweep_cli.main,
         'data': data_cli.main, 'sample': sample_cli.main,
         'goodput': goodput_cli.main}


def help_groups() -> list:
  """``[(title, [flag names])]`` of ``gintrain --help``, in order."""
  def names(*modules):
    return [f.name for m in modules for f in FLAGS.get_flags_for_module(m)]
  runner = names('gintrain.runner.cli.flags')
  return [
      ('Gin flags', [n for n in runner if n.startswith('gin')]),
      ('Run flags', [n for n in runner if not n.startswith('gin')]),
      ('gintrain eval', names('gintrain.runner.cli.evaluate')),
      ('Multi-process flags (see launch/README.md)',
       names(*[m for m in runner_flags.FLAG_MODULES
               if m != 'gintrain.runner.cli.flags'])),
  ]


def parse_flags(argv: list[str]) -> list[str]:
  """Parses ``argv`` into the absl FLAGS (fresh each call); returns the rest.

  Raises:
    RunnerError: an unknown or malformed flag.
  """
  argv = runner_flags.expand_gin_shorthand(list(argv))
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    raise RunnerError(str(e)) from e
  jax.config.complete_absl_config(flags)
  return rest


def _recorded_flags() -> list:
  """The runner's flags, then the --jax_* flags given on the command line."""
  out = [flag for module in runner_flags.FLAG_MODULES
         for flag in FLAGS.get_flags_for_module(module)
         if flag.name not in runner_flags.ALIASES]
  out += [FLAGS[name] for name in sorted(FLAGS)
          if name.startswith('jax_') and FLAGS[name].present]
  return out


def _flag_values() -> dict:
  return {flag.name: flag.value for flag in _recorded_flags()}


def _flags_file_text() -> str:
  """The flags that differ from their defaults, in --flagfile format."""
  lines = [flag.serialize() for flag in _recorded_flags()
           if flag.present or flag.value != flag.default]
  return ''.join(f'{line}\n' for line in lines if line)


def _build_config():
  """Parses gin and builds the checked TrainConfig (no JAX work)."""
  files = runner_flags.GIN_FILE.value or [config.DEFAULT_GIN_FILE]
  config.parse(files, runner_flags.GIN_BINDINGS.value or [],
               runner_flags.GIN_SEARCH_PATHS.value or [])


def _bytes(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return str(n)


def format_layout(layout: dict) -> str:
  """The ``layout`` of :func:`describe` as a table (one line per array)."""
  rows = [(r['path'], 'x'.join(map(str, r['shape'])) or 'scalar', r['spec'],
           _bytes(r['bytes_per_device'])) for r in layout['arrays']]
  head = ('array', 'shape', 'PartitionSpec', 'bytes/device')
  widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(4)]
  lines = [f'# State layout on mesh {layout["mesh"]}:']
  for row in [head] + rows:
    lines.append('#   ' + '  '.join(str(c).ljust(w) for c, w in
                                      zip(row, widths)).rstrip())
  lines.append(f'#   total state per device:'
               f' {_bytes(layout["state_bytes_per_device"])}'
               f' ({layout["state_bytes_per_device"]} bytes)')
  return '\n'.join(lines)


def dry_run() -> int:
  """Prints the parsed config, unset REQUIRED bindings, and what it builds."""
  print('# Parsed gin config', config.config_str(), sep='\n')
  missing = config.unset_required()
  if missing:
    print('# Unset %gin.REQUIRED bindings:')
    for key in missing:
      print(f'#   {key}')
    config.check_required()  # raises with the full list
  print('# All %gin.REQUIRED bindings are set.')
  config.finalize()
  run = assembly.build(configurables.train())
  summary = assembly.describe(run)
  layout = summary.pop('layout')
  print('# Built:')
  for key, value in summary.items():
    print(f'#   {key}: {value}')
  print(format_layout(layout))
  make = assembly.state_maker(run)
  est = memory.estimate(run, make)  # compiled ahead of time, not run
  print(memory.format_estimate(est))
  memory.check(run, make, runner_flags.MEMORY_BUDGET.value, est=est)
  return 0


def _init_from():
  """What ``--init_from`` and ``runner.init_from`` ask for: None, a path
  (load every leaf), or a ``init_from.InitFrom`` with rules."""
  rules = configurables.init_from()
  bound_path = rules.pop('path')
  path = runner_flags.INIT_FROM.value or bound_path
  if not path:
    if any(rules[k] != configurables.INIT_FROM_DEFAULTS[k] for k in rules):
      logging.warning('runner.init_from rules are bound but there is no'
                      ' --init_from (or init_from.path): ignored.')
    return None
  if all(rules[k] == configurables.INIT_FROM_DEFAULTS[k] for k in rules):
    return path
  return init_from_lib.InitFrom(path, **rules)


def train(hooks=()) -> int:
  """Trains as the flags and gin files say; returns the exit status."""
  if evaluate.CHECKPOINT.present:
    raise RunnerError('--checkpoint is a flag of `gintrain eval` (training'
                      ' resumes from <workdir>/checkpoints; to start from'
                      ' weights, use --init_from).')
  config.finalize()
  cfg = configurables.train()  # every bad value fails here, before JAX work
  init_from = _init_from()
  workdir = workdir_lib.resolve(runner_flags.WORKDIR.value)
  main = distributed.is_main_process()
  # Written by the trainer once the resume check passed.
  files = {PARSED_CONFIG: config.config_str(),
           FLAGS_FILE: _flags_file_text()}
  settings = settings_lib.build(config.bound_parameters(), _flag_values())
  written = []

  def write_operative_config(step):
    if main and not written:
      workdir_lib.write_text(workdir, OPERATIVE_CONFIG,
                             config.operative_config_str())
      written.append(step)

  watchdog.start_from_flags()  # multi-process runs: a hung step exits 3
  try:
    result = trainer.train(
        cfg, workdir=workdir, resume=runner_flags.RESUME.value,
        init_from=init_from, settings=settings,
        hooks=[once.Once(write_operative_config), *hooks], files=files)
  finally:
    watchdog.stop()
  if main:
    logging.info('Done at step %d%s: eval %s', result.step,
                 ' (early stopping)' if result.stopped_early else '',
                 ' '.join(f'{k}={v:.4f}' for k, v in
                          result.eval_metrics.items()))
  return 0


def eval_only() -> int:
  """``gintrain eval``: see :mod:`runner.cli.evaluate`."""
  if not runner_flags.WORKDIR.value:
    raise RunnerError('gintrain eval needs --workdir (the run whose'
                      ' checkpoint to evaluate).')
  workdir = workdir_lib.resolve(runner_flags.WORKDIR.value)
  if not storage.isdir(workdir):
    raise RunnerError(f'--workdir={workdir}: no such directory.')
  files = runner_flags.GIN_FILE.value
  with contextlib.ExitStack() as stack:
    if not files:
      parsed = workdir_lib.path(workdir, PARSED_CONFIG)
      if not storage.isfile(parsed):
        raise RunnerError(f'--workdir={workdir} holds no {PARSED_CONFIG};'
                          ' give the run\'s --gin_file flags.')
      files = [stack.enter_context(storage.staged_download(parsed))]
    config.parse(files, runner_flags.GIN_BINDINGS.value or [],
                 runner_flags.GIN_SEARCH_PATHS.value or [])
  config.finalize()
  cfg = configurables.train()
  evaluate.evaluate(cfg, workdir, evaluate.CHECKPOINT.value)
  return 0


def _store_error(error: BaseException):
  """The object-store failure (``storage.StoreError``) that ``error`` is
  or was explicitly raised from, or None. When that failure was raised
  while handling an earlier one (a run's cleanup writing to the store that
  just failed), the earliest: what failed first."""
  for _ in range(8):
    if error is None or isinstance(error, storage.StoreError):
      break
    error = error.__cause__
  if error is None:
    return None
  first, context = error, error.__context__
  for _ in range(32):
    if context is None:
      break
    if isinstance(context, storage.StoreError):
      first = context
    context = context.__context__
  return first


def _one_line(error: BaseException) -> str:
  store = _store_error(error)
  if store is not None and not isinstance(error, RunnerError):
    # e.g. 'writing the metrics: s3://b/run/metrics.jsonl: cannot reach the
    # object store at http://...: (connection refused) (the run stops; ...)'
    activity = errors.activity_of(store) or errors.activity_of(error)
    return f'{activity}: {store}' if activity else str(store)
  if (isinstance(error, OSError) and error.filename is not None and
      type(error).__module__ == 'builtins'):
    return errors.file_error_line(error)
  lines = str(error).strip().split('\n')
  message = lines[0].strip() if lines else type(error).__name__
  match = _CONFIGURABLE_RE.search(str(error))
  if match and (not isinstance(error, RunnerError) or (
      isinstance(error, validation.ArgumentError) and not error.qualified)):
    message += f" (in gin configurable '{match.group(1)}')"
  return message


def _is_user_error(error: BaseException) -> bool:
  if isinstance(error, RunnerError):  # distributed's config errors too
    return True
  # The object store failed under the run (endpoint unreachable, bucket
  # deleted, access denied): lib.storage's error names the URL and why.
  if _store_error(error) is not None:
    return True
  # A checkpoint that cannot be written (disk full, quota, permissions) or
  # a non-regular file in its place: the lib's message names the path.
  if isinstance(error, (checkpoint_io.CheckpointWriteError,
                        checkpoint_io.NotARegularFileError,
                        lib_errors.InvalidCheckpointError)):
    return True
  # Any other OSError that names its file (e.g. ENOSPC writing metrics):
  # "[Errno 28] No space left on device: '<path>'".
  if isinstance(error, OSError) and error.filename is not None:
    return True
  # A ValueError/TypeError raised while gin called a configurable with the
  # user's bindings (e.g. models.mlp.features = -3): report it on one line;
  # the traceback is logged at debug level (--verbosity=1).
  return isinstance(error, (ValueError, TypeError)) and bool(
      _CONFIGURABLE_RE.search(str(error)))


def _check_backend() -> None:
  """Starts JAX's backend now, so that a platform that is not there
  (``--jax_platforms=tpu`` on a CPU machine) is one line, before any work.

  Raises:
    RunnerError: naming the flag (or ``JAX_PLATFORMS``) and the platform.
  """
  try:
    jax.devices()
  except RuntimeError as e:
    value = jax.config.jax_platforms
    name = ('--jax_platforms' if 'jax_platforms' in FLAGS and
            FLAGS['jax_platforms'].present else 'JAX_PLATFORMS')
    reason = ' '.join(str(e).strip().split('\n')[0].split())
    raise RunnerError(f'{name}={value}: JAX cannot start that platform on'
                      f' this machine ({reason}).') from e


def _run_guarded(rest: list[str], hooks=(), command: str | None = None
                 ) -> int:
  try:
    if len(rest) > 1:
      raise RunnerError(f'unexpected arguments: {" ".join(rest[1:])}'
                        ' (flags look like --name=value; commands: eval,'
                        f' {", ".join(TOOLS)}; see gintrain --help).')
    distributed.initialize()
    _check_backend()
    warm_start.enable(runner_flags.COMPILATION_CACHE_DIR.value)
    if command == EVAL:
      return eval_only()
    _build_config()
    return dry_run() if runner_flags.DRY_RUN.value else train(hooks)
  except trainer.Preempted as e:
    code = getattr(e, 'exit_code', preemption.PREEMPTED_EXIT_CODE)
    logging.warning('%s; exiting with status %d.', e, code)
    return code
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      raise
    logging.debug('%s', ''.join(traceback.format_exception(e)))
    print(f'gintrain: error: {_one_line(e)}', file=sys.stderr, flush=True)
    return 1


def main_with_flags(argv: list[str], hooks=()) -> int:
  """Runs the runner in this process with ``argv`` (``argv[0]`` = program).

  Returns the exit status instead of exiting. Each call starts from fresh
  flags and a cleared gin config, so tests and notebooks can call it
  repeatedly. ``hooks`` are called as ``hook(step)`` after every train step
  (an exception from one ends the run as a crash would).
  """
  argv = list(argv)
  command = argv[1] if len(argv) > 1 else None
  if command in TOOLS:
    return TOOLS[command](argv[2:])
  if help_lib.wants_help(argv):
    print(help_lib.help_text(help_groups()), end='', flush=True)
    return 0
  if command == EVAL:
    argv = argv[:1] + argv[2:]
  else:
    command = None
  try:
    rest = parse_flags(argv)
  except RunnerError as e:
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    return 1
  return _run_guarded(rest, hooks, command)


def _absl_flags_parser(argv):
  try:
    return parse_flags(argv)
  except RunnerError as e:
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def _absl_main(rest, command=None):
  try:
    code = _run_guarded(rest, command=command)
  except KeyboardInterrupt:
    # Ctrl-C before the training loop took SIGINT over, or a second Ctrl-C
    # during it (the first one saves a checkpoint and exits 130 too).
    print('gintrain: interrupted (Ctrl-C); no checkpoint written.',
          file=sys.stderr, flush=True)
    code = preemption.INTERRUPTED_EXIT_CODE
  sys.exit(code)


def run():
  """Console-script entry point (``gintrain``)."""
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())  # as `python -m`: user modules in cwd
  argv = list(sys.argv)
  command = argv[1] if len(argv) > 1 else None
  if command in TOOLS:
    sys.exit(TOOLS[command](argv[2:]))
  if help_lib.wants_help(argv):
    print(help_lib.help_text(help_groups()), end='', flush=True)
    sys.exit(0)
  if command == EVAL:
    app.run(lambda rest: _absl_main(rest, EVAL), argv=argv[:1] + argv[2:],
            flags_parser=_absl_flags_parser)
  app.run(_absl_main, flags_parser=_absl_flags_parser)


if __name__ == '__main__':
  run()
