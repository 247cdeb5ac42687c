"""``gintrain --help``: the runner's own flags, not absl's ~600.

absl's ``--help`` prints a usage line and exits 1, and ``--helpfull`` buries
the runner's flags among jax's. :func:`help_text` lists the runner's key
flags by group (gin first, then the run's, then the multi-process ones and
those of ``gintrain eval``), each with its help and default, and points to
``--helpfull`` for the rest.
"""

import textwrap

from absl import flags

__all__ = ['HELP_ARGS', 'wants_help', 'help_text']

# Arguments that ask for this help (absl's --helpfull is left to absl).
HELP_ARGS = ('--help', '-h', '-help', '--helpshort', '-?')

_USAGE = """\
gintrain: train, evaluate and inspect gin-configured JAX experiments.

Usage:
  gintrain --workdir=DIR [--gin_file=FILE ...] [--gin.NAME=VALUE ...]
      train (or resume) the run in DIR; default config: gin/default.gin
  gintrain eval --workdir=DIR [--checkpoint=STEP|PATH] [--gin_file=...]
      evaluate a checkpoint with the run's own config; no training
  gintrain ckpt ls DIR | inspect PATH | diff A B | convert SRC DST
      list, look inside (no array data read) and compare checkpoints;
      convert flax msgpack <-> Orbax
  gintrain compare RUN_DIR... --out=PNG
      plot several runs' curves on one figure
  gintrain goodput WORKDIR [--out=PNG]
      where the run's time went, over all its restarts (table and plot)
  gintrain sweep SWEEP_FILE... --sweep_dir=DIR [--parallel=N]
      many runs from one config (grids, random, Optuna); also: sweep
      status DIR, sweep plot DIR
  gintrain sample --workdir=DIR|--hf=FOLDER --prompt=TEXT
      generate text from a trained model (KV cache)
  gintrain tokenizer train|encode|check ...
      train a byte-level BPE, tokenize, check a round trip
  gintrain data prepare --tokenizer=T --out=DIR FILES...
      tokenize a corpus into ArrayRecord shards with a manifest
Each subcommand has its own --help.
"""


def wants_help(argv) -> bool:
  """Whether ``argv[1:]`` asks for help (before any ``--``)."""
  for arg in argv[1:]:
    if arg == '--':
      return False
    if arg in HELP_ARGS:
      return True
  return False


def _flag_lines(flag, aliases) -> list[str]:
  name = f'--{flag.name}'
  if flag.flag_type() == 'bool':
    name = f'--[no]{flag.name}'
  default = flag.default
  if isinstance(default, list):
    default = ','.join(map(str, default))
  extra = f' (default: {default!r})' if default not in (None, '') else ''
  also = aliases.get(flag.name)
  if also:
    extra += f'; alias: --{also}'
  body = textwrap.fill(' '.join(flag.help.split()) + extra, width=76,
                       initial_indent='    ', subsequent_indent='    ')
  return [f'  {name}', body]


def help_text(groups) -> str:
  """The help: usage, then each ``(title, [flag name, ...])`` group.

  Aliases (``--gin_param``) are shown with the flag they stand for.
  """
  fv = flags.FLAGS
  lines = [_USAGE]
  for title, names in groups:
    aliases = {_ALIASES[n]: n for n in names if n in _ALIASES}
    lines.append(f'{title}:')
    for name in names:
      if name not in _ALIASES:
        lines += _flag_lines(fv[name], aliases)
    lines.append('')
  lines.append('Shorthand: --gin.NAME=VALUE is --gin_bindings="NAME=VALUE";'
               ' string values need gin quotes: --gin.optimizer.name="\'sgd\'".')
  lines.append('All flags, absl\'s and jax\'s (--jax_*) included: gintrain'
               ' --helpfull')
  return '\n'.join(lines) + '\n'


# Alias flags and the flag they stand for.
_ALIASES = {'gin_param': 'gin_bindings'}
