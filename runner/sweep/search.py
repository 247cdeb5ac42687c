"""``--search=optuna``: an Optuna study over the sweep file's distributions.

Needs the ``[sweep]`` extra (``pip install 'gintrain[sweep]'``: optuna).
Each swept binding becomes an Optuna parameter: ``uniform``/``loguniform``
a float (log scale for the latter), ``intuniform`` an int, a list or
``choice`` a categorical over the values' gin text. The study lives in
``<sweep_dir>/optuna.db`` (SQLite) unless ``storage`` names another
database URL; every ``gintrain sweep --search=optuna`` process on it is a
worker, and together they run ``n_trials`` trials: a worker asks for a
trial only while the study holds fewer (counted under the sweep dir's lock,
so two workers on one machine or a shared filesystem never run more).
Worker ``k`` (in the order they joined) seeds its sampler with
``seed + k``, so two workers do not sample the same start-up trials. TPE
samples its first third of the study (2 to 10 trials) at random.

Trials run as any sweep trial (a runner subprocess in its hashed workdir;
a config another worker already finished is not run again, its result is
told; a trial whose worker died, left ``RUNNING`` in the study, is resumed
from its checkpoints by the next worker that asks). While a trial runs, its eval records (``metrics.jsonl``) are
reported to Optuna as intermediate values; when the pruner
(``MedianPruner``: after 3 finished trials, a trial whose metric at a step
is worse than the median of the others' at that step) says so, the trial
gets SIGTERM (the runner checkpoints and exits), its record says
``pruned`` and why, and ``gintrain sweep trial`` would exit with
:data:`runner.sweep.trials.PRUNED_EXIT_CODE`.
"""

import json
import math
import os

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import writers
from gintrain.runner.sweep import executors
from gintrain.runner.sweep import spec as spec_lib
from gintrain.runner.sweep import status as status_lib
from gintrain.runner.sweep import trials as trials_lib

__all__ = ['run_study', 'distributions']

_WORKERS_FILE = 'optuna_workers.json'


def _optuna():
  try:
    import optuna  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise RunnerError("--search=optuna needs optuna: pip install"
                      " 'gintrain[sweep]' (or pip install optuna).") from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  return optuna


def distributions(specs) -> tuple[dict, dict]:
  """``({binding key: optuna distribution}, {binding key: 'file:line'})``
  of the sweep files' axes.

  Raises:
    RunnerError: no axes, an empty list, or a key in two files.
  """
  optuna = _optuna()
  dists, where = {}, {}
  for spec in specs:
    for axis in spec.axes:
      if axis.key in dists:
        raise RunnerError(f'{axis.where}: {axis.key} is swept twice (also at'
                          f' {where[axis.key]}).')
      where[axis.key] = axis.where
      values = axis.values
      if isinstance(values, spec_lib.Distribution):
        if values.kind == 'choice':
          values = values.args[0]
        else:
          lo, hi = values.args
          dists[axis.key] = (
              optuna.distributions.IntDistribution(lo, hi)
              if values.kind == 'intuniform' else
              optuna.distributions.FloatDistribution(
                  lo, hi, log=values.kind == 'loguniform'))
          continue
      if not values:
        raise RunnerError(f'{axis.where}: {axis.key} = [] has no values.')
      choices = list(dict.fromkeys(spec_lib.format_value(v) for v in values))
      dists[axis.key] = optuna.distributions.CategoricalDistribution(choices)
  if not dists:
    raise RunnerError('--search=optuna: the sweep files sweep nothing.')
  return dists, where


def _eval_records(trial_dir, split, name) -> list:
  """``[(step, value)]`` of ``metrics.jsonl`` records of ``split`` with
  ``name`` (finite values), in file order."""
  path = os.path.join(trial_dir, writers.METRICS_FILE)
  out = []
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if (isinstance(record, dict) and record.get('split') == split and
            isinstance(record.get(name), (int, float)) and
            math.isfinite(record[name]) and isinstance(record.get('step'),
                                                        int)):
          out.append((record['step'], float(record[name])))
  except OSError:
    pass
  return out


def _worker_index(sweep) -> int:
  with sweep.locked():
    path = os.path.join(sweep.path, _WORKERS_FILE)
    try:
      with open(path, encoding='utf-8') as f:
        count = int(json.load(f)['workers'])
    except (OSError, ValueError, KeyError, TypeError):
      count = 0
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'workers': count + 1}, f)
  return count


def run_study(sweep, specs, base, parse, n_trials, parallel=1, storage=None,
              study_name='sweep', sampler='tpe', pruner='median', seed=0,
              metric='accuracy', goal='max', environ=None) -> dict:
  """Runs this worker's share of the study; returns ``{status: n}``.

  Raises:
    RunnerError: no ``n_trials``, a bad distribution, optuna missing.
  """
  optuna = _optuna()
  if not n_trials or n_trials < 1:
    raise RunnerError('--search=optuna needs --trials=N (the study\'s size,'
                      ' all workers together).')
  dists, where = distributions(specs)
  storage = storage or f'sqlite:///{os.path.join(sweep.path, "optuna.db")}'
  worker = _worker_index(sweep)
  the_pruner = (optuna.pruners.MedianPruner(n_startup_trials=3)
                if pruner == 'median' else optuna.pruners.NopPruner())
  with sweep.locked():  # creating the tables: one worker at a time
    study = optuna.create_study(
        storage=storage, study_name=study_name, load_if_exists=True,
        direction='maximize' if goal == 'max' else 'minimize',
        sampler=_sampler(optuna, sampler, seed + worker, n_trials),
        pruner=the_pruner)
  worker_trials = _WorkerTrials(optuna, study, sweep, base, parse, n_trials,
                                (dists, where), metric,
                                type(the_pruner).__name__)
  # Trials stopped by a signal stay RUNNING in the study: the next worker
  # on it resumes them from their checkpoints.
  return executors.run_local(sweep, [], parallel=parallel, environ=environ,
                             monitor=worker_trials.monitor,
                             next_trial=worker_trials.next_trial,
                             on_end=worker_trials.on_end)


def _sampler(optuna, name: str, seed: int, n_trials: int):
  """The study's sampler: ``'tpe'`` or ``'random'``, seeded."""
  validation.check_choice('sampler', name, ('tpe', 'random'))
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  # TPE samples at random for its first n_startup_trials (10 by default):
  # a third of a small study, so that TPE itself picks most trials.
  return optuna.samplers.TPESampler(
      seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)))


class _WorkerTrials:
  """This worker's trials of the study: which to run next, their eval
  records reported to Optuna (and pruned), their ends told to it."""

  def __init__(self, optuna, study, sweep, base, parse, n_trials, space,
               metric, pruner_name):
    self.optuna, self.study, self.sweep = optuna, study, sweep
    self.base, self.parse, self.n_trials = base, parse, n_trials
    self.dists, self.where = space
    self.metric, self.pruner_name = metric, pruner_name
    self.split, self.name = status_lib.split_metric(metric)
    self.digest = trials_lib.base_digest(base, parse)
    self.live = {}  # trial name -> (optuna trial, reported steps)
    states = optuna.trial.TrialState
    self.counted = (states.COMPLETE, states.PRUNED, states.FAIL,
                    states.RUNNING)

  def next_trial(self):
    """An interrupted trial of the study (its worker died; resumed from its
    checkpoints), else a new one, else None (the study is full)."""
    with self.sweep.locked():
      trial = self._interrupted()
      return trial if trial is not None else self._new()

  def _interrupted(self):
    """Under the sweep lock: a RUNNING trial whose worker died, or None.
    One whose worker died before registering it is told failed."""
    running = self.optuna.trial.TrialState.RUNNING
    by_name = {t.name: t for t in self.sweep.trials()}
    for frozen in self.study.get_trials(deepcopy=False, states=(running,)):
      trial_name = frozen.user_attrs.get('trial')
      if trial_name in self.live:
        continue
      if trial_name not in by_name:  # its worker died before registering
        self.study.tell(frozen.number,
                        state=self.optuna.trial.TrialState.FAIL)
        continue
      status = trials_lib.trial_status(
          self.sweep.trial_dir(by_name[trial_name]))
      if status[0] == 'interrupted':
        asked = self.optuna.trial.Trial(self.study, frozen._trial_id)  # pylint: disable=protected-access
        self.live[trial_name] = (asked, set(frozen.intermediate_values))
        return by_name[trial_name]
    return None

  def _new(self):
    """Under the sweep lock: a new trial asked of the study and registered
    in the sweep, or None when the study holds ``n_trials``."""
    study = self.study
    if len(study.get_trials(deepcopy=False,
                            states=self.counted)) >= self.n_trials:
      return None
    asked = study.ask(self.dists)
    bindings = {k: (v if isinstance(v, str) else spec_lib.format_value(v))
                for k, v in asked.params.items()}
    label = f't{asked.number:03d},' + spec_lib.label_of(bindings)
    trial_spec = spec_lib.TrialSpec(bindings, label, self.where)
    try:
      trial = trials_lib.resolve(self.base, [trial_spec], self.parse)[0]
    except RunnerError:
      study.tell(asked, state=self.optuna.trial.TrialState.FAIL)
      raise
    self.sweep.register(self.base, self.digest, [trial])
    asked.set_user_attr('trial', trial.name)
    self.live[trial.name] = (asked, set())
    return trial

  def monitor(self, proc) -> None:
    """Reports the running trial's new eval records; prunes it when the
    pruner says so."""
    asked, seen = self.live[proc.trial.name]
    for step, value in _eval_records(proc.dir, self.split, self.name):
      if step in seen:
        continue
      seen.add(step)
      asked.report(value, step)
      if proc.pruned is None and asked.should_prune():
        proc.prune(f'pruned by Optuna ({self.pruner_name}) at step'
                   f' {step}: {self.metric}={value:.4f} is worse than the'
                   ' median of the earlier trials at that step')

  def on_end(self, trial, status) -> None:
    """Tells the study how the trial ended (its last eval value if done)."""
    asked, _ = self.live.pop(trial.name)
    if status == 'running':  # another worker runs it (and will tell)
      return
    if status == 'done':
      points = _eval_records(self.sweep.trial_dir(trial), self.split,
                             self.name)
      if points:
        self.study.tell(asked, points[-1][1], skip_if_finished=True)
        return
      status = 'failed'
    state = {'pruned': self.optuna.trial.TrialState.PRUNED}.get(
        status, self.optuna.trial.TrialState.FAIL)
    self.study.tell(asked, state=state, skip_if_finished=True)
