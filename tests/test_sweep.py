"""`gintrain sweep`: sweep files, trial naming, bad input, and a real grid on
digits run by the local executor (2 at once), killed with SIGKILL mid-way
and rerun.

Trials are real runner subprocesses (digits, 40 steps, a checkpoint every
10). ``sweep_slow.Pause`` (tests/sweep_helpers) makes each step take
0.05 s so the sweep can be killed while a trial is between checkpoints;
it changes no value, so the resumed trial is compared bitwise with an
uninterrupted run of the same flags.
"""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.cli import sweep as sweep_cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.errors import RunnerError  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.sweep import executors  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.sweep import spec as spec_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.sweep import trials as trials_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'sweep_helpers')
STEPS = 40
BASE = ['--gin_bindings=import sweep_slow',
        '--gin.train.num_epochs=None', f'--gin.train.num_steps={STEPS}',
        '--gin.train.eval_every=10', '--gin.train.log_every=10',
        '--gin.train.writers=[@writers.jsonl]',
        '--gin.checkpoint_policy.every_steps=10',
        '--gin.train.actions=[@sweep_slow.Pause()]']
GRID = """\
# 3 x 2 grid
optimizer.learning_rate = [0.003, 0.01, 0.03]
train.seed = [0, 1]
"""
# The real grid below runs 2 x 2 (trials are mostly process start-up: each
# trial fewer is seconds off the suite; 4 is enough for 2 finished, one
# interrupted and one more to run after the kill).
RUN_GRID = """\
# 2 x 2 grid
optimizer.learning_rate = [0.003, 0.03]
train.seed = [0, 1]
"""
BAD = 'mlp.features = [(-3,)]  # fails when the model is built\n'


def _env(cache, **extra):
  env = harness.env(cache, **extra)
  env['PYTHONPATH'] = os.pathsep.join([HELPERS, env['PYTHONPATH']])
  return env


def sweep_command(*args):
  return [sys.executable, '-m', 'gintrain.runner.train', 'sweep', *args]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(autouse=True)
def _helpers_importable(monkeypatch):
  monkeypatch.syspath_prepend(HELPERS)


# -- sweep files ------------------------------------------------------------


def test_product_zip_random_and_labels():
  spec = spec_lib.parse_text(GRID, 'grid.sweep')
  trials = spec_lib.expand(spec)
  assert len(trials) == 6
  assert trials[0].bindings == {'optimizer.learning_rate': '0.003',
                                'train.seed': '0'}
  assert trials[-1].label == 'learning_rate=0.03,seed=1'
  assert trials[0].where['train.seed'] == 'grid.sweep:3'
  zipped = spec_lib.expand(spec_lib.parse_text(
      "a.x = [1, 2]\nb.y = [(3,), @m.f()]\nsweep.mode = 'zip'\n"))
  assert [t.bindings for t in zipped] == [
      {'a.x': '1', 'b.y': '(3,)'}, {'a.x': '2', 'b.y': '@m.f()'}]
  text = ("a.lr = loguniform(1e-4, 1e-1)\nb.n = intuniform(1, 3)\n"
          "c.w = choice([16, 32])\nsweep.mode = 'random'\n"
          "sweep.samples = 20\nsweep.seed = 7\n")
  first = spec_lib.expand(spec_lib.parse_text(text))
  assert first == spec_lib.expand(spec_lib.parse_text(text))  # seeded
  lrs = [float(t.bindings['a.lr']) for t in first]
  assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
  assert min(lrs) < 1e-3 < max(lrs)  # log-uniform, not uniform
  assert {t.bindings['b.n'] for t in first} == {'1', '2', '3'}
  assert {t.bindings['c.w'] for t in first} == {'16', '32'}
  # a list spanning lines, comments
  spec = spec_lib.parse_text('a.x = [1,  # one\n   2]\n')
  assert spec.axes[0].values == [1, 2]


@pytest.mark.parametrize('text, message', [
    ('a.x = []\nb.y = [1]\n', r'demo:1: a.x = \[\] has no values: the product'
     ' is empty'),
    ("a.x = [1]\nb.y = [1, 2]\nsweep.mode = 'zip'\n", 'one length, got a.x:'
     ' 1, b.y: 2'),
    ('a.x = 3\n', r'demo:1: a.x = 3: a sweep value is a list .*--gin.a.x=3'),
    ('a.x = loguniform(0, 1)\n', 'both ends must be > 0'),
    ('a.x = loguniform(1e-3, 1e-1)\n', "sampled only with sweep.mode ="
     " 'random'"),
    ("sweep.mod = 'zip'\n", "unknown setting sweep.mod .did you mean 'mode'"),
    ('a.x = [1]\na.x = [2]\n', 'demo:2: a.x is swept twice .also at demo:1'),
    ('a.x = [adam]\n', "cannot parse the value"),
    ('', 'no swept bindings'),
])
def test_bad_sweep_files(text, message):
  with pytest.raises(RunnerError, match=message):
    spec_lib.expand(spec_lib.parse_text(text, 'demo'))


def test_slots_split_cpus_and_gpus():
  slots = executors.slot_environments(
      2, {'CUDA_VISIBLE_DEVICES': '0,1,2,3'}, cpus=[0, 1, 2, 3, 4, 5])
  assert [cpus for _, cpus in slots] == [[0, 1, 2], [3, 4, 5]]
  assert [env['CUDA_VISIBLE_DEVICES'] for env, _ in slots] == ['0,1', '2,3']
  assert slots[1][0]['OMP_NUM_THREADS'] == '3'
  shared = executors.slot_environments(3, {'CUDA_VISIBLE_DEVICES': '0'},
                                       cpus=[0, 1])
  assert [env['CUDA_VISIBLE_DEVICES'] for env, _ in shared] == ['0'] * 3
  assert shared[0][0]['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.300'
  assert [cpus for _, cpus in shared] == [[0], [1], [0]]
  assert executors._array_spec([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'  # pylint: disable=protected-access


# -- bad input (no trial starts) ---------------------------------------------


def _write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def test_unknown_binding_did_you_mean_before_any_trial(tmp_path, capsys):
  grid = _write(tmp_path / 'grid.sweep', GRID + 'train.sed = [1, 2]\n')
  sweep_dir = tmp_path / 'sweep'
  assert sweep_cli.main([grid, f'--sweep_dir={sweep_dir}']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'gintrain: error: {grid}:4: train.sed:'), err
  assert "did you mean 'seed'?" in err and len(err.split('\n')) == 1
  assert not sweep_dir.exists()  # nothing registered, no trial started
  # an unknown base binding and an unknown flag: one line too
  assert sweep_cli.main([grid, f'--sweep_dir={sweep_dir}',
                         '--gin.optimzer.learning_rate=1']) == 1
  assert "did you mean 'optimizer'?" in capsys.readouterr().err
  assert sweep_cli.main([grid, f'--sweep_dir={sweep_dir}',
                         '--paralel=2']) == 1
  assert 'paralel' in capsys.readouterr().err
  assert sweep_cli.main([grid, f'--sweep_dir={sweep_dir}',
                         '--workdir=/tmp/x']) == 1
  assert 'the sweep sets --workdir' in capsys.readouterr().err
  assert not sweep_dir.exists()


def test_empty_product_is_an_error(tmp_path, capsys):
  empty = _write(tmp_path / 'e.sweep', 'optimizer.learning_rate = []\n'
                 'train.seed = [0, 1]\n')
  assert sweep_cli.main([empty, f'--sweep_dir={tmp_path}/s']) == 1
  err = capsys.readouterr().err
  assert f'{empty}:1: optimizer.learning_rate = [] has no values' in err
  assert not (tmp_path / 's').exists()


def test_other_base_config_refused_unless_force(tmp_path, capsys):
  grid = _write(tmp_path / 'grid.sweep', GRID)
  sweep_dir = tmp_path / 'sweep'
  args = [grid, f'--sweep_dir={sweep_dir}', '--executor=print']
  assert sweep_cli.main(args + ['--gin.train.num_steps=5']) == 0
  first = capsys.readouterr().out.strip().split('\n')
  assert len(first) == 6 and all(' sweep trial ' in line for line in first)
  assert sweep_cli.main(args + ['--gin.train.num_steps=5']) == 0  # same base
  assert capsys.readouterr().out.strip().split('\n') == first
  assert sweep_cli.main(args + ['--gin.train.num_steps=7']) == 1
  err = capsys.readouterr().err
  assert 'holds a sweep of a different base config' in err
  assert '-train.num_steps=5, +train.num_steps=7' in err and '--force' in err
  assert sweep_cli.main(args + ['--gin.train.num_steps=7', '--force']) == 0
  assert len(json.load(open(sweep_dir / 'sweep.json'))['trials']) == 12
  names = [t['name'] for t in json.load(open(sweep_dir / 'sweep.json'))[
      'trials']]
  assert len(set(n.split('-')[0] for n in names)) == 12  # hashed configs


# -- a real grid: parallel, killed, rerun ------------------------------------


def _statuses(sweep_dir):
  sweep = trials_lib.SweepDir(str(sweep_dir))
  if not sweep.exists():
    return {}
  return {t.name: trials_lib.trial_status(sweep.trial_dir(t))[0]
          for t in sweep.trials()}


def _mid_run(sweep_dir, name):
  try:
    steps = harness.checkpoint_steps(os.path.join(sweep_dir, name))
  except OSError:
    return False
  return bool(steps) and max(steps) < STEPS


@pytest.fixture(scope='module')
def grid(cache, tmp_path_factory):
  """The 2 x 2 grid plus one bad trial, 2 at once: SIGKILLed (the sweep
  and its trials) once 2 trials finished and one is mid-run, then rerun."""
  root = tmp_path_factory.mktemp('grid')
  files = [_write(root / 'bad.sweep', BAD),
           _write(root / 'grid.sweep', RUN_GRID)]
  sweep_dir = root / 'sweep'
  command = sweep_command(*files, f'--sweep_dir={sweep_dir}', '--parallel=2',
                          *BASE)
  env = _env(cache)
  first_log = root / 'first.log'
  with open(first_log, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            cwd=root, env=env, start_new_session=True)
    killed_mid = None
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
      states = _statuses(sweep_dir)
      done = [n for n, s in states.items() if s == 'done']
      mid = [n for n, s in states.items() if s == 'running' and
             _mid_run(sweep_dir, n)]
      if len(done) >= 2 and mid:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its trials
        killed_mid = mid
        break
      time.sleep(0.02)
    proc.wait(60)
  assert killed_mid, first_log.read_text()[-3000:]
  before = _statuses(sweep_dir)
  finished = {n: ((sweep_dir / n / 'metrics.jsonl').read_bytes(),
                  (sweep_dir / n / 'trial.json').read_bytes())
              for n, s in before.items() if s == 'done'}
  started = time.monotonic()
  rerun = subprocess.run(command, capture_output=True, text=True, cwd=root,
                         env=env, timeout=400)
  return {'dir': sweep_dir, 'root': root, 'env': env, 'before': before,
          'killed_mid': killed_mid, 'finished': finished, 'rerun': rerun,
          'rerun_s': time.monotonic() - started,
          'first': first_log.read_text()}


def test_grid_rerun_skips_finished_resumes_interrupted(grid):
  rerun = grid['rerun']
  assert rerun.returncode == 1, rerun.stderr[-3000:]  # the bad trial
  after = _statuses(grid['dir'])
  assert len(after) == 5
  assert sorted(after.values()) == ['done'] * 4 + ['failed']
  # interrupted by the kill: the record said running, its process is gone
  for name in grid['killed_mid']:
    assert grid['before'][name] == 'interrupted'
  assert (f'5 trials in {grid["dir"]}, {len(grid["finished"])} finished,'
          f' {5 - len(grid["finished"])} to run') in rerun.stderr
  for name, (metrics, record) in grid['finished'].items():
    assert f'start {name}' not in rerun.stdout
    assert (grid['dir'] / name / 'metrics.jsonl').read_bytes() == metrics
    assert (grid['dir'] / name / 'trial.json').read_bytes() == record
  for name in grid['killed_mid']:
    record = json.load(open(grid['dir'] / name / 'trial.json'))
    assert record['attempts'] == 2 and record['status'] == 'done'
    log = (grid['dir'] / name / 'trial.log').read_text()
    second = log.split('== gintrain sweep: attempt 2')[1]
    assert re.search(r'Resumed from .*checkpoint_\d+ \(step (\d+)\)', second)


def test_resumed_trial_is_bitwise_the_uninterrupted_run(grid, tmp_path):
  name = grid['killed_mid'][0]
  record = json.load(open(grid['dir'] / name / 'trial.json'))
  command = [c if not c.startswith('--workdir=') else f'--workdir={tmp_path}'
             for c in record['command']]
  result = subprocess.run(command, capture_output=True, text=True,
                          cwd=grid['root'], env=grid['env'], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  got = harness.flat(harness.final_state(grid['dir'] / name, STEPS))
  want = harness.flat(harness.final_state(tmp_path, STEPS))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_failed_trial_recorded_with_its_error_line(grid):
  failed = [n for n, s in _statuses(grid['dir']).items() if s == 'failed']
  assert len(failed) == 1
  record = json.load(open(grid['dir'] / failed[0] / 'trial.json'))
  assert record['label'] == 'features=(-3,)'
  assert record['exit_status'] == 1
  assert record['error'] == ('gintrain: error: features must be positive'
                             " integers, got (-3,). (in gin configurable"
                             " 'mlp')")


def test_status_table_formats(grid, capsys):
  sweep_dir = str(grid['dir'])
  assert sweep_cli.main(['status', sweep_dir, '--format=csv']) == 0
  rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
  assert [r['status'] for r in rows] == ['done'] * 4 + ['failed']
  accuracies = [float(r['accuracy']) for r in rows[:4]]
  assert accuracies == sorted(accuracies, reverse=True)  # best first
  assert all(0.5 < a <= 1 for a in accuracies)
  assert {r['step'] for r in rows[:4]} == {str(STEPS)}
  assert rows[-1]['note'].startswith('gintrain: error: features must be')
  assert sweep_cli.main(['status', sweep_dir, '--format=json']) == 0
  data = json.loads(capsys.readouterr().out)
  assert data[0]['accuracy'] == accuracies[0]
  assert data[0]['bindings']['train.seed'] in ('0', '1')
  assert sweep_cli.main(['status', sweep_dir, '--format=md',
                         '--metric=loss']) == 0
  md = capsys.readouterr().out.split('\n')
  assert md[0] == '| trial | label | status | step | loss | note |'
  losses = [float(line.split('|')[5]) for line in md[2:6]]
  assert losses == sorted(losses)  # loss: lowest first
  assert sweep_cli.main(['status', sweep_dir]) == 0
  table = capsys.readouterr().out
  assert table.split('\n')[0].split() == ['trial', 'label', 'status', 'step',
                                          'accuracy', 'note']
  assert sweep_cli.main(['status', str(grid['root'])]) == 1
  assert 'not a sweep directory' in capsys.readouterr().err


def test_plot(grid, tmp_path, capsys):
  out = tmp_path / 'sweep.png'
  assert sweep_cli.main(['plot', str(grid['dir']), f'--out={out}',
                         '--top=2']) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  curves = tmp_path / 'sweep-curves.png'
  assert curves.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert f'Wrote {curves}' in capsys.readouterr().out


def test_print_executor_commands_run_by_hand(grid, cache, tmp_path):
  """`--executor=print` on the grid's sweep dir lists only the trials not
  finished: after --force with one more seed, 3 new ones (and the failed
  one); run by hand, the printed command runs and records a trial."""
  extra = _write(tmp_path / 'seed2.sweep',
                 'optimizer.learning_rate = [0.01]\ntrain.seed = [2]\n')
  printed = subprocess.run(
      sweep_command(extra, os.path.join(grid['root'], 'bad.sweep'),
                    f'--sweep_dir={grid["dir"]}', '--executor=print', *BASE),
      capture_output=True, text=True, cwd=grid['root'], env=grid['env'],
      timeout=120)
  assert printed.returncode == 0, printed.stderr
  lines = printed.stdout.strip().split('\n')
  assert len(lines) == 2, lines  # the new trial, the failed one
  assert lines[0].endswith('# learning_rate=0.01,seed=2')
  by_hand = subprocess.run(lines[0].split('  #')[0], shell=True,
                           capture_output=True, text=True, cwd=tmp_path,
                           env=grid['env'], timeout=300)
  assert by_hand.returncode == 0, by_hand.stderr[-3000:]
  statuses = _statuses(grid['dir'])
  assert list(statuses.values()).count('done') == 5
  again = subprocess.run(lines[0].split('  #')[0], shell=True,
                         capture_output=True, text=True, cwd=tmp_path,
                         env=grid['env'], timeout=120)
  assert again.returncode == 0 and ': done' in again.stdout  # skipped


def test_shipped_example_sweep(tmp_path, capsys, monkeypatch):
  """gin/sweeps/digits_lr_seed.sweep, found from any folder, parses on top
  of the default experiment: 6 trials."""
  monkeypatch.chdir(tmp_path)
  assert sweep_cli.main(['sweeps/digits_lr_seed.sweep',
                         f'--sweep_dir={tmp_path}/s', '--executor=print']) == 0
  lines = capsys.readouterr().out.strip().split('\n')
  assert len(lines) == 6
  assert lines[-1].endswith('# learning_rate=0.03,seed=1')


def test_doctests():
  import doctest  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(spec_lib)
  assert result.attempted >= 4 and result.failed == 0
