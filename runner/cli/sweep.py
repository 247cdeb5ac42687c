r"""``gintrain sweep``: many runs from one gin config, with lineage.

    gintrain sweep SWEEP_FILE... --sweep_dir=DIR [--gin_file=F ...]
        [--gin.NAME=VALUE ...] [other runner flags]
        [--executor=local|slurm|print] [--parallel=N] [--force]
        [--search=grid|optuna --trials=N --sampler=tpe|random
         --pruner=median|none --storage=URL --study=NAME --seed=S]
        [--metric=accuracy] [--goal=max|min]
        [--sbatch_args='--ntasks=2 ...'] [--slurm_wait]
    gintrain sweep status DIR [--metric=accuracy] [--goal=max|min]
        [--format=table|csv|json|md]
    gintrain sweep plot DIR [--out=sweep.png] [--metric=accuracy] [--top=3]
    gintrain sweep trial DIR INDEX      # runs one trial (slurm, print)

The sweep files (:mod:`runner.sweep.spec`; several: their trials together)
are applied on top of the base, the usual ``--gin_file`` /
``--gin_bindings`` / ``--gin.NAME=VALUE`` / ``--gin_search_paths`` flags
(default: gin/default.gin); other runner flags (``--jax_*``, multi-process
flags) go to every trial. Every trial's bindings are parsed before any
trial starts (an unknown binding fails with a did-you-mean, naming the
sweep file line). ``--sweep_dir`` holds one workdir per trial, named by a
hash of its config and a label (:mod:`runner.sweep.trials`); a sweep dir
of a different base config is refused unless ``--force``.

Rerunning the same command skips finished trials, resumes interrupted
ones from their checkpoints and starts the rest; a failed trial is
recorded with its ``gintrain: error:`` line (and retried on a rerun) and
does not stop the others. Any trial reruns alone with
``gintrain --flagfile=DIR/<trial>/flags.txt`` (the runner's own record).

``--search=optuna`` (``pip install 'gintrain[sweep]'``;
:mod:`runner.sweep.search`) samples the sweep file's distributions with
an Optuna study stored in ``DIR/optuna.db`` (or ``--storage``, any
database URL Optuna accepts, for workers on several machines): each
``gintrain sweep`` process on the same study is one more worker, and
together they run ``--trials`` trials.

``status`` prints the table (:mod:`runner.sweep.status`); ``plot`` draws the
metric against each swept binding (``--out``) and the best ``--top``
trials' curves (``<out>-curves.png``, through ``gintrain compare``).

Exit status: 0 when every trial finished (done or pruned), 1 on bad input
or when a trial failed, 130/75 when stopped (Ctrl-C / SIGTERM).
"""

import argparse
import os
import shlex
import sys

from absl import flags as absl_flags

from gintrain.runner.cli import compare
from gintrain.runner.cli import config
from gintrain.runner.cli import configurables  # noqa: F401 (registers them)
from gintrain.runner.cli import flags as runner_flags
from gintrain.runner.errors import RunnerError
from gintrain.runner.sweep import executors
from gintrain.runner.sweep import plot as plot_lib
from gintrain.runner.sweep import spec as spec_lib
from gintrain.runner.sweep import status as status_lib
from gintrain.runner.sweep import trials as trials_lib

__all__ = ['main']

EXECUTORS = ('local', 'slurm', 'print')
_OWN_RUNNER_FLAGS = ('workdir', 'resume', 'dry_run')
_GIN_FLAGS = ('gin_file', 'gin_bindings', 'gin_param', 'gin_search_paths')


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise RunnerError(f'{message} (see gintrain sweep --help)')


def _parse_config(base: trials_lib.Base, bindings) -> str:
  config.parse(base.gin_files, base.gin_bindings + list(bindings),
               base.search_paths)
  return config.config_str()


def _base_from(rest: list) -> trials_lib.Base:
  """The base config from the runner flags left over by argparse.

  Raises:
    RunnerError: an unknown or malformed runner flag, or one the sweep
      sets itself (--workdir, --resume, --dry_run).
  """
  argv = runner_flags.expand_gin_shorthand(list(rest))
  for arg in argv:
    if not arg.startswith('-'):
      raise RunnerError(f'unexpected argument {arg!r} (sweep files come'
                        ' first; runner flags look like --name=value).')
    name = arg.lstrip('-').split('=', 1)[0]
    if name in _OWN_RUNNER_FLAGS or name.removeprefix('no') == 'dry_run':
      raise RunnerError(f'{arg}: the sweep sets --{name} of each trial'
                        ' itself (each trial\'s workdir is in --sweep_dir).')
  fv = absl_flags.FLAGS
  fv.unparse_flags()
  try:
    fv(['gintrain sweep', *argv])
  except absl_flags.Error as e:
    raise RunnerError(str(e)) from e
  files = runner_flags.GIN_FILE.value or [config.DEFAULT_GIN_FILE]
  files = [os.path.abspath(f) if os.path.isfile(f) else f for f in files]
  paths = [os.path.abspath(p) for p in runner_flags.GIN_SEARCH_PATHS.value
           or []]
  others = [a for a in argv if a.lstrip('-').split('=', 1)[0] not in
            _GIN_FLAGS]
  base = trials_lib.Base(files, list(runner_flags.GIN_BINDINGS.value or []),
                         paths, others)
  fv.unparse_flags()
  return base


def _run_parser() -> _Parser:
  p = _Parser(prog='gintrain sweep', description=__doc__.split('\n')[0],
              allow_abbrev=False,
              epilog='Also: gintrain sweep status DIR [--format=table|csv|'
              'json|md]; gintrain sweep plot DIR [--out=PNG]; gintrain sweep'
              ' trial DIR INDEX. Runner flags (--gin_file, --gin.NAME=VALUE,'
              ' --jax_*, ...) go to every trial.')
  p.add_argument('sweep_files', nargs='+', metavar='SWEEP_FILE')
  p.add_argument('--sweep_dir', required=True,
                 help='directory of the sweep: one workdir per trial')
  p.add_argument('--executor', default='local', choices=EXECUTORS)
  p.add_argument('--parallel', type=int, default=1,
                 help='local: trials at once (CPUs and GPUs split)')
  p.add_argument('--force', action='store_true',
                 help='use a sweep dir of a different base config')
  p.add_argument('--metric', default='accuracy')
  p.add_argument('--goal', default=None, choices=('min', 'max'))
  p.add_argument('--search', default='grid', choices=('grid', 'optuna'))
  p.add_argument('--trials', type=int, default=None,
                 help='optuna: trials in the study, all workers together')
  p.add_argument('--sampler', default='tpe', choices=('tpe', 'random'))
  p.add_argument('--pruner', default='median', choices=('median', 'none'))
  p.add_argument('--storage', default=None,
                 help='optuna: database URL (default: sqlite in the sweep dir)')
  p.add_argument('--study', default='sweep', help='optuna: the study name')
  p.add_argument('--seed', type=int, default=0, help='optuna: sampler seed')
  p.add_argument('--sbatch_args', default='',
                 help='slurm: extra sbatch options, one shell-quoted string')
  p.add_argument('--sbatch_script', default=None,
                 help='slurm: the batch script (launch/slurm.sbatch)')
  p.add_argument('--slurm_wait', action='store_true',
                 help='slurm: wait for the array job to end')
  return p


def _specs(files) -> list:
  """Each sweep file, as given or else in the shipped gin/ folder
  (``sweeps/digits_lr_seed.sweep``)."""
  out = []
  for name in files:
    shipped = os.path.join(config.REPO_GIN_DIR, name)
    if not os.path.isfile(name) and os.path.isfile(shipped):
      name = shipped
    out.append(spec_lib.parse_file(name))
  return out


def _run(args) -> int:
  parsed, rest = _run_parser().parse_known_args(args)
  base = _base_from(rest)
  specs = _specs(parsed.sweep_files)
  sweep = trials_lib.SweepDir(parsed.sweep_dir)
  digest = trials_lib.base_digest(base, _parse_config)
  if parsed.search == 'optuna':
    from gintrain.runner.sweep import search  # pylint: disable=g-import-not-at-top
    if parsed.executor != 'local':
      raise RunnerError('--search=optuna runs its trials here'
                        ' (--executor=local); start more workers on the same'
                        ' --storage to run more at once.')
    sweep.register(base, digest, [], force=parsed.force)
    counts = search.run_study(
        sweep, specs, base, _parse_config, n_trials=parsed.trials,
        parallel=parsed.parallel, storage=parsed.storage,
        study_name=parsed.study, sampler=parsed.sampler,
        pruner=parsed.pruner, seed=parsed.seed, metric=parsed.metric,
        goal=parsed.goal or status_lib.default_goal(parsed.metric))
    return _exit_status(counts, sweep, parsed)
  trials = trials_lib.resolve(
      base, spec_lib.merge(spec_lib.expand(s) for s in specs), _parse_config)
  indices = sweep.register(base, digest, trials, force=parsed.force)
  todo = [i for i, t in zip(indices, trials)
          if trials_lib.trial_status(sweep.trial_dir(t))[0]
          not in trials_lib.FINISHED]
  print(f'gintrain sweep: {len(trials)} trials in {sweep.path},'
        f' {len(trials) - len(todo)} finished, {len(todo)} to run'
        f' ({parsed.executor}).', file=sys.stderr, flush=True)
  if parsed.executor == 'print':
    executors.print_commands(sweep, todo)
    return 0
  if parsed.executor == 'slurm':
    if not todo:
      return 0
    job = executors.submit_slurm(
        sweep, todo, shlex.split(parsed.sbatch_args), parsed.sbatch_script,
        wait=parsed.slurm_wait)
    print(f'gintrain sweep: submitted array job {job} ({len(todo)} tasks);'
          f' gintrain sweep status {sweep.path}', flush=True)
    if not parsed.slurm_wait:
      return 0
    counts = {}
    for i in todo:
      status = trials_lib.trial_status(sweep.trial_dir(trials[
          indices.index(i)]))[0]
      counts[status] = counts.get(status, 0) + 1
    return _exit_status(counts, sweep, parsed)
  counts = executors.run_local(
      sweep, [t for i, t in zip(indices, trials) if i in todo],
      parallel=parsed.parallel)
  return _exit_status(counts, sweep, parsed)


def _exit_status(counts, sweep, parsed) -> int:
  print(status_lib.render(status_lib.rows(sweep, parsed.metric, parsed.goal),
                          parsed.metric), end='', flush=True)
  if counts.get('stopped'):
    return 130
  bad = sum(n for s, n in counts.items()
            if s not in trials_lib.FINISHED and s != 'running')
  return 1 if bad else 0


def _status(args) -> int:
  p = _Parser(prog='gintrain sweep status')
  p.add_argument('sweep_dir')
  p.add_argument('--metric', default='accuracy')
  p.add_argument('--goal', default=None, choices=('min', 'max'))
  p.add_argument('--format', default='table', choices=status_lib.FORMATS)
  parsed = p.parse_args(args)
  sweep = trials_lib.SweepDir(parsed.sweep_dir)
  sweep.load()
  print(status_lib.render(status_lib.rows(sweep, parsed.metric, parsed.goal),
                          parsed.metric, parsed.format), end='', flush=True)
  return 0


def _plot(args) -> int:
  p = _Parser(prog='gintrain sweep plot')
  p.add_argument('sweep_dir')
  p.add_argument('--out', default=None,
                 help='the PNG (default: DIR/sweep.png)')
  p.add_argument('--metric', default='accuracy')
  p.add_argument('--goal', default=None, choices=('min', 'max'))
  p.add_argument('--top', type=int, default=3,
                 help='curves of the best N trials')
  parsed = p.parse_args(args)
  sweep = trials_lib.SweepDir(parsed.sweep_dir)
  sweep.load()
  out = parsed.out or os.path.join(sweep.path, 'sweep.png')
  rows = status_lib.rows(sweep, parsed.metric, parsed.goal)
  plot_lib.plot_metric(rows, parsed.metric, out)
  print(f'Wrote {out}')
  best = [r for r in rows if r[parsed.metric] is not None][:parsed.top]
  if best:
    curves = os.path.splitext(out)[0] + '-curves.png'
    compare.compare([os.path.join(sweep.path, r['trial']) for r in best],
                    curves, labels=[r['label'] or r['trial'] for r in best])
    print(f'Wrote {curves}')
  return 0


def _trial(args) -> int:
  p = _Parser(prog='gintrain sweep trial')
  p.add_argument('sweep_dir')
  p.add_argument('index', nargs='?', default=None,
                 help='the trial\'s index in sweep.json (default:'
                 ' $SLURM_ARRAY_TASK_ID or $GINTRAIN_TRIAL_INDEX)')
  parsed = p.parse_args(args)
  index = parsed.index
  if index is None:
    index = os.environ.get('SLURM_ARRAY_TASK_ID',
                           os.environ.get('GINTRAIN_TRIAL_INDEX'))
  sweep = trials_lib.SweepDir(parsed.sweep_dir)
  trials = sweep.trials()
  try:
    trial = trials[int(index)]
  except (TypeError, ValueError, IndexError):
    raise RunnerError(f'trial index {index!r}: {sweep.path} has trials'
                      f' 0..{len(trials) - 1}.') from None
  return executors.run_one(sweep, trial)


COMMANDS = {'status': _status, 'plot': _plot, 'trial': _trial}


def main(args) -> int:
  """``gintrain sweep ARGS``; returns the exit status."""
  args = list(args)
  try:
    if args and args[0] in COMMANDS:
      return COMMANDS[args[0]](args[1:])
    if args and args[0] == 'run':
      args = args[1:]
    return _run(args)
  except RunnerError as e:
    print(f'gintrain: error: {e}', file=sys.stderr, flush=True)
    return 1
  except SystemExit as e:  # --help
    return int(e.code or 0)


if __name__ == '__main__':
  # `python -m gintrain.runner.cli.sweep trial DIR`: what a sweep's SLURM
  # array job runs under srun (GINTRAIN_MODULE of launch/slurm.sbatch).
  sys.exit(main(sys.argv[1:]))
