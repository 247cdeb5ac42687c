"""The runner's command-line flags (absl).

    --gin_file=FILE          repeatable; later files win
    --gin_bindings=BINDING   repeatable (alias --gin_param); after the files
    --gin.NAME=VALUE         shorthand for --gin_bindings='NAME=VALUE'
    --gin_search_paths=DIR   repeatable; the repository's gin/ is always searched
    --workdir=DIR            the run's directory
    --resume=auto|never|require
    --init_from=PATH         start from these weights (params only)
    --dry_run                parse, build, print the config; no training

The shorthand is rewritten before absl parses the command line, keeping its
position among the other bindings::

    >>> expand_gin_shorthand(['prog', '--gin.train.num_steps=5', '--x'])
    ['prog', '--gin_bindings=train.num_steps=5', '--x']

absl's ``--jax_*`` flags (``--jax_enable_x64``, ``--jax_platforms``, ...) are
defined too.
"""

import jax
from absl import flags

from gintrain.runner.errors import RunnerError

__all__ = ['GIN_FILE', 'GIN_BINDINGS', 'GIN_SEARCH_PATHS', 'WORKDIR', 'RESUME',
           'INIT_FROM', 'DRY_RUN', 'COMPILATION_CACHE_DIR',
           'ALLOW_CONFIG_CHANGE', 'MEMORY_BUDGET', 'RESUME_MODES',
           'expand_gin_shorthand',
           'FLAG_MODULES', 'ALIASES']

RESUME_MODES = ('auto', 'never', 'require')

GIN_FILE = flags.DEFINE_multi_string(
    'gin_file', None,
    'Gin config file (repeatable; later files override earlier ones). Looked'
    ' up as given, then in --gin_search_paths, then in the repository\'s gin/'
    ' folder. Default: default.gin.')
GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', None,
    'Gin binding such as "train.num_steps = 100" (repeatable; applied after'
    ' the files, in order). Shorthand: --gin.train.num_steps=100.')
flags.DEFINE_alias('gin_param', 'gin_bindings')
GIN_SEARCH_PATHS = flags.DEFINE_multi_string(
    'gin_search_paths', None,
    'Directory to search for gin files and includes (repeatable), before the'
    ' repository\'s gin/ folder.')
WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory of the run: configs, metrics, checkpoints.')
RESUME = flags.DEFINE_enum(
    'resume', 'auto', RESUME_MODES,
    'auto: continue from the latest checkpoint in <workdir>/checkpoints if'
    ' any; never: refuse a workdir that has checkpoints; require: fail'
    ' unless there is one to resume.')
INIT_FROM = flags.DEFINE_string(
    'init_from', None,
    'Checkpoint file or directory whose params start a fresh run (weights'
    ' only; ignored when resuming).')
DRY_RUN = flags.DEFINE_bool(
    'dry_run', False,
    'Parse the gin config, build model, data and optimizer, print the config'
    ' and every unset %gin.REQUIRED, then exit without training.')

COMPILATION_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir', None,
    'JAX persistent compilation cache (a relaunch reads its compiled steps'
    ' back). Default: <user cache dir>/gintrain/jax_cache; \'\' or none: off.'
    ' See runner/training/warm_start.py.')
ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume even though bindings that alter the model, optimizer or data'
    ' changed since the checkpoint (runner/training/resume_guard.py).')
MEMORY_BUDGET = flags.DEFINE_string(
    'memory_budget', None,
    'Bytes per device the train step may use (e.g. 2GiB, 500MB); default:'
    ' the device\'s memory where JAX reports it. Checked before any'
    ' checkpoint I/O (runner/training/memory.py).')

# Modules whose flags are recorded with the run (aliases left out).
FLAG_MODULES = ('gintrain.runner.cli.flags',
                'gintrain.runner.parallel.distributed',
                'gintrain.runner.parallel.preemption',
                'gintrain.runner.parallel.watchdog')
ALIASES = ('gin_param',)

if 'jax_platforms' not in flags.FLAGS:
  jax.config.config_with_absl()

_SHORTHAND = '--gin.'


def expand_gin_shorthand(argv: list[str]) -> list[str]:
  """Rewrites ``--gin.NAME=VALUE`` as ``--gin_bindings=NAME=VALUE``.

  Arguments after ``--`` are left alone.

  Raises:
    RunnerError: a ``--gin.NAME`` without ``=VALUE``.
  """
  out = []
  for i, arg in enumerate(argv):
    if arg == '--':
      return out + list(argv[i:])
    if arg.startswith(_SHORTHAND):
      binding = arg[len(_SHORTHAND):]
      if '=' not in binding or not binding.split('=', 1)[0].strip():
        raise RunnerError(f'{arg}: the shorthand is --gin.NAME=VALUE, e.g.'
                          ' --gin.train.num_steps=100.')
      arg = '--gin_bindings=' + binding
    out.append(arg)
  return out
