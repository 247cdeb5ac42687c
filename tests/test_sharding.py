"""Sharded training: partition rules, FSDP and tensor parallelism over
processes, sharded checkpoints (``_gda``) and elastic resume.

The experiment is a tiny transformer language model on the standard
library's .py files (``SHARD_LM``), 30 steps, a checkpoint every 10 (all
kept). The reference is one process on one device; the sharded runs are 2
processes x 2 CPU devices started by launch/local.sh (with GINTRAIN_SLOW=1
also by Open MPI and a single-node SLURM with no coordinator flag), each on
127.0.0.1 with an explicit port.
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
from gintrain.lib import checkpoints
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


def _relaunch(cache, tmp_path, workdir, logs, gin_file, *args):
  """launch/local.sh in an existing ``workdir``, logs in ``tmp_path/logs``."""
  return harness.Launch(_command(workdir, gin_file, *FAST_FAILURE, *args),
                        tmp_path / logs, environ=harness.env(cache))


def test_sigterm_then_sigkill_then_relaunch_is_bitwise_identical(
    cache, gin_file, tmp_path, fsdp_run):
  """One workdir through both interruptions, each checked on the way, and
  its end state bitwise that of the uninterrupted run (one launch sequence
  instead of two, each resume from scratch):

  1. SIGTERM to local.sh (it forwards it) mid-run: both processes agree on a
     step, write its checkpoint (arrays in ``_gda``) and exit 75;
  2. the relaunch resumes from that checkpoint and is SIGKILLed (local.sh
     and both processes) mid-run: once it wrote checkpoint_20 (right after
     its resume if it resumed past step 20);
  3. the next relaunch resumes from the newest checkpoint and finishes.
  """
  workdir = tmp_path / 'interrupted'
  launch = _relaunch(cache, tmp_path, workdir, 'term_logs', gin_file)
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

  launch = _relaunch(cache, tmp_path, workdir, 'kill_logs', gin_file)
  assert harness.wait_for_resume(launch) == stop
  assert f'checkpoint_{stop} (step {stop})' in launch.log(0)
  if stop < 20:  # killed once it wrote a checkpoint of its own, as a rule
    harness.wait_for_file(workdir / 'checkpoints' / 'checkpoint_20',
                          proc=launch.proc)
  launch.kill()  # SIGKILL local.sh and both processes
  launch.wait()
  assert max(harness.checkpoint_steps(workdir)) < STEPS  # really mid-run

  launch = _relaunch(cache, tmp_path, workdir, 'final_logs', gin_file)
  assert launch.wait() == 0, launch.describe()
  resumed = re.search(r'Resumed from .*checkpoint_(\d+) \(step (\d+)\)',
                      launch.log(0))
  assert resumed and stop <= int(resumed.group(2)) < STEPS, launch.log(0)
  _assert_identical(workdir, fsdp_run[0])


def test_runner_falls_back_past_a_swapped_chunk_on_two_processes(
    cache, gin_file, tmp_path, fsdp_run, capsys):
  """A copy of the uninterrupted run's checkpoints with one slice of the
  embedding in checkpoint_30's arrays swapped for another valid one of the
  same array (a restore without hashes loads it silently): the 2-process
  relaunch moves checkpoint_30 aside naming the array, resumes from
  checkpoint_20 and writes checkpoint_30 again, bit for bit. (Moved here
  from tests/test_sharded_integrity.py: one launch on this module's run and
  compilation cache instead of two launches of its own.)"""
  source = fsdp_run[0]
  # Each save's cost is in the records and ckpt ls counts every file: the
  # msgpack file and two packed files per process (issue 21).
  # (keep-best's save of the best step has a record of its own)
  import test_checkpoint_records as records  # pylint: disable=g-import-not-at-top
  recorded = [r['step'] for r in records._records(str(source))]  # pylint: disable=protected-access
  assert sorted(set(recorded)) == [10, 20, STEPS], recorded
  assert len(recorded) <= 4, recorded
  records.check_records(str(source), recorded, files=5)
  workdir = tmp_path / 'swapped'
  shutil.copytree(source / 'checkpoints', workdir / 'checkpoints')
  # (the copy has no best_checkpoints/, which ls lists too)
  records.check_ls(workdir, capsys, [10, 20, STEPS], files=5)
  ckpts = workdir / 'checkpoints'
  folder = ckpts / f'checkpoint_{STEPS}_gda' / 'packed'
  assert sorted(os.listdir(folder)) == [
      'process_0.bin', 'process_0.json', 'process_1.bin', 'process_1.json']
  index = json.loads((folder / 'process_0.json').read_text())
  a, b = index['arrays']['state/params/Embed_0/embedding']['chunks'][:2]
  with open(folder / 'process_0.bin', 'r+b') as f:
    f.seek(a['offset'])
    da = f.read(a['nbytes'])
    f.seek(b['offset'])
    db = f.read(b['nbytes'])
    assert da != db and len(da) == len(db)
    f.seek(a['offset'])
    f.write(db)
    f.seek(b['offset'])
    f.write(da)

  launch = _relaunch(cache, tmp_path, workdir, 'swapped_logs', gin_file)
  assert launch.wait() == 0, launch.describe()
  log = launch.log(0)
  assert re.search(rf'Skipping checkpoint .*checkpoint_{STEPS}: .*'
                   r'Embed_0/embedding.*does not match its hash', log), log
  assert 'checkpoint_20 (step 20)' in log, log
  corrupt = workdir / runner_ckpt.CORRUPT_DIR
  assert sorted(os.listdir(corrupt)) == [f'checkpoint_{STEPS}',
                                         f'checkpoint_{STEPS}_gda']
  # Trained again from step 20: the same state, bit for bit.
  _assert_identical(workdir, source)


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


# The two launcher tests below (FSDP started by Open MPI and by SLURM) run
# with GINTRAIN_SLOW=1 only: each launcher's detection of the processes (no
# coordinator flag) is shown in CI by tests/test_multihost.py
# (test_mpirun_pmap_with_auto_detection,
# test_slurm_sbatch_auto_detection_preemption_and_requeue), and FSDP over 2
# processes against one device by
# test_fsdp_on_two_processes_matches_one_device_and_writes_gda above; the
# launcher and the partitioner do not meet (36-44 s each, idle, 2 cores).
SLOW = pytest.mark.skipif(
    not os.environ.get('GINTRAIN_SLOW'),
    reason='GINTRAIN_SLOW=1: launcher x FSDP (each part is shown in CI by'
    ' test_multihost and test_fsdp_on_two_processes)')


@SLOW
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


@SLOW
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


def test_fsdp_on_s3_sigkill_and_relaunch_resumes_from_the_store(
    s3, cache, gin_file, tmp_path, fsdp_run):  # pylint: disable=redefined-outer-name
  """2 processes, FSDP, ``--workdir=s3://...``: SIGKILLed (local.sh and both
  processes) mid-run once checkpoint_10 is listed, then relaunched: both
  processes restore from the store (no shared filesystem: process 1's first
  save is the one after the resume step), the arrays are packed objects with
  the commit marker, and the end state is bitwise that of the uninterrupted
  local run. Nothing lands on local disk but the staging files (TMPDIR) of
  the SIGKILLed processes. (The kill-and-relaunch on S3 of
  tests/test_object_store_runner.py, which ran 3 launches of its own, is
  this test.)"""
  s3.create_bucket('shard')
  url = 's3://shard/run'
  staging = tmp_path / 'staging'
  staging.mkdir()
  environ = harness.env(cache, TMPDIR=staging)

  def start(logs):
    return harness.Launch(_command(url, gin_file, *FAST_FAILURE),
                          tmp_path / logs, environ=environ)

  launch = start('killed_logs')
  deadline = time.monotonic() + 240
  while not storage.exists(f'{url}/checkpoints/checkpoint_10'):
    assert launch.proc.poll() is None, launch.describe()
    assert time.monotonic() < deadline, launch.describe()
    time.sleep(0.05)
  launch.kill()
  launch.wait()
  steps = checkpoints.available_steps(f'{url}/checkpoints')
  assert steps and max(steps) < STEPS, steps  # really mid-run
  for step in steps:  # a listed checkpoint's arrays are committed
    assert storage.exists(
        f'{url}/checkpoints/checkpoint_{step}_gda/commit_success.txt')
  launch = start('relaunch_logs')
  assert launch.wait() == 0, launch.describe()
  resumed = max(steps)
  assert f'checkpoint_{resumed} (step {resumed})' in launch.log(0)
  # process 1 resumed too, from the store (it has no other copy): its first
  # save is the one after the resume step, not step 10
  first = re.search(r'Saving checkpoint at step: (\d+)', launch.log(1))
  assert first and int(first.group(1)) == resumed + 10, (
      harness.tail(launch.log(1)))
  gda = f'{url}/checkpoints/checkpoint_{STEPS}_gda'
  assert storage.exists(f'{gda}/commit_success.txt')  # written last
  assert storage.isfile(f'{gda}/packed/process_1.bin')  # the packed layout
  got, want = _url_state(url), _state(fsdp_run[0])
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert not any('s3:' in d for d, _, _ in os.walk(tmp_path))
  # TMPDIR: only staging directories the SIGKILLed processes left (a killed
  # process cannot clean up); the finished run removed its own
  left = os.listdir(staging)
  assert all(n.startswith('gintrain-stage-') for n in left), left
  assert len(left) <= 2, left

