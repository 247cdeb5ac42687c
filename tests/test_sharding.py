"""Sharded training: partition rules, FSDP and tensor parallelism over
processes, sharded checkpoints (``_gda``) and elastic resume.

The experiment is a tiny transformer language model on the standard
library's .py files (``SHARD_LM``), 30 steps, a checkpoint every 10 (all
kept). The reference is one process on one device; the sharded runs are 2
processes x 2 CPU devices started by launch/local.sh (and by Open MPI and a
single-node SLURM with no coordinator flag), each on 127.0.0.1 with an
explicit port.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gintrain.lib import checkpoint_io
from gintrain.lib import storage
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints as runner_ckpt
from gintrain.runner.parallel import partitioners
from gintrain.runner.parallel import rules as rules_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 30
SHARD_LM = """
include 'lm.gin'
transformer.width = 32
transformer.depth = 1
transformer.heads = 2
transformer.max_len = 32
text_files.length = 32
text_files.max_eval_examples = 64
train.batch_size = 8
train.num_steps = 30
train.log_every = 10
train.eval_every = 10
train.eval_batch_size = 32
train.actions = []
checkpoint_policy.every_steps = 10
checkpoint_policy.keep = 0
checkpoint_policy.best_metric = 'loss'
checkpoint_policy.best_mode = 'min'
warmup_cosine_decay_schedule.warmup_steps = 5
warmup_cosine_decay_schedule.decay_steps = 200
train.parallelism = @partitioner()
partitioner.rules = 'fsdp'
"""
FAST_FAILURE = ('--heartbeat_timeout=5', '--barrier_timeout=60',
                '--shutdown_timeout=20', '--initialization_timeout=60')
TP = ('--gin.partitioner.mesh_shape={"data": 2, "model": 2}',
      '--gin.partitioner.rules=["tensor_parallel", "fsdp"]')

# -- rules (in process, no devices needed) ---------------------------------


def test_first_matching_rule_wins_for_params_and_their_optimizer_slots():
  rules = rules_lib.resolve([('Dense_0/kernel$', (None, 'model')),
                             ('kernel$', ('data', None))])
  axes = {'data': 2, 'model': 2}
  for prefix in ('params', 'opt_state/0/mu', 'opt_state/0/nu'):
    assert rules_lib.spec_for(f'{prefix}/Dense_0/kernel', (8, 4), rules,
                              axes) == P(None, 'model')
    assert rules_lib.spec_for(f'{prefix}/Dense_1/kernel', (8, 4), rules,
                              axes) == P('data', None)
    assert rules_lib.spec_for(f'{prefix}/Dense_1/bias', (4,), rules,
                              axes) == P()  # no rule: replicated
  assert rules_lib.spec_for('opt_state/0/count', (), rules, axes) == P()


def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays():
  rules = rules_lib.resolve('fsdp')
  axes = {'data': 4}
  assert rules_lib.spec_for('w', (64, 256), rules, axes) == P(None, 'data')
  assert rules_lib.spec_for('w', (256, 64), rules, axes) == P('data')
  # 258 is not divisible by 4: the next largest dimension is split
  assert rules_lib.spec_for('w', (258, 64), rules, axes) == P(None, 'data')
  assert rules_lib.spec_for('w', (255, 65), rules, axes) == P()  # none fits
  assert rules_lib.spec_for('b', (64,), rules, axes) == P()      # small
  assert rules_lib.spec_for('w', (64, 256), rules, {'data': 1}) == P()


def test_tensor_parallel_preset_names_heads_and_hidden_units():
  rules = rules_lib.resolve(['tensor_parallel', 'fsdp'])
  axes = {'data': 2, 'model': 2}
  want = {
      'params/Block_3/Attention_0/query/kernel': ((64, 4, 16),
                                                  P(None, 'model', None)),
      'params/Block_3/Attention_0/out/kernel': ((4, 16, 64),
                                                P('model', None, None)),
      'params/Block_0/Dense_0/kernel': ((64, 256), P(None, 'model')),
      'params/Block_0/Dense_1/kernel': ((256, 64), P('model', None)),
      'params/Embed_0/embedding': ((256, 64), P('data')),  # fsdp after TP
  }
  for path, (shape, spec) in want.items():
    assert rules_lib.spec_for(path, shape, rules, axes) == spec, path


@pytest.mark.parametrize('rule,shape,axes,fault', [
    (('kernel', ('model', None)), (6, 4), {'data': 2, 'model': 4},
     "dimension 0 (6) is not divisible by model (4)"),
    (('kernel', ('expert', None)), (8, 4), {'data': 2},
     "axis 'expert' is not in the mesh"),
    (('kernel', (None, None, 'data')), (8, 4), {'data': 2},
     'the rule has 3 entries for 2 dimensions'),
    (('kernel', (('data', 'model'),)), (6, 4), {'data': 2, 'model': 2},
     'dimension 0 (6) is not divisible by dataxmodel (4)'),
])
def test_a_rule_that_cannot_split_names_parameter_shape_rule_and_mesh(
    rule, shape, axes, fault):
  rules = rules_lib.resolve([rule])
  with pytest.raises(RunnerError) as e:
    rules_lib.spec_for('params/Dense_0/kernel', shape, rules, axes)
  text = str(e.value)
  assert 'params/Dense_0/kernel' in text
  assert f'shape {shape}' in text
  assert repr(rule[0]) in text and repr(rule[1]) in text
  assert f'on the mesh {axes}' in text
  assert fault in text
  assert '\n' not in text


@pytest.mark.parametrize('rules,fault', [
    ('fsdpp', 'unknown preset'),
    ([('(', ())], 'not a regular expression'),
    ([('x', 3)], 'a spec must be a tuple'),
    ([('x', (3,))], 'is not a mesh axis name'),
    ([('x',)], 'must be a (pattern, spec) pair'),
])
def test_bad_rules_fail_with_one_line(rules, fault):
  with pytest.raises(RunnerError, match=re.escape(fault)):
    partitioners.partitioner(rules=rules)


@pytest.mark.parametrize('mesh_shape,fault', [
    ({'model': 2}, "needs a 'data' axis"),
    ({'data': -1, 'model': -1}, 'at most one -1'),
    ({'data': 0}, 'sizes >= 1'),
])
def test_bad_mesh_shapes_fail_with_one_line(mesh_shape, fault):
  with pytest.raises(RunnerError, match=re.escape(fault)):
    partitioners.partitioner(mesh_shape=mesh_shape)


def test_a_partitioner_of_your_own_rules_is_a_few_lines():
  class ShardEmbeddings(partitioners.Sharded):
    """Only the embedding table split; everything else replicated."""

    def __init__(self):
      super().__init__({'data': -1}, [('embedding$', ('data', None))])

  p = ShardEmbeddings()
  assert p.rules[0][1] == ('data', None)
  assert p.name == 'sharded'


# -- end to end: real processes ---------------------------------------------


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def gin_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('gin') / 'shard_lm.gin'
  path.write_text(SHARD_LM)
  return str(path)


def _command(workdir, gin_file, *args):
  return [sys.executable, '-m', 'gintrain.runner.train',
          f'--workdir={workdir}', f'--gin_file={gin_file}', *args]


def _one_process(cache, workdir, gin_file, devices, *args, check=True):
  result = subprocess.run(
      _command(workdir, gin_file, *args), env=harness.env(cache, devices),
      capture_output=True, text=True, timeout=300, cwd=harness.REPO)
  if check:
    assert result.returncode == 0, harness.tail(result.stderr)
  return result


def _launch(cache, tmp_path, name, gin_file, *args):
  workdir = tmp_path / name
  launch = harness.Launch(
      _command(workdir, gin_file, *FAST_FAILURE, *args),
      tmp_path / f'{name}_logs', environ=harness.env(cache))
  return workdir, launch


@pytest.fixture(scope='module')
def reference(cache, gin_file, tmp_path_factory):
  """1 process, 1 device, no partitioner."""
  workdir = tmp_path_factory.mktemp('reference')
  _one_process(cache, workdir, gin_file, 1,
               "--gin.train.parallelism='single'")
  return workdir


@pytest.fixture(scope='module')
def fsdp_run(cache, gin_file, tmp_path_factory):
  """2 processes x 2 devices, FSDP, uninterrupted."""
  workdir, launch = _launch(cache, tmp_path_factory.mktemp('fsdp'), 'run',
                            gin_file)
  assert launch.wait() == 0, launch.describe()
  return workdir, launch


def _state(workdir, step=STEPS):
  """The host arrays of the checkpoint at ``step`` (sharded files read)."""
  path = os.path.join(workdir, 'checkpoints', f'checkpoint_{step}')
  raw = runner_ckpt.read_arrays(path, checkpoint_io.read_checkpoint_file(path))
  return harness.flat(raw['state'])


def _packed_arrays(gda):
  """The arrays of a packed ``_gda`` directory (lib.packed_arrays)."""
  from gintrain.lib import packed_arrays  # pylint: disable=g-import-not-at-top
  return packed_arrays.load_index(str(gda))[0]


def _assert_close(workdir, reference):
  got, want = _state(workdir), _state(reference)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key], np.float64),
                               np.asarray(want[key], np.float64),
                               rtol=1e-4, atol=1e-5, err_msg=key)


def _assert_identical(workdir, reference):
  got, want = _state(workdir), _state(reference)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_fsdp_on_two_processes_matches_one_device_and_writes_gda(
    reference, fsdp_run):
  workdir, launch = fsdp_run
  _assert_close(workdir, reference)
  for step in (10, 20, 30):
    gda = workdir / 'checkpoints' / f'checkpoint_{step}_gda'
    assert gda.is_dir()
    # the split arrays are there (packed: 2 files per process), replicated
    # ones in the msgpack file
    assert 'state/params/Embed_0/embedding' in _packed_arrays(gda)
  assert not (reference / 'checkpoints' / 'checkpoint_30_gda').exists()
  # keep-best (keep_best=1): the evicted best checkpoints' arrays go too
  best = sorted(os.listdir(workdir / 'best_checkpoints'))
  assert len(best) == 2 and best[1] == best[0] + '_gda', best
  assert best == [f'checkpoint_{s}{x}' for s in (reference_best(reference),)
                  for x in ('', '_gda')]
  assert 'parallelism sharded on 4 device(s)' in launch.log(0)


def reference_best(reference):
  """The step of the one-device run's kept best checkpoint."""
  (name,) = os.listdir(reference / 'best_checkpoints')
  return int(name.rsplit('_', 1)[1])


def _dry_run_bytes(cache, gin_file, tmp_path, *args):
  result = _one_process(cache, tmp_path / 'dry', gin_file, 4, '--dry_run',
                        *args)
  match = re.search(r'total state per device: .* \((\d+) bytes\)',
                    result.stdout)
  assert match, result.stdout[-3000:]
  return int(match.group(1)), result.stdout


def test_fsdp_state_bytes_per_device_are_about_a_quarter(cache, gin_file,
                                                         tmp_path):
  fsdp, text = _dry_run_bytes(cache, gin_file, tmp_path)
  replicated, _ = _dry_run_bytes(cache, gin_file, tmp_path,
                                 "--gin.partitioner.rules='replicated'")
  assert 0.25 <= fsdp / replicated < 0.32, (fsdp, replicated)
  assert re.search(r"params/Embed_0/embedding\s+256x32\s+\('data',\)\s+"
                   r'8\.0 KiB', text), text
  # Live buffers: the state as created (jit with out_shardings) and as
  # restored, summed per device.
  script = os.path.join(harness.HERE, 'state_bytes.py')
  result = subprocess.run(
      [sys.executable, script, gin_file], env=harness.env(cache, 4),
      capture_output=True, text=True, timeout=300, cwd=harness.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  live = json.loads(result.stdout.strip().splitlines()[-1])
  assert live['fsdp'] == [fsdp] * 4, (live, fsdp)
  assert live['replicated'] == [replicated] * 4, (live, replicated)


def test_tensor_parallel_on_a_data_by_model_mesh_matches_one_device(
    cache, gin_file, tmp_path, reference):
  workdir, launch = _launch(cache, tmp_path, 'tp', gin_file, *TP)
  assert launch.wait() == 0, launch.describe()
  _assert_close(workdir, reference)
  gda = workdir / 'checkpoints' / 'checkpoint_30_gda'
  assert 'state/params/Block_0/Dense_0/kernel' in _packed_arrays(gda)


def test_sigkill_both_then_relaunch_is_bitwise_identical(cache, gin_file,
                                                         tmp_path, fsdp_run):
  workdir, launch = _launch(cache, tmp_path, 'killed', gin_file)
  harness.wait_for_file(workdir / 'checkpoints' / 'checkpoint_10',
                        proc=launch.proc)
  launch.kill()
  launch.wait()
  assert max(harness.checkpoint_steps(workdir)) < STEPS  # really mid-run
  workdir, launch = _launch(cache, tmp_path, 'killed', gin_file)
  assert launch.wait() == 0, launch.describe()
  resumed = re.search(r'Resumed from .*checkpoint_(\d+) \(step (\d+)\)',
                      launch.log(0))
  assert resumed and 10 <= int(resumed.group(2)) < STEPS, launch.log(0)
  _assert_identical(workdir, fsdp_run[0])


def test_sigterm_checkpoints_exits_75_and_resumes(cache, gin_file, tmp_path,
                                                  fsdp_run):
  workdir, launch = _launch(cache, tmp_path, 'term', gin_file)
  harness.wait_for_file(workdir / 'checkpoints' / 'checkpoint_10',
                        proc=launch.proc)
  os.kill(launch.proc.pid, signal.SIGTERM)  # local.sh forwards it
  assert launch.wait() == harness.PREEMPTED, launch.describe()
  assert launch.statuses() == {0: 75, 1: 75}
  stop = int(re.search(r'Preemption agreed before step (\d+)',
                       launch.log(0)).group(1))
  assert stop < STEPS
  assert (workdir / 'checkpoints' / f'checkpoint_{stop}').exists()
  if stop % 10:
    assert (workdir / 'checkpoints' / f'checkpoint_{stop}_gda').is_dir()
  workdir, launch = _launch(cache, tmp_path, 'term', gin_file)
  assert launch.wait() == 0, launch.describe()
  assert f'(step {stop})' in launch.log(0)
  _assert_identical(workdir, fsdp_run[0])


@pytest.mark.parametrize('devices', [4, 2])
def test_elastic_resume_on_one_process(cache, gin_file, tmp_path, fsdp_run,
                                       reference, devices):
  workdir = tmp_path / f'elastic_{devices}'
  (workdir / 'checkpoints').mkdir(parents=True)
  source = fsdp_run[0] / 'checkpoints'
  shutil.copy(source / 'checkpoint_10', workdir / 'checkpoints')
  shutil.copytree(source / 'checkpoint_10_gda',
                  workdir / 'checkpoints' / 'checkpoint_10_gda')
  result = _one_process(cache, workdir, gin_file, devices)
  assert 'checkpoint_10 (step 10)' in result.stderr
  _assert_close(workdir, reference)


def test_elastic_resume_that_cannot_fit_fails_at_start(cache, gin_file,
                                                       tmp_path, fsdp_run):
  workdir = tmp_path / 'misfit'
  shutil.copytree(fsdp_run[0] / 'checkpoints', workdir / 'checkpoints')
  result = _one_process(
      cache, workdir, gin_file, 3,
      '--gin.partitioner.mesh_shape={"data": 1, "model": 3}',
      '--gin.partitioner.rules=[("embedding$", ("model", None))]',
      check=False)
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines()
            if l.startswith('gintrain: error:')]
  assert errors == [
      "gintrain: error: partition rule ('embedding$', ('model', None))"
      " cannot split params/Embed_0/embedding of shape (256, 32) on the mesh"
      " {'data': 1, 'model': 3}: dimension 0 (256) is not divisible by"
      " model (3)."
  ], result.stderr[-2000:]
  assert 'Training' not in result.stderr  # before any step
  assert sorted(os.listdir(workdir / 'checkpoints')) == sorted(
      os.listdir(fsdp_run[0] / 'checkpoints'))  # nothing lost


@pytest.mark.skipif(not harness.have('mpirun'),
                    reason='Open MPI not installed; .ci/run installs it')
def test_fsdp_under_open_mpi_with_no_coordinator_flag(cache, gin_file,
                                                      tmp_path, reference):
  workdir = tmp_path / 'mpi'
  log = tmp_path / 'mpirun.log'
  with open(log, 'w', encoding='utf-8') as out:
    result = subprocess.run(
        [os.path.join(harness.LAUNCH, 'mpirun.sh'), '-n', '2', '-d', '2',
         '-l', '-p', str(harness.free_port()), '--',
         *_command(workdir, gin_file, *FAST_FAILURE)],
        env=harness.env(cache), stdout=out, stderr=subprocess.STDOUT,
        timeout=300, cwd=harness.REPO)
  text = log.read_text()
  assert result.returncode == 0, harness.tail(text)
  assert text.count('jax.distributed.initialize via ompi') == 2, text
  assert (workdir / 'checkpoints' / 'checkpoint_30_gda').is_dir()
  _assert_close(workdir, reference)


@pytest.mark.skipif(
    not harness.have('slurmctld', 'slurmd', 'sbatch', 'srun', 'munged'),
    reason='SLURM/munge not installed; .ci/run installs them')
@pytest.mark.skipif(os.geteuid() != 0,
                    reason='starting slurmd/munged needs root')
def test_fsdp_under_slurm_with_no_coordinator_flag(cache, gin_file, tmp_path,
                                                   reference):
  workdir = tmp_path / 'slurm'
  output = tmp_path / 'job.out'
  port = harness.free_port()
  with harness.SlurmCluster() as slurm:
    environ = slurm.job_env(cache, port)
    result = subprocess.run(
        ['sbatch', '--wait', '--ntasks=2', '--ntasks-per-node=2',
         f'--chdir={harness.REPO}', f'--output={output}',
         os.path.join(harness.LAUNCH, 'slurm.sbatch'),
         *_command(workdir, gin_file, *FAST_FAILURE)[3:]],
        env=environ, capture_output=True, text=True, timeout=300)
    text = output.read_text() if output.exists() else ''
    assert result.returncode == 0, (result.stderr, text[-5000:])
  assert text.count('jax.distributed.initialize via slurm') == 2, text
  assert (workdir / 'checkpoints' / 'checkpoint_30_gda').is_dir()
  _assert_close(workdir, reference)


# -- on an object store: the _gda arrays through tensorstore's s3 kvstore ---

from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position,wrong-import-order


def _url_state(url, step=STEPS):
  path = f'{url}/checkpoints/checkpoint_{step}'
  raw = runner_ckpt.read_arrays(path, checkpoint_io.read_checkpoint_file(path))
  return harness.flat(raw['state'])


def test_fsdp_on_s3_saves_gda_there_and_resumes_from_it(
    s3, cache, gin_file, tmp_path, fsdp_run):  # pylint: disable=redefined-outer-name
  s3.create_bucket('shard')
  url = 's3://shard/run'
  _, launch = _launch(cache, tmp_path, 'first', gin_file, f'--workdir={url}',
                      '--gin.train.num_steps=20')
  assert launch.wait() == 0, launch.describe()
  gda = f'{url}/checkpoints/checkpoint_20_gda'
  assert storage.exists(f'{gda}/commit_success.txt')  # written last
  assert storage.isfile(f'{gda}/packed/process_1.bin')  # the packed layout
  _, launch = _launch(cache, tmp_path, 'second', gin_file, f'--workdir={url}')
  assert launch.wait() == 0, launch.describe()
  assert 'checkpoint_20 (step 20)' in launch.log(0)  # resumed from S3
  got, want = _url_state(url), _state(fsdp_run[0])
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert not any('s3:' in d for d, _, _ in os.walk(tmp_path))
