"""runner.distributed: what --multiprocess & co. decide, and bounded failures.

The decision logic (:func:`resolve`, :func:`detect_environment`) is pure and
tested in this process against made-up launcher environments; starting JAX's
distributed runtime is tested in subprocesses (it can happen once per
process). Real SLURM / Open MPI launches are in tests/test_multihost.py.
"""

import doctest
import os
import subprocess
import sys

import pytest
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.parallel import distributed# pylint: disable=wrong-import-position
from gintrain.runner.parallel.distributed import DistributedConfigError, Plan, resolve  # pylint: disable=wrong-import-position

SRUN_ENV = {'SLURM_JOB_ID': '17', 'SLURM_STEP_NODELIST': 'node[001-002]',
            'SLURM_NTASKS': '4', 'SLURM_PROCID': '3', 'SLURM_LOCALID': '1'}
MPIRUN_ENV = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.0.0.1:34911',
              'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '1',
              'OMPI_COMM_WORLD_LOCAL_RANK': '1'}


def test_doctests():
  result = doctest.testmod(distributed)
  assert result.failed == 0 and result.attempted > 0


def test_flags_have_t5x_names_and_defaults():
  expected = {'multiprocess': 'auto', 'coordinator_address': None,
              'process_count': None, 'process_index': None,
              'initialization_timeout': 300, 'heartbeat_timeout': 100,
              'shutdown_timeout': 300, 'barrier_timeout': 600}
  for name, default in expected.items():
    assert flags.FLAGS[name].default == default, name
  assert set(flags.FLAGS['multiprocess'].parser.enum_values) == {'auto', 'on',
                                                              'off'}


def test_auto_is_single_process_without_launcher():
  assert resolve('auto', environ={}) == Plan(False, 'single')
  # one SLURM task or one MPI rank: nothing to join
  assert not resolve('auto', environ=dict(SRUN_ENV, SLURM_NTASKS='1',
                                          SLURM_PROCID='0')).distributed
  assert not resolve('auto', environ=dict(
      MPIRUN_ENV, OMPI_COMM_WORLD_SIZE='1', OMPI_COMM_WORLD_RANK='0')
                     ).distributed


@pytest.mark.parametrize('environ, name', [(SRUN_ENV, 'slurm'),
                                           (MPIRUN_ENV, 'ompi')])
def test_auto_leaves_detection_to_jax_under_launchers(environ, name):
  plan = resolve('auto', environ=environ)
  assert plan == Plan(True, name, cluster_detection_method=name)


def test_explicit_flags():
  plan = resolve('auto', '127.0.0.1:24200', 2, 1, environ=SRUN_ENV)
  assert plan == Plan(True, 'flags', '127.0.0.1:24200', 2, 1)
  assert resolve('on', '[::1]:24200', 1, 0, environ={}).process_count == 1


def test_partial_flags_complete_from_the_launcher():
  # Open MPI 5 sets no OMPI_MCA_orte_hnp_uri: JAX cannot find the
  # coordinator, but count and index come from OMPI_COMM_WORLD_*.
  ompi5 = {k: v for k, v in MPIRUN_ENV.items() if 'hnp' not in k}
  plan = resolve('auto', 'host0:24200', environ=ompi5)
  assert plan == Plan(True, 'flags', 'host0:24200', 2, 1, None)
  plan = resolve('auto', process_count=4, environ=SRUN_ENV)
  assert plan == Plan(True, 'flags', None, 4, 3, 'slurm')


def test_on_without_anything_defers_to_jax():
  assert resolve('on', environ={}) == Plan(True, 'jax')


@pytest.mark.parametrize('kwargs, environ, match', [
    (dict(multiprocess='sometimes'), {}, '--multiprocess=.sometimes'),
    (dict(multiprocess='off', process_count=2), {},
     '--multiprocess=off contradicts --process_count=2'),
    (dict(coordinator_address='localhost'), {}, 'not HOST:PORT'),
    (dict(coordinator_address='h:70000', process_count=2, process_index=0),
     {}, 'not HOST:PORT'),
    (dict(coordinator_address='h:1', process_count=2, process_index=2), {},
     r'--process_index=2 is outside 0..1'),
    (dict(coordinator_address='h:1'), {},
     '--process_count, --process_index missing'),
    (dict(process_count=2, process_index=0), {},
     '--coordinator_address missing'),
    (dict(), {'SLURM_JOB_ID': '5', 'SLURM_NTASKS': '2'},
     'not started by srun'),
    (dict(), {k: v for k, v in MPIRUN_ENV.items() if 'hnp' not in k},
     'Open MPI 5'),
    (dict(), dict(SRUN_ENV, SLURM_NTASKS='two'), "SLURM_NTASKS='two'"),
])
def test_bad_settings_name_the_culprit(kwargs, environ, match):
  with pytest.raises(DistributedConfigError, match=match):
    resolve(environ=environ, **kwargs)


def test_single_process_helpers_need_no_runtime():
  assert not distributed.is_initialized()
  distributed.barrier('nothing')  # no-op
  assert distributed.all_gather('x', 'v') == ['v']
  assert distributed.processes_with_flag('f', True) == [0]
  assert distributed.processes_with_flag('f', False) == []
  assert distributed.agree_on_step('s', None) is None
  with pytest.raises(ValueError, match='barrier name'):
    distributed.barrier('a/b')


def _run(args, timeout=120, **extra_env):
  return subprocess.run(args, env=harness.env(**extra_env),
                        capture_output=True, text=True, timeout=timeout,
                        cwd=harness.REPO)


def test_runner_reports_bad_multiprocess_setup_in_one_line(tmp_path):
  result = _run([sys.executable, '-m', 'gintrain.runner.train',
                 f'--workdir={tmp_path}', '--multiprocess=on'])
  assert result.returncode == 1, result.stderr
  assert 'gintrain: error: --multiprocess=on but JAX found no cluster' in (
      result.stderr)
  assert 'Traceback' not in result.stderr


def test_missing_peer_fails_within_initialization_timeout():
  # Process 1 of 2 whose coordinator (process 0) never starts: it must give
  # up after --initialization_timeout, not hang.
  port = harness.free_port()
  code = ('from gintrain.runner.parallel import distributed\n'
          f'distributed.initialize("auto", "127.0.0.1:{port}", 2, 1,'
          ' initialization_timeout=2)\n'
          'import jax; jax.devices()\n')
  result = _run([sys.executable, '-c', code], timeout=90)
  assert result.returncode != 0
  assert 'DEADLINE_EXCEEDED' in result.stderr, result.stderr[-2000:]
