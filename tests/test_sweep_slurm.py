"""`gintrain sweep --executor=slurm`: the 3 x 2 digits grid as one array job
through launch/slurm.sbatch on the single-node SLURM of tests/cluster
(slurm_local.sh), one array task per trial; a resubmission submits
nothing."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'sweep_helpers')
GRID = """\
optimizer.learning_rate = [0.003, 0.01, 0.03]
train.seed = [0, 1]
"""
BASE = ['--gin.train.num_epochs=None', '--gin.train.num_steps=20',
        '--gin.train.eval_every=10', '--gin.train.log_every=10',
        '--gin.train.writers=[@writers.jsonl]']


@pytest.mark.skipif(
    not harness.have('slurmctld', 'slurmd', 'sbatch', 'srun', 'munged'),
    reason='SLURM/munge not installed (apt-get install slurmctld slurmd'
    ' slurm-client munge); .ci/run installs them')
@pytest.mark.skipif(os.geteuid() != 0,
                    reason='starting slurmd/munged needs root')
def test_grid_as_a_slurm_array_job(tmp_path):
  cache = tmp_path / 'cache'
  grid = tmp_path / 'grid.sweep'
  grid.write_text(GRID)
  sweep_dir = tmp_path / 'sweep'
  with harness.SlurmCluster() as slurm:
    env = slurm.client_env(harness.env(cache, GINTRAIN_PYTHON=sys.executable))
    command = [sys.executable, '-m', 'gintrain.runner.train', 'sweep',
               str(grid), f'--sweep_dir={sweep_dir}', '--executor=slurm',
               '--slurm_wait', f'--sbatch_args=--chdir={tmp_path}', *BASE]
    result = subprocess.run(command, capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    logs = sorted((sweep_dir / 'slurm').glob('*.out')) if (
        sweep_dir / 'slurm').exists() else []
    text = '\n'.join(p.read_text() for p in logs)
    assert result.returncode == 0, (result.stdout + result.stderr +
                                    text[-4000:])
    assert 'submitted array job' in result.stdout
    job = result.stdout.split('submitted array job ')[1].split()[0]
    # one array task per trial, each its own batch job of slurm.sbatch
    assert len(logs) == 6, [p.name for p in logs]
    assert sorted(p.name for p in logs) == sorted(
        f'{job}_{i}.out' for i in range(6))
    assert text.count('slurm.sbatch: tasks exited with status 0') == 6
    again = subprocess.run(command, capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert '6 finished, 0 to run' in again.stderr
    assert 'submitted' not in again.stdout
  trials = json.load(open(sweep_dir / 'sweep.json'))['trials']
  assert len(trials) == 6
  table = result.stdout
  for trial in trials:
    record = json.load(open(sweep_dir / trial['name'] / 'trial.json'))
    assert record['status'] == 'done' and record['exit_status'] == 0
    assert trial['name'] in table
  assert table.count(' done ') == 6
