"""Reliability, round three (issue 18): the README's 2-process
tensor-parallel LM with every built-in action, two jobs on one host, the
step watchdog of 1-process runs and its progress reports, launch docs.

Multi-process runs are real processes on 127.0.0.1 started by
launch/local.sh (ports from tests/cluster/harness.py's range).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.parallel import watchdog  # pylint: disable=wrong-import-position

REPO = harness.REPO
BIN = os.path.dirname(sys.executable)
PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'user_plugins')
PORTS = f'{harness.PORT_RANGE[0]}-{harness.PORT_RANGE[1] - 1}'

# The README's tensor-parallel LM, shortened (a tiny transformer, 6 steps),
# with every built-in action switched on: report and eval (every 3 steps),
# early stopping, keep-best, checkpoints (every 3), the preemption check
# (always on), the profiler (steps 2-3) and samples (lm.gin's action).
SHORT = (
    '--gin.transformer.width=32', '--gin.transformer.depth=1',
    '--gin.transformer.heads=2', '--gin.transformer.max_len=32',
    '--gin.text_files.length=32', '--gin.text_files.max_eval_examples=64',
    '--gin.train.batch_size=8', '--gin.train.num_steps=6',
    '--gin.train.log_every=3', '--gin.train.eval_every=3',
    '--gin.train.eval_batch_size=32', '--gin.checkpoint_policy.every_steps=3',
    "--gin.checkpoint_policy.best_metric='loss'",
    "--gin.train.early_stopping=@runner.early_stopping()",
    '--gin.early_stopping.patience=100', "--gin.train.profile_steps=(2,3)",
    '--gin.write_samples.num=2', '--gin.write_samples.prompt_length=8',
    '--gin.warmup_cosine_decay_schedule.warmup_steps=1',
    '--heartbeat_timeout=10', '--barrier_timeout=120',
    '--shutdown_timeout=30', '--step_timeout=300')


def _readme_sharded_command() -> str:
  """The sharding guide's 2-process tensor-parallel example (one shell
  line; it was the README's)."""
  with open(os.path.join(REPO, 'docs', 'guides', 'sharding.md'),
            encoding='utf-8') as f:
    text = f.read()
  blocks = re.findall(r'^```sh\n(.*?)^```', text, re.M | re.S)
  (block,) = [b for b in blocks if 'launch/local.sh' in b and
              'tensor_parallel.gin' in b]
  lines = [l for l in block.splitlines() if not l.lstrip().startswith('#')]
  return ' '.join(l.rstrip('\\').strip() for l in lines)


def _env(cache, **extra):
  environ = harness.env(cache, GINTRAIN_PORT_RANGE=PORTS, **extra)
  environ['PATH'] = BIN + os.pathsep + environ.get('PATH', '')
  return environ


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def _local_sh(*args, environ, **kwargs):
  return subprocess.run([os.path.join(harness.LAUNCH, 'local.sh'), *args],
                        env=environ, capture_output=True, text=True,
                        cwd=REPO, timeout=120, check=False, **kwargs)


# -- items 2 and 8: every action over 2 processes; two jobs on one host --------


def test_readme_sharded_lm_runs_every_action_beside_a_second_job(
    cache, tmp_path):
  command = _readme_sharded_command()
  assert ' -p ' not in command, command  # item 8: no fixed port
  command = command.replace('/tmp/', f'{tmp_path}/') + ' ' + ' '.join(
      f"'{a}'" if ("'" not in a and ('(' in a or '@' in a)) else
      f'"{a}"' if "'" in a else a for a in SHORT)
  workdir = tmp_path / 'lm_tp'
  out_path = tmp_path / 'readme_job.log'
  environ = _env(cache)
  with open(out_path, 'w', encoding='utf-8') as out:
    first = subprocess.Popen(['bash', '-c', command], env=environ, cwd=REPO,
                             stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
  try:
    deadline = time.monotonic() + 60
    port = None
    while port is None and time.monotonic() < deadline:
      match = re.search(r'coordinator port (\d+)', out_path.read_text())
      port = match and int(match.group(1))
      time.sleep(0.05)
    assert port, out_path.read_text()
    lo, hi = harness.PORT_RANGE
    assert lo <= port < hi
    while harness.port_free(port):  # until process 0's coordinator listens
      assert first.poll() is None and time.monotonic() < deadline + 60, (
          out_path.read_text())
      time.sleep(0.05)
    # A second job on the first one's port: refused at once, one line, and
    # nothing of it starts (the first one is unharmed, checked below).
    marker = tmp_path / 'second_started'
    refused = _local_sh('-p', str(port), '--', 'touch', str(marker),
                        environ=environ)
    assert refused.returncode == 2, refused
    assert refused.stdout == '' and refused.stderr.count('\n') == 1, refused
    assert (f'local.sh: error: -p {port}: port {port} on 127.0.0.1 is in use'
            in refused.stderr), refused.stderr
    assert not marker.exists()
    # A second job with no -p on the same host: its own free port.
    second_dir = tmp_path / 'second'
    second = _local_sh(
        '-n', '2', '-d', '1', '-l', str(tmp_path / 'second_logs'), '--',
        *harness.train_command(second_dir, '--gin.train.num_steps=10',
                               '--gin.slow_synthetic.delay=0',
                               '--heartbeat_timeout=10'),
        environ=environ)
    assert second.returncode == 0, second.stderr + ''.join(
        (tmp_path / 'second_logs' / f'process_{i}.log').read_text()[-2000:]
        for i in range(2))
    second_port = int(re.search(r'coordinator port (\d+)',
                                second.stderr).group(1))
    assert second_port != port
    assert harness.checkpoint_steps(second_dir) == [10]
    status = harness.wait_progress(first, [str(out_path)], timeout=400,
                                   stall_s=200)
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
      first.wait(30)
  output = out_path.read_text()
  assert status == 0, harness.tail(output, 80)
  # Every action did its work, on both processes, to the end.
  assert harness.checkpoint_steps(workdir) == [3, 6]
  assert (workdir / 'checkpoints' / 'checkpoint_6_gda').is_dir()
  assert os.listdir(workdir / 'best_checkpoints')
  samples = (workdir / 'samples.txt').read_text(errors='replace')
  assert samples.count('=== prompt (step 6) ===') == 2, samples
  assert any(files for _, _, files in os.walk(workdir / 'profile'))
  records = [json.loads(l) for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval/loss' in json.dumps(r) or r.get('split') == 'eval'
             for r in records), records[-3:]
  assert 'local.sh: process 0 exited with status 0' in output
  assert 'local.sh: process 1 exited with status 0' in output
  # Item 9: no per-checkpoint chatter of jax's serialization (4 checkpoint
  # writes, 2 of them sharded best copies, on 2 processes).
  assert 'serialization.py' not in output, harness.tail(output, 80)
  assert 'Error check finished' not in output


def test_local_sh_refuses_a_busy_port_with_one_line(tmp_path):
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    marker = tmp_path / 'started'
    result = _local_sh('-n', '1', '-p', str(port), '--', 'touch',
                       str(marker), environ=harness.env())
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f'local.sh: error: -p {port}: port {port} on 127.0.0.1 is in use'
      " (another job's coordinator?); choose another port or leave -p out"
      ' to pick a free one']
  assert not marker.exists()


def test_local_sh_picks_a_free_port_in_the_range(tmp_path):
  marker = tmp_path / 'started'
  result = _local_sh('-n', '1', '--', 'sh', '-c', f'echo "$@" > {marker}',
                     'sh', environ=harness.env(GINTRAIN_PORT_RANGE=PORTS))
  assert result.returncode == 0, result.stderr
  port = int(re.search(r'coordinator port (\d+)', result.stderr).group(1))
  assert harness.PORT_RANGE[0] <= port < harness.PORT_RANGE[1]
  assert f'--coordinator_address=127.0.0.1:{port}' in marker.read_text()


def test_launch_docs_name_files_that_exist():
  """Every repository path named in launch/ exists (item 9)."""
  missing = []
  for name in os.listdir(harness.LAUNCH):
    with open(os.path.join(harness.LAUNCH, name), encoding='utf-8') as f:
      text = f.read()
    for path in set(re.findall(
        r'\b((?:runner|lib|tests|launch|gin|bench|docs)/[\w/.-]+'
        r'\.(?:py|sh|gin|md|sbatch|yaml))', text)):
      if not os.path.exists(os.path.join(REPO, path)):
        missing.append(f'{name}: {path}')
    for module in set(re.findall(r'\b(runner(?:\.\w+)+)\b', text)):
      parts = module.split('.')
      found = False
      for cut in range(len(parts), 0, -1):  # a module, then an attribute
        base = os.path.join(REPO, *parts[:cut])
        if os.path.exists(base + '.py') or os.path.isdir(base):
          found = True
          break
      if not found:
        missing.append(f'{name}: {module}')
  assert not missing, missing


# -- item 5: the step watchdog in 1-process runs -------------------------------


def _tiny_command(workdir, *args):
  return [sys.executable, '-m', 'gintrain.runner.train',
          f'--workdir={workdir}', '--gin_file=run.gin',
          '--gin_file=models/mlp.gin', '--gin_file=datasets/synthetic.gin',
          '--gin_file=optimizers/adam.gin', '--gin.mlp.features=(16,)',
          '--gin.mlp.num_classes=4', '--gin.train.batch_size=32',
          '--gin.train.num_epochs=None', '--gin.train.num_steps=12',
          '--gin.train.log_every=4', '--gin.train.eval_every=4',
          '--gin.checkpoint_policy.every_steps=4', *args]


def test_one_process_hang_reports_progress_then_exits_3(tmp_path):
  environ = harness.env(PYTHONPATH=os.pathsep.join(
      [PLUGINS, harness.env()['PYTHONPATH']]))
  begun = time.monotonic()
  result = subprocess.run(
      _tiny_command(tmp_path / 'w', '--gin_bindings=import faults',
                    '--gin.train.actions=[@faults.HangAt()]',
                    '--gin.HangAt.step=5', '--gin.HangAt.process=0',
                    '--step_timeout=4', '--progress_report_s=1'),
      env=environ, capture_output=True, text=True, timeout=120, cwd=REPO,
      check=False)
  took = time.monotonic() - begun
  err = result.stderr
  assert result.returncode == watchdog.HUNG_EXIT_CODE, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  assert errors == [
      'gintrain: error: no training step completed within --step_timeout=4'
      ' s after step 5 (process 0 of 1): hung; thread stacks above. Exiting'
      ' with status 3 so that the launcher relaunches (resume from the'
      ' latest checkpoint).'], err[-3000:]
  # Progress reports while stuck name where the main thread waits.
  reports = re.findall(r'no step completed for (\d+) s \(after step 5\): the'
                       r' main thread is in ([^\n]*)', err)
  assert len(reports) >= 2, err[-3000:]
  assert all('faults.py' in where for _, where in reports), reports
  assert took < 90


# -- item 5: slurm.sbatch stops requeueing after the same failure twice --------


FAILING_TASK = '''
import sys
print('gintrain: error: no training step completed within --step_timeout=5 s'
      ' after step 40 (process 0 of 1): hung; thread stacks above.',
      file=sys.stderr, flush=True)
sys.exit(3)
'''


def _job_field(slurm, job, field):
  return slurm.job_field(job, field)


@pytest.mark.skipif(
    not harness.have('slurmctld', 'slurmd', 'sbatch', 'srun', 'munged'),
    reason='SLURM/munge not installed (apt-get install slurmctld slurmd'
    ' slurm-client munge); .ci/run installs them')
@pytest.mark.skipif(os.geteuid() != 0,
                    reason='starting slurmd/munged needs root')
def test_slurm_sbatch_requeues_a_hang_once_not_the_same_failure_twice(
    tmp_path):
  (tmp_path / 'hung_task.py').write_text(FAILING_TASK)
  output = tmp_path / 'job.out'
  with harness.SlurmCluster() as slurm:
    environ = slurm.client_env(harness.env(
        GINTRAIN_PYTHON=sys.executable, GINTRAIN_MODULE='hung_task',
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
        state = _job_field(slurm, job, 'JobState')
        restarts = _job_field(slurm, job, 'Restarts')
        if state in ('FAILED', 'COMPLETED', 'CANCELLED', 'TIMEOUT'):
          break
        # SLURM holds a requeued job for the credential lifetime (see
        # tests/test_multihost.py's _release_requeued): start it now.
        if restarts == '1' and state == 'PENDING' and not released:
          released = slurm.run('scontrol', 'update', f'JobId={job}',
                               'StartTime=now+3').returncode == 0
        assert time.monotonic() < deadline, (state, restarts, output.read_text()
                                             if output.exists() else '')
        time.sleep(0.2)
    finally:
      slurm.run('scancel', job)
    text = output.read_text()
    assert state == 'FAILED', text
    assert _job_field(slurm, job, 'ExitCode') == '3:0', text
  assert 'restart 0' in text and 'restart 1' in text, text
  assert 'restart 2' not in text, text
  assert text.count('requeueing job') == 1, text
  assert 'slurm.sbatch: the same failure twice (status 3' in text, text
  assert text.count('gintrain: error: no training step completed') == 2
  assert not list(tmp_path.glob('.gintrain-requeue.*'))  # state removed


# -- item 7: grain state out of range or missing; eval_batch_size -------------


def _grain_source(steps=3):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gintrain.runner.data import base  # pylint: disable=g-import-not-at-top
  from gintrain.runner.data import grain_source  # pylint: disable=g-import-not-at-top
  examples = [{'x': np.array([i], np.int32)} for i in range(64)]
  source = grain_source.GrainSource(examples)
  source.bind(base.Spec(batch_size=8, eval_batch_size=8, seed=3))
  for _ in range(steps):
    source.next_batch()
  return source


def test_grain_state_records_the_step_and_restores():
  import json as json_lib  # pylint: disable=g-import-not-at-top
  state = _grain_source(3).get_state()
  assert state['step'] == 3
  assert json_lib.loads(state['grain'])['next_index'] == 3
  again = _grain_source(0)
  again.set_state(state)
  want = _grain_source(3).next_batch()['x']
  assert (again.next_batch()['x'] == want).all()


@pytest.mark.parametrize('edit, fault', [
    (lambda s: {'grain': json.dumps({'next_index': 10**18}), 'step': 3},
     'grain next_index=1000000000000000000 is out of range (0 to'),
    (lambda s: {'grain': json.dumps({'next_index': -5}), 'step': 3},
     'grain next_index=-5 is out of range'),
    # -1 at the edge (a planted `index < -1` let it through): without the
    # step too, so that the step check cannot catch it instead
    (lambda s: {'grain': json.dumps({'next_index': -1}), 'step': 3},
     'grain next_index=-1 is out of range'),
    (lambda s: {'grain': json.dumps({'next_index': -1})},
     'grain next_index=-1 is out of range'),
    (lambda s: {'grain': json.dumps({'next_index': 0}), 'step': 3},
     'grain next_index=0 differs from the recorded data step 3'),
    (lambda s: {'grain': json.dumps({'next_index': 'x'})},
     "grain next_index='x' is out of range"),
    (lambda s: {}, 'holds no grain iterator state'),
    (lambda s: {'grain': '{not json'}, 'grain iterator state is not JSON'),
])
def test_grain_state_out_of_range_or_missing_is_one_line(edit, fault):
  source = _grain_source(0)
  with pytest.raises(ValueError) as caught:
    source.set_state(edit(source.get_state()))
  assert fault in str(caught.value) and '\n' not in str(caught.value)


def test_eval_batch_rows_are_capped_at_the_eval_set():
  from gintrain.runner.data import arrays, datasets  # pylint: disable=g-import-not-at-top
  from gintrain.runner.training import config  # pylint: disable=g-import-not-at-top
  data = datasets.synthetic(num_train=64, num_test=20, num_features=16,
                            num_classes=4)
  source = arrays.ArraySource(data)
  assert config.eval_batch_rows(10**9, source, 8) == 24
  assert config.eval_batch_rows(8, source, 8) == 8


def test_an_eval_batch_that_cannot_fit_is_one_line_before_training():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gintrain.runner.errors import RunnerError  # pylint: disable=g-import-not-at-top
  from gintrain.runner.training import config  # pylint: disable=g-import-not-at-top
  sample = {'x': np.zeros((4, 64), np.float32), 'y': np.zeros((4,), np.int32)}
  config.check_eval_batch(1024, 1024, sample, memory=2**30)
  with pytest.raises(RunnerError) as caught:
    config.check_eval_batch(10**9, 10**9, sample, process_count=2,
                            memory=24 * 2**30)
  assert str(caught.value) == (
      'train.eval_batch_size=1000000000 is too large: one eval batch of'
      ' 1000000000 rows takes 121.1 GiB of input alone on each host (260'
      " bytes per example), more than half of this host's 24.0 GiB; lower"
      ' it.')


# -- item 9: shortening lm.gin with train.num_steps shortens its decay ---------


@pytest.mark.parametrize('steps', [30, 1500])
def test_lm_gin_cosine_decay_follows_train_num_steps(steps):
  import gin  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import config  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import configurables  # pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  try:
    config.parse(['lm.gin'], [f'train.num_steps = {steps}'])
    schedule = gin.get_configurable('optax.warmup_cosine_decay_schedule')()
    peak = gin.query_parameter('warmup_cosine_decay_schedule.peak_value')
    end = gin.query_parameter('warmup_cosine_decay_schedule.end_value')
    # decayed to its end value exactly at the run's last step
    assert float(schedule(steps)) == pytest.approx(end)
    assert float(schedule(steps // 2)) > end + (peak - end) * 0.3
  finally:
    gin.clear_config()


def test_lm_gin_warmup_is_a_fraction_of_the_run():
  import gin  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import config  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import configurables  # pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  try:
    config.parse(['lm.gin'], [])
    with gin.config_scope('warmup'):
      assert gin.get_configurable('runner.train_steps')() == 100
    assert gin.get_configurable('runner.train_steps')() == 1500
  finally:
    gin.clear_config()


# -- item 10: flax's stale <prefix>tmp in a directory we save to ---------------


@pytest.mark.parametrize('prefix', ['checkpoint_', 'ck-'])
def test_a_stale_flax_tmp_is_removed_by_a_save_a_fresh_one_kept(tmp_path,
                                                                 prefix):
  import warnings  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoint_naming  # pylint: disable=g-import-not-at-top
  from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top
  stale, gda = tmp_path / f'{prefix}tmp', tmp_path / f'{prefix}tmp_gda'
  stale.write_bytes(b'left by a flax save that died')
  gda.mkdir()
  (gda / 'x').write_bytes(b'1')
  old = time.time() - checkpoint_naming.FLAX_TMP_SECONDS - 5
  for p in (stale, gda, gda / 'x'):
    os.utime(p, (old, old))
  fresh_dir = tmp_path / 'fresh'
  fresh_dir.mkdir()
  fresh = fresh_dir / f'{prefix}tmp'
  fresh.write_bytes(b'a flax save writing now')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    checkpoints.save_checkpoint(str(tmp_path), {'a': 1}, 1, prefix=prefix)
    checkpoints.save_checkpoint(str(fresh_dir), {'a': 1}, 1, prefix=prefix)
  assert sorted(os.listdir(tmp_path)) == sorted(['fresh', f'{prefix}1'])
  assert sorted(os.listdir(fresh_dir)) == [f'{prefix}1', f'{prefix}tmp']


# -- item 9: one recipe installs s3fs and a local S3 server together -----------


S3_LOCAL = os.path.join(REPO, 'requirements', 's3-local.txt')


def _requirements(path):
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  with open(path, encoding='utf-8') as f:
    return [Requirement(l.split('#')[0].strip()) for l in f
            if l.split('#')[0].strip()]


def test_s3_local_recipe_is_satisfied_and_consistent_here():
  """Every requirement of the recipe, and every requirement of what it
  pulls in (s3fs -> aiobotocore -> botocore; moto -> boto3 -> botocore),
  holds in this environment: s3fs and moto_server work side by side."""
  import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top
  seen, todo, broken = set(), [(r, set(r.extras)) for r in
                               _requirements(S3_LOCAL)], []
  while todo:
    req, extras = todo.pop()
    name = canonicalize_name(req.name)
    try:
      version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
      broken.append(f'{req} not installed')
      continue
    if not req.specifier.contains(version, prereleases=True):
      broken.append(f'{req} but {name} {version} is installed')
    key = (name, tuple(sorted(extras)))
    if key in seen or name not in (
        'fsspec', 's3fs', 'aiobotocore', 'moto', 'boto3', 'botocore',
        's3transfer', 'flask', 'flask-cors'):
      continue
    seen.add(key)
    for text in metadata.requires(req.name) or []:
      sub = Requirement(text)
      if sub.marker and not any(sub.marker.evaluate({'extra': e})
                                for e in (extras or {''})):
        continue
      todo.append((sub, set(sub.extras)))
  assert not broken, broken
  assert harness.have('moto_server') or __import__('moto.server')


@pytest.mark.skipif(not os.environ.get('GINTRAIN_SLOW'),
                    reason='resolves with pip (about 50 s, needs the index);'
                    ' GINTRAIN_SLOW=1')
def test_s3_local_recipe_resolves_in_one_pip_command(tmp_path):
  report = tmp_path / 'report.json'
  result = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--dry-run', '--quiet',
       '--ignore-installed', '--report', str(report), '-r', S3_LOCAL],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  got = {i['metadata']['name'].lower(): i['metadata']['version']
         for i in json.loads(report.read_text())['install']}
  for name in ('s3fs', 'aiobotocore', 'botocore', 'boto3', 'moto', 'flask'):
    assert name in got, sorted(got)


# -- item 9: the README's Python examples run warning-free, twice in a row -----


def test_readme_python_examples_run_twice_without_warnings(tmp_path):
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    blocks = re.findall(r'^```python\n(.*?)^```', f.read(), re.M | re.S)
  blocks = [b for b in blocks if '@gin.configurable' not in b]
  assert blocks
  environ = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='default')
  environ.pop('XLA_FLAGS', None)
  for body in blocks:
    script = body.replace('/tmp/', f'{tmp_path}/')
    for attempt in (1, 2):
      proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path,
                            env=environ, capture_output=True, text=True,
                            timeout=300, check=False)
      out = proc.stdout + proc.stderr
      assert proc.returncode == 0, f'run {attempt}:\n{script}\n{out[-3000:]}'
      assert 'Warning' not in out, f'run {attempt}:\n{script}\n{out[-3000:]}'


# -- item 5: a checkpoint whose stored step differs from its name --------------


def test_a_checkpoint_whose_step_differs_from_its_name_is_moved_aside(
    tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from tiny import run  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  assert run(workdir) == 0
  ckpts = workdir / 'checkpoints'
  assert harness.checkpoint_steps(workdir) == [4, 8, 12]
  # checkpoint_12 replaced by an older valid one (with its sidecar)
  for name in os.listdir(ckpts):
    if name.endswith('checkpoint_8') or name.startswith('.checkpoint_8.'):
      shutil.copyfile(ckpts / name,
                      ckpts / name.replace('checkpoint_8', 'checkpoint_12'))
  assert run(workdir, '--gin.train.num_steps=16') == 0
  # the mismatched file went aside; the run resumed from the newest
  # consistent checkpoint (8) and finished
  assert 12 not in harness.checkpoint_steps(workdir) or (
      harness.final_state(workdir, 12)['step'] == 12)
  aside = workdir / 'corrupt_checkpoints'
  assert aside.is_dir() and any('checkpoint_12' in n
                                for n in os.listdir(aside)), (
                                    os.listdir(workdir))
  assert int(harness.final_state(workdir, 16)['step']) == 16
  # and a second relaunch does not fail on it ("outdated checkpoint")
  assert run(workdir, '--gin.train.num_steps=16') == 0


def test_the_final_checkpoint_is_written_before_the_final_actions(tmp_path):
  from tiny import run  # pylint: disable=g-import-not-at-top
  seen = {}
  def at_the_end(step):
    if step == 12:  # the last step: the end-of-run actions run now
      seen['final checkpoint'] = (
          tmp_path / 'checkpoints' / 'checkpoint_12').exists()
  assert run(tmp_path, '--gin.checkpoint_policy.every_steps=5',
             hooks=[at_the_end]) == 0
  assert seen == {'final checkpoint': True}
