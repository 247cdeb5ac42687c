"""`gintrain sweep --search=optuna`: two workers sharing one SQLite study in
the sweep dir, pruning fed by the trials' eval records.

The fast test uses the random sampler with a fixed seed (77: worker 0
samples lr 0.047, 0.0037, 0.010, then 3.6e-5; worker 1, seeded 78, starts
with 1.6e-5), and starts the second worker once the first has finished 3
trials, so the 4th and 5th trials have an lr far too small while the
median pruner has its 3 finished trials: they are pruned at their first
eval (step 10 of 40); the 6th is worker 0's 2.2e-5 (pruned) or worker 1's
0.0053, whichever asks first. With GINTRAIN_SLOW=1, a 12-trial TPE study (two workers)
is compared with a 12-trial random search (two workers, same seeds): the
TPE's best accuracy against the random search's median (both printed).
"""

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

optuna = pytest.importorskip('optuna')

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'sweep_helpers')
STEPS = 40
BASE = ['--gin.train.num_epochs=None', f'--gin.train.num_steps={STEPS}',
        '--gin.train.eval_every=10', '--gin.train.log_every=10',
        '--gin.train.writers=[@writers.jsonl]']
PAUSED = ['--gin_bindings=import sweep_slow',
          '--gin.train.actions=[@sweep_slow.Pause()]']
LR = 'optimizer.learning_rate = loguniform(1e-5, 1e-1)\n'


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def _env(cache):
  env = harness.env(cache)
  env['PYTHONPATH'] = os.pathsep.join([HELPERS, env['PYTHONPATH']])
  return env


def _worker(sweep_file, sweep_dir, log, env, *args):
  return subprocess.Popen(
      [sys.executable, '-m', 'gintrain.runner.train', 'sweep', str(sweep_file),
       f'--sweep_dir={sweep_dir}', '--search=optuna', *args],
      stdout=log, stderr=subprocess.STDOUT, env=env,
      cwd=os.path.dirname(sweep_dir))


def _study(sweep_dir):
  return optuna.load_study(study_name='sweep',
                           storage=f'sqlite:///{sweep_dir}/optuna.db')


def _records(sweep_dir):
  out = {}
  for trial in json.load(open(sweep_dir / 'sweep.json'))['trials']:
    path = sweep_dir / trial['name'] / 'trial.json'
    out[trial['name']] = json.load(open(path)) if path.exists() else None
  return out


def _last_step(trial_dir):
  steps = [json.loads(line)['step']
           for line in open(trial_dir / 'metrics.jsonl')]
  return max(steps)


def test_two_workers_share_the_study_and_prune(cache, tmp_path):
  sweep_file = tmp_path / 'lr.sweep'
  sweep_file.write_text(LR)
  sweep_dir = tmp_path / 'sweep'
  env = _env(cache)
  args = ['--trials=6', '--sampler=random', '--seed=77', *BASE, *PAUSED]
  logs = [open(tmp_path / f'worker{i}.log', 'w+', encoding='utf-8')
          for i in range(2)]
  first = _worker(sweep_file, sweep_dir, logs[0], env, *args)
  deadline = time.monotonic() + 400
  while True:  # the second worker joins once 3 trials finished
    assert first.poll() is None and time.monotonic() < deadline, (
        open(tmp_path / 'worker0.log').read()[-3000:])
    done = [r for r in (_records(sweep_dir).values() if (
        sweep_dir / 'sweep.json').exists() else []) if r and
            r['status'] == 'done']
    if len(done) >= 3:
      break
    time.sleep(0.05)
  second = _worker(sweep_file, sweep_dir, logs[1], env, *args)
  for proc in (first, second):
    proc.wait(400)
  texts = [open(tmp_path / f'worker{i}.log').read() for i in range(2)]
  assert first.returncode == 0 and second.returncode == 0, texts
  assert 'gintrain sweep: start' in texts[1]  # the second worker ran trials

  study = _study(sweep_dir)
  states = [t.state for t in study.trials]
  assert len(states) == 6, states  # 6 in total, both workers together
  assert set(states) <= {optuna.trial.TrialState.COMPLETE,
                         optuna.trial.TrialState.PRUNED}
  lrs = [t.params['optimizer.learning_rate'] for t in study.trials]
  assert len(set(lrs)) == 6
  records = _records(sweep_dir)
  assert len(records) == 6  # one workdir per trial, none run twice
  assert all(r['attempts'] == 1 for r in records.values())
  pruned = {n: r for n, r in records.items() if r['status'] == 'pruned'}
  assert len(pruned) in (2, 3), records
  for name, record in pruned.items():
    assert record['exit_status'] == 76
    assert record['reason'].startswith(
        'pruned by Optuna (MedianPruner) at step 10: accuracy=')
    assert _last_step(sweep_dir / name) < STEPS  # stopped early
    assert float(record['bindings']['optimizer.learning_rate']) < 1e-4
  for trial in study.trials:
    if trial.state == optuna.trial.TrialState.PRUNED:
      assert list(trial.intermediate_values) == [10]
    else:
      assert sorted(trial.intermediate_values) == [10, 20, 30, 40]
  status = subprocess.run(
      [sys.executable, '-m', 'gintrain.runner.train', 'sweep', 'status',
       str(sweep_dir), '--format=json'], capture_output=True, text=True,
      env=env, timeout=120)
  rows = json.loads(status.stdout)
  assert rows[0]['status'] == 'done'
  assert rows[0]['accuracy'] == max(t.value for t in study.trials if
                                    t.value is not None and t.state ==
                                    optuna.trial.TrialState.COMPLETE)


@pytest.mark.skipif(not os.environ.get('GINTRAIN_SLOW'),
                    reason='slow (24 trials): GINTRAIN_SLOW=1')
def test_tpe_beats_the_median_of_a_random_search(cache, tmp_path):
  sweep_file = tmp_path / 'lr.sweep'
  sweep_file.write_text(LR)
  env = _env(cache)
  results = {}
  for sampler in ('tpe', 'random'):
    sweep_dir = tmp_path / sampler
    # TPE with the median pruner; the random search runs every trial to
    # the end, so its median is of final accuracies
    args = ['--trials=12', f'--sampler={sampler}', '--seed=0', *BASE,
            *(['--pruner=none'] if sampler == 'random' else [])]
    logs = [open(tmp_path / f'{sampler}{i}.log', 'w', encoding='utf-8')
            for i in range(2)]
    procs = [_worker(sweep_file, sweep_dir, log, env, *args) for log in logs]
    for proc in procs:
      proc.wait(1200)
    for log in logs:
      log.close()
    texts = [open(log.name).read() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], texts
    study = _study(sweep_dir)
    assert len(study.trials) == 12
    records = _records(sweep_dir)
    assert len(records) == 12
    assert all(r['attempts'] == 1 for r in records.values())
    values = [t.value for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE]
    results[sampler] = {
        'best': max(values), 'median_of_finished': statistics.median(values),
        'finished': len(values),
        'pruned': sum(t.state == optuna.trial.TrialState.PRUNED
                      for t in study.trials),
        'lrs': sorted(round(t.params['optimizer.learning_rate'], 6)
                      for t in study.trials)}
  print('optuna 12 trials x 2 workers:', json.dumps(results))
  assert results['random']['finished'] == 12
  assert results['tpe']['best'] > results['random']['median_of_finished']
