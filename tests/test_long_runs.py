"""Issue 22: runs that account for their time and heal themselves.

Resume guard (a changed model width refused, nothing touched; a changed
num_steps resumes), the loss-spike guard (Adam at lr=1e10 rolled back until
max_rollbacks, then exit 1 with the good checkpoints kept; one planted bad
batch rolled back once, ending within 1% of a clean run's loss, bitwise
the same twice), goodput records (parts add up to the wall time, a slow
source shows as input wait, two SIGKILLs show as lost steps and restart
gaps in ``gintrain goodput``) and the compilation cache flag.
"""

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from gintrain.runner import train
from gintrain.runner.actions import spike_guard
from gintrain.runner.cli import goodput as goodput_cli
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.training import goodput
from gintrain.runner.training import memory
from gintrain.runner.training import resume_guard
from gintrain.runner.training import warm_start

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'user_plugins')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--gin.train.num_epochs=None', '--gin.train.log_every=10',
          '--gin.checkpoint_policy.every_steps=10',
          '--gin.train.eval_every=1000', '--compilation_cache_dir=none']


if PLUGINS not in sys.path:  # module-scoped fixtures import long_runs too
  sys.path.insert(0, PLUGINS)


def _run(workdir, *flags):
  return train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                *COMMON, *flags])


def _errors(capsys):
  return [l for l in capsys.readouterr().err.splitlines()
          if l.startswith('gintrain: error:')]


def _records(workdir, split):
  out = []
  for line in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8'):
    record = json.loads(line)
    if record['split'] == split:
      out.append(record)
  return out


def _tree_md5(root):
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.md5(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def good_run(tmp_path_factory):
  """A digits run of 60 steps, checkpoints at 40, 50, 60 (keep=3)."""
  workdir = str(tmp_path_factory.mktemp('good') / 'run')
  assert _run(workdir, '--gin.train.num_steps=60') == 0
  return workdir


# -- resume guard -----------------------------------------------------------


def test_changed_width_refused_num_steps_free(good_run, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  shutil.copytree(good_run, workdir)
  before = _tree_md5(workdir)
  capsys.readouterr()
  assert _run(workdir, '--gin.train.num_steps=70',
              '--gin.mlp.features=(64,)') == 1
  errors = _errors(capsys)
  assert len(errors) == 1, errors
  assert 'gin.mlp.features: (128,) -> (64,)' in errors[0]
  assert '--allow_config_change' in errors[0]
  assert 'num_steps' not in errors[0]  # free: not listed
  assert _tree_md5(workdir) == before  # nothing written, nothing deleted
  # Run length (and logging) changes resume.
  assert _run(workdir, '--gin.train.num_steps=70') == 0
  assert _records(workdir, 'train')[-1]['step'] == 70


def test_resume_guard_classifies_settings():
  assert resume_guard.is_free('gin.train.num_steps')
  assert resume_guard.is_free('gin.checkpoint_policy.keep')
  assert resume_guard.is_free('flags.step_timeout')
  for key in ('gin.train.seed', 'gin.optimizer.learning_rate',
              'gin.train.batch_size', 'gin.mlp.features', 'gin.%LR',
              'gin.train.dataset'):
    assert not resume_guard.is_free(key), key


# -- spike guard ------------------------------------------------------------


def test_adam_lr_1e10_rolls_back_then_stops(good_run, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  shutil.copytree(good_run, workdir)
  capsys.readouterr()
  assert _run(workdir, '--gin.train.num_steps=150',
              '--gin.optimizer.learning_rate=1e10',
              '--allow_config_change') == 1
  errors = _errors(capsys)
  assert len(errors) == 1, errors
  assert 'max_rollbacks=3' in errors[0] and 'loss spike' in errors[0]
  rollbacks = _records(workdir, 'spike_guard')
  assert [r['rolled_back_to'] for r in rollbacks] == [60, 50, 40]
  # The checkpoints from before the spike are all there and restore.
  names = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert names == ['checkpoint_40', 'checkpoint_50', 'checkpoint_60']
  good = checkpoints.read_runner_checkpoint(
      os.path.join(good_run, 'checkpoints', 'checkpoint_60'))
  raw = checkpoints.read_runner_checkpoint(
      os.path.join(workdir, 'checkpoints', 'checkpoint_60'))
  flat = checkpoints.flatten(raw['state']['params'])
  assert all(np.isfinite(v).all() for v in flat.values())
  want = checkpoints.flatten(good['state']['params'])
  assert all(np.array_equal(flat[k], want[k]) for k in want)


BAD = ['--gin_bindings=import long_runs',
       '--gin.train.dataset=@long_runs.SpikyDigits()',
       '--gin.train.num_steps=400', '--gin.train.log_every=5',
       '--gin.checkpoint_policy.every_steps=5']


@pytest.fixture(scope='module')
def clean_and_bad(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad')
  dirs = [str(root / name) for name in ('clean', 'bad1', 'bad2')]
  assert _run(dirs[0], *BAD, '--gin.SpikyDigits.bad_step=0') == 0
  for d in dirs[1:]:
    assert _run(d, *BAD, '--gin.SpikyDigits.bad_step=93') == 0
  return dirs


def test_planted_bad_batch_rolled_back_once(clean_and_bad):
  clean, bad, _ = clean_and_bad
  assert _records(clean, 'spike_guard') == []
  rollbacks = _records(bad, 'spike_guard')
  assert len(rollbacks) == 1
  assert rollbacks[0]['step'] == 95 and rollbacks[0]['rolled_back_to'] == 90
  final_clean = _records(clean, 'eval')[-1]['loss']
  final_bad = _records(bad, 'eval')[-1]['loss']
  assert abs(final_bad - final_clean) <= 0.01 * final_clean, (
      final_bad, final_clean)


def test_same_command_twice_is_bitwise_identical(clean_and_bad):
  _, bad1, bad2 = clean_and_bad
  a = checkpoints.read_runner_checkpoint(
      os.path.join(bad1, 'checkpoints', 'checkpoint_400'))
  b = checkpoints.read_runner_checkpoint(
      os.path.join(bad2, 'checkpoints', 'checkpoint_400'))
  fa, fb = checkpoints.flatten(a['state']), checkpoints.flatten(b['state'])
  assert fa.keys() == fb.keys()
  for key in fa:
    assert np.asarray(fa[key]).tobytes() == np.asarray(fb[key]).tobytes()
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'time'}  # pylint: disable=g-long-lambda
                      for r in rs]
  assert strip(_records(bad1, 'spike_guard')) == strip(
      _records(bad2, 'spike_guard'))
  assert strip(_records(bad1, 'eval')) == strip(_records(bad2, 'eval'))


def test_spike_guard_settings_checked():
  with pytest.raises(RunnerError, match='spike_guard.factor'):
    spike_guard.SpikeGuardPolicy(factor=0.5)
  assert spike_guard.policy_of(False) is None
  assert spike_guard.policy_of(True) == spike_guard.SpikeGuardPolicy()


def test_spike_detection_needs_history_and_factor():
  guard = spike_guard.SpikeGuard(spike_guard.SpikeGuardPolicy(
      factor=4, window=3, min_history=2), None, None, None, None, False)
  assert guard.spike({'loss': 1e9}) is None  # no history yet
  assert guard.spike({'loss': float('nan')})  # never finite: always
  guard.history = [1.0, 1.0, 100.0, 2.0, 2.0]  # the median of the last 3: 2
  assert guard.spike({'loss': 7.9}) is None
  assert guard.spike({'loss': 8.1})


# -- goodput ----------------------------------------------------------------


def test_clock_parts_add_up():
  t = [0.0]
  clock = goodput.Clock(start=0.0, now=lambda: t[0])
  t[0] = 5.0
  clock.begin_loop(0)
  with clock.span('input'):
    t[0] = 6.0
  t[0] = 8.0
  clock.first_step()
  with clock.span('checkpoint'):
    t[0] = 9.0
    with clock.span('eval'):
      t[0] = 10.0
  t[0] = 12.0
  clock.end_loop()
  t[0] = 13.0
  assert clock.seconds() == {'startup': 5.0, 'compile': 2.0, 'step': 2.0,
                             'input': 1.0, 'checkpoint': 1.0, 'eval': 1.0,
                             'agreement': 0.0, 'idle': 1.0}
  record = clock.record()
  assert record['wall_seconds'] == 13.0
  assert record['time_to_first_step'] == 8.0


def test_slow_source_shows_input_wait(tmp_path):
  workdir = str(tmp_path / 'run')
  assert _run(workdir, '--gin_bindings=import long_runs',
              '--gin.train.dataset=@long_runs.SpikyDigits()',
              '--gin.SpikyDigits.delay_s=0.05',
              '--gin.train.num_steps=30') == 0
  records = _records(workdir, 'goodput')
  assert [r['step'] for r in records] == [10, 20, 30, 30]
  for r in records:
    total = sum(r[f'{p}_fraction'] for p in goodput.PARTS)
    assert abs(total - 1) < 0.01, total
    assert r['time_to_first_step'] > 0
  # 30 batches x 50 ms of waiting (the first one counts in compile).
  assert records[-1]['input_seconds'] >= 29 * 0.05
  assert records[-1]['input_fraction'] > records[-1]['checkpoint_fraction']


def test_two_sigkills_show_lost_steps_and_gaps(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  gin = tmp_path / 'kills.gin'
  gin.write_text(f"""
include 'default.gin'
import long_runs
train.num_epochs = None
train.num_steps = 40
train.log_every = 1
train.eval_every = 1000
checkpoint_policy.every_steps = 10
# synchronous saves: checkpoint 20 is on disk when step 27 is killed (an
# async save could still be writing on a loaded machine)
checkpoint_policy.async_save = False
train.actions = [@k1/long_runs.KillAt(), @k2/long_runs.KillAt()]
k1/KillAt.step = 27
k1/KillAt.marker = '{tmp_path / 'k1'}'
k2/KillAt.step = 33
k2/KillAt.marker = '{tmp_path / 'k2'}'
""")
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [PLUGINS, REPO, os.environ.get('PYTHONPATH', '')])}
  cmd = [sys.executable, '-m', 'gintrain.runner.train',
         f'--workdir={workdir}', f'--gin_file={gin}',
         '--compilation_cache_dir=none']
  codes = [subprocess.run(cmd, env=env, capture_output=True, timeout=300,
                          check=False).returncode for _ in range(3)]
  assert codes == [-9, -9, 0], codes
  summary = goodput_cli.summarize(workdir)
  launches = summary['launches']
  # Killed after step 27 (resumed from 20) and after step 33 (from 30).
  assert [(l['start_step'], l['end_step']) for l in launches] == [
      (0, 27), (20, 33), (30, 40)]
  assert [l['lost_steps'] for l in launches] == [7, 3, 0]
  assert summary['total']['lost_steps'] == 10
  assert all(l['gap_seconds'] > 0 for l in launches[:2])
  assert 0 < summary['total']['goodput'] < 1
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', 'goodput', workdir]) == 0
  out = capsys.readouterr().out
  assert '10 steps recomputed' in out and 'total' in out
  with open(os.path.join(workdir, 'goodput.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# -- compilation cache ------------------------------------------------------


def test_compilation_cache_dir_flag(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_compilation_cache_dir
  try:
    assert warm_start.resolve_dir(None) == warm_start.default_dir()
    assert warm_start.enable('none') is None
    assert jax.config.jax_compilation_cache_dir is None
    target = str(tmp_path / 'cache')
    assert warm_start.enable(target) == target
    assert jax.config.jax_compilation_cache_dir == target
    assert os.path.isdir(target)
  finally:
    warm_start.enable(before or 'none')


# -- memory before launch ---------------------------------------------------

LM = ['--gin_file=lm.gin', '--gin.train.num_steps=2', '--gin.train.log_every=1',
      '--gin.train.eval_every=1000', '--gin.text_files.max_eval_examples=64',
      '--gin.train.eval_batch_size=64', '--compilation_cache_dir=none',
      '--gin.transformer.width=64', '--gin.transformer.depth=2',
      '--gin.transformer.max_len=64', '--gin.text_files.length=64',
      '--gin.train.batch_size=8']


def test_lm_over_memory_budget_fails_before_checkpoint_io(tmp_path, capsys):
  workdir = tmp_path / 'run'
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', f'--workdir={workdir}', *LM,
                                '--memory_budget=1MiB']) == 1
  errors = _errors(capsys)
  assert len(errors) == 1, errors
  line = errors[0]
  assert 'the train step needs about' in line
  assert 'budget of 1.00 MiB (--memory_budget=1MiB)' in line
  assert 'largest arrays: params/' in line
  assert 'train.microbatches' in line and 'remat' in line
  assert not (workdir / 'checkpoints').exists()
  assert not (workdir / 'metrics.jsonl').exists()


def test_memory_estimate_within_20_percent_of_live_buffers(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  live = lambda: sum(x.nbytes for x in jax.live_arrays())  # pylint: disable=unnecessary-lambda-assignment
  measured = []

  def after(step):
    if step == 1:
      gc.collect()
      measured.append(live())

  gc.collect()
  base = live()
  assert train.main_with_flags(['gintrain', f'--workdir={tmp_path / "run"}',
                                *LM, '--memory_budget=100GiB'],
                               hooks=[after]) == 0
  est = memory.LAST
  used = measured[0] - base
  print('estimate', est['train']['resident_bytes'], 'live', used)
  assert abs(est['train']['resident_bytes'] - used) <= 0.2 * used, (
      est['train'], used)
  assert est['train']['flops'] > 0 and est['train']['temp_bytes'] > 0


def test_dry_run_prints_memory_and_flops(capsys):
  assert train.main_with_flags(['gintrain', '--dry_run',
                                '--compilation_cache_dir=none']) == 0
  out = capsys.readouterr().out
  assert '# Memory per device' in out
  assert 'train step: arguments' in out and 'FLOPs per step' in out


def test_parse_bytes_errors_name_the_flag():
  assert memory.parse_bytes('2GiB') == 2 * 2**30
  with pytest.raises(RunnerError, match='--memory_budget=.lots.'):
    memory.parse_bytes('lots')


# -- launchers --------------------------------------------------------------


def test_wandb_writer_resumes_the_same_run_id(tmp_path):
  pytest.importorskip('wandb')
  from gintrain.runner.outputs import writers  # pylint: disable=g-import-not-at-top
  ids = []
  for step in (1, 2):  # a launch, then its restart
    with writers.WandbWriter(str(tmp_path), mode='offline') as writer:
      writer.write_scalars(step, {'loss': 1.0 / step})
      ids.append(writer.run.id)
  assert ids[0] == ids[1]
  assert (tmp_path / 'wandb' / 'run_id').read_text().strip() == ids[0]


HANG_ONCE_TASK = '''
import os, sys
marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'attempted')
if not os.path.exists(marker):
  open(marker, 'w').close()
  print('gintrain: error: no training step completed within --step_timeout=5'
        ' s after step 40 (process 0 of 1): hung.', file=sys.stderr,
        flush=True)
  sys.exit(3)
print('finished after the requeue', flush=True)
'''


def _slurm_harness():
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
  import harness  # pylint: disable=g-import-not-at-top
  if not harness.have('slurmctld', 'slurmd', 'sbatch', 'srun', 'munged'):
    pytest.skip('SLURM/munge not installed; .ci/run installs them')
  if os.geteuid() != 0:
    pytest.skip('starting slurmd/munged needs root')
  return harness


def test_slurm_job_exiting_3_once_is_requeued_and_finishes(tmp_path):
  harness = _slurm_harness()
  (tmp_path / 'hang_once.py').write_text(HANG_ONCE_TASK)
  output = tmp_path / 'job.out'
  with harness.SlurmCluster() as slurm:
    environ = slurm.client_env(harness.env(
        GINTRAIN_PYTHON=sys.executable, GINTRAIN_MODULE='hang_once',
        GINTRAIN_STATE_DIR=tmp_path, PYTHONPATH=tmp_path))
    submit = subprocess.run(
        ['sbatch', '--parsable', '--ntasks=1', f'--chdir={tmp_path}',
         f'--output={output}', os.path.join(harness.LAUNCH, 'slurm.sbatch')],
        env=environ, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(';')[0]
    try:
      deadline = time.monotonic() + 200
      released = False
      while True:
        state = slurm.job_field(job, 'JobState')
        restarts = slurm.job_field(job, 'Restarts')
        if state in ('FAILED', 'COMPLETED', 'CANCELLED', 'TIMEOUT'):
          break
        # A requeued job is held for the credential lifetime: start it now.
        if restarts == '1' and state == 'PENDING' and not released:
          released = slurm.run('scontrol', 'update', f'JobId={job}',
                               'StartTime=now+3').returncode == 0
        assert time.monotonic() < deadline, (state, restarts)
        time.sleep(0.2)
    finally:
      slurm.run('scancel', job)
    text = output.read_text()
    assert state == 'COMPLETED', text
    assert slurm.job_field(job, 'Restarts') == '1', text
  assert text.count('requeueing job') == 1, text
  assert 'finished after the requeue' in text, text


def test_resume_guard_leaves_action_and_writer_parameters_free():
  import gin  # pylint: disable=g-import-not-at-top
  from gintrain.runner.actions import base as actions_base  # pylint: disable=g-import-not-at-top
  from gintrain.runner.training import resume_guard  # pylint: disable=g-import-not-at-top

  class ProbeAction(actions_base.Action):
    def __init__(self, step=3):
      self.step = step

  def probe_model(width=3):
    return width

  with gin.unlock_config():
    for fn in (ProbeAction, probe_model):
      try:
        gin.get_configurable(f'guard_probe.{fn.__name__}')
      except ValueError:
        gin.external_configurable(fn, module='guard_probe')

  assert resume_guard.is_free('gin.guard_probe.ProbeAction.step')
  assert resume_guard.is_free('gin.ProbeAction.step')
  assert not resume_guard.is_free('gin.guard_probe.probe_model.width')
  assert not resume_guard.is_free('gin.mlp.features')
  # a configurable this launch does not know (its module not imported)
  assert resume_guard.is_free('gin.no_such_module.KillAt.step')
