r"""gintrain's entry point: ``python -m runner.train`` (or ``gintrain``).

    python -m runner.train --workdir=/tmp/run          # the default experiment
    python -m runner.train --workdir=/tmp/cnn --gin_file=default.gin \
        --gin_file=models/cnn.gin --gin.train.num_epochs=20
    python -m runner.train --dry_run --gin_file=models/cnn.gin

See ``runner.flags`` for the flags and ``runner.configurables`` for what gin
can bind. Outputs in the workdir: ``config.parsed.gin`` (before training),
``config.operative.gin`` (after the first step), ``flags.txt`` (reusable as
``--flagfile``), ``settings.json``, ``metrics.jsonl``, ``hparams.json``,
``tensorboard/``, ``checkpoints/`` (and ``best_checkpoints/``),
``metrics.png``.

A fault in the input (flags, gin, workdir, checkpoint) prints one line,
``gintrain: error: ...``, and exits with status 1. A preempted run exits
with ``runner.preemption.PREEMPTED_EXIT_CODE`` after saving a checkpoint.
"""

import os
import re
import sys
import traceback

import jax
from absl import app
from absl import flags
from absl import logging

from runner import config
from runner import configurables
from runner import distributed
from runner import flags as runner_flags
from runner import loop
from runner import preemption
from runner import settings as settings_lib
from runner.errors import RunnerError

__all__ = ['main_with_flags', 'run', 'PARSED_CONFIG', 'OPERATIVE_CONFIG',
           'FLAGS_FILE']

FLAGS = flags.FLAGS
PARSED_CONFIG = 'config.parsed.gin'
OPERATIVE_CONFIG = 'config.operative.gin'
FLAGS_FILE = 'flags.txt'
_CONFIGURABLE_RE = re.compile(r"In call to configurable '([^']+)'")


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


def _flag_values() -> dict:
  values = {}
  for module in runner_flags.FLAG_MODULES:
    for flag in FLAGS.get_flags_for_module(module):
      values[flag.name] = flag.value
  for name in FLAGS:
    if name.startswith('jax_') and FLAGS[name].present:
      values[name] = FLAGS[name].value
  return values


def _flags_file_text() -> str:
  lines = []
  for module in runner_flags.FLAG_MODULES:
    for flag in FLAGS.get_flags_for_module(module):
      if flag.present or flag.value != flag.default:
        lines.append(flag.serialize())
  for name in sorted(FLAGS):
    if name.startswith('jax_') and FLAGS[name].present:
      lines.append(FLAGS[name].serialize())
  return ''.join(f'{line}\n' for line in lines if line)


def _prepare_workdir(workdir: str | None) -> str:
  if not workdir:
    raise RunnerError('--workdir is required (the directory for configs,'
                      ' metrics and checkpoints).')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise RunnerError(f'--workdir={workdir} is not writable:'
                      f' {e.strerror or e}.') from e
  return workdir


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def _dry_run() -> int:
  print('# Parsed gin config', config.config_str(), sep='\n')
  missing = config.unset_required()
  if missing:
    print('# Unset %gin.REQUIRED bindings:')
    for key in missing:
      print(f'#   {key}')
    config.check_required()  # raises with the full list
  print('# All %gin.REQUIRED bindings are set.')
  config.finalize()
  summary = configurables.train(workdir=None, dry_run=True)
  print('# Built:')
  for key, value in summary.items():
    print(f'#   {key}: {value}')
  return 0


def _train(hooks=()) -> int:
  files = runner_flags.GIN_FILE.value or [config.DEFAULT_GIN_FILE]
  config.parse(files, runner_flags.GIN_BINDINGS.value or [],
               runner_flags.GIN_SEARCH_PATHS.value or [])
  if runner_flags.DRY_RUN.value:
    return _dry_run()
  config.finalize()
  workdir = _prepare_workdir(runner_flags.WORKDIR.value)
  main = distributed.is_main_process()
  if main:
    _write(os.path.join(workdir, PARSED_CONFIG), config.config_str())
    _write(os.path.join(workdir, FLAGS_FILE), _flags_file_text())
  settings = settings_lib.build(config.bound_parameters(), _flag_values())
  written = []

  def write_operative_config(step):
    if main and not written:
      _write(os.path.join(workdir, OPERATIVE_CONFIG),
             config.operative_config_str())
      written.append(step)

  result = configurables.train(
      workdir=workdir, resume=runner_flags.RESUME.value,
      init_from=runner_flags.INIT_FROM.value, settings=settings,
      hooks=[write_operative_config, *hooks])
  if main:
    logging.info('Done at step %d%s: eval %s', result.step,
                 ' (early stopping)' if result.stopped_early else '',
                 ' '.join(f'{k}={v:.4f}' for k, v in
                          result.eval_metrics.items()))
  return 0


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().split('\n')
  message = lines[0].strip() if lines else type(error).__name__
  match = _CONFIGURABLE_RE.search(str(error))
  if match and not isinstance(error, RunnerError):
    message += f" (in gin configurable '{match.group(1)}')"
  return message


def _is_user_error(error: BaseException) -> bool:
  if isinstance(error, (RunnerError, distributed.DistributedConfigError)):
    return True
  # A ValueError/TypeError raised while gin called a configurable with the
  # user's bindings (e.g. models.mlp.features = -3): report it on one line;
  # the traceback is logged at debug level (--verbosity=1).
  return isinstance(error, (ValueError, TypeError)) and bool(
      _CONFIGURABLE_RE.search(str(error)))


def _run_guarded(rest: list[str], hooks=()) -> int:
  try:
    if len(rest) > 1:
      raise RunnerError(f'unexpected arguments: {" ".join(rest[1:])}'
                        ' (flags look like --name=value).')
    distributed.initialize()
    return _train(hooks)
  except loop.Preempted as e:
    logging.warning('%s; exiting with status %d.', e,
                    preemption.PREEMPTED_EXIT_CODE)
    return preemption.PREEMPTED_EXIT_CODE
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
  try:
    rest = parse_flags(argv)
  except RunnerError as e:
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    return 1
  return _run_guarded(rest, hooks)


def _absl_flags_parser(argv):
  try:
    return parse_flags(argv)
  except RunnerError as e:
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def _absl_main(rest):
  sys.exit(_run_guarded(rest))


def run():
  """Console-script entry point (``gintrain``)."""
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())  # as `python -m`: user modules in cwd
  app.run(_absl_main, flags_parser=_absl_flags_parser)


if __name__ == '__main__':
  run()
