"""Multi-process start-up and host-side agreement for the runner.

Call :func:`initialize` once, before anything touches a JAX device. What it
does depends on ``--multiprocess`` (t5x-style flag names):

* ``auto`` (default): run ``jax.distributed.initialize()`` when this process
  was started by SLURM (``srun``) or Open MPI (``mpirun``) with more than one
  task, or when ``--coordinator_address`` / ``--process_count`` /
  ``--process_index`` are given; otherwise stay a plain single process.
* ``on``: always initialize. Values not given as flags are detected by JAX
  (SLURM, Open MPI, Cloud TPU, ...); it is an error if nothing is detected.
* ``off``: never initialize; the coordinator flags are then an error.

Under SLURM and Open MPI no coordinator flag is needed: JAX reads the process
count and index from the launcher's environment and takes the coordinator
host from it. Set ``JAX_COORDINATOR_PORT`` to choose the port (JAX otherwise
derives one from the job id, in 61440-65535) and, on a single host,
``JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT`` to keep it on loopback.

Failure handling: ``--initialization_timeout`` bounds the wait for all
processes at start-up; ``--heartbeat_timeout`` is how long the coordination
service waits before it declares a silent process dead, after which JAX
terminates every other process with "the JAX distributed service detected
fatal errors"; ``--shutdown_timeout`` bounds the exit barrier, and
``--barrier_timeout`` every :func:`barrier` / :func:`all_gather` of this
module. So a dead process never leaves the others hanging.

The host-side helpers (:func:`barrier`, :func:`all_gather`,
:func:`agree_on_step`) use the coordination service's key-value store: they
never touch a device, so they cost no device synchronisation. In a single
process they return at once::

    >>> all_gather('example', 'x')
    ['x']
    >>> agree_on_step('resume', 7)
    7
"""

import dataclasses
import logging
import os
import re
import threading
from typing import Mapping, Optional, Sequence

from absl import flags

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.parallel import signals

__all__ = [
    'DistributedConfigError', 'Plan', 'detect_environment', 'resolve',
    'initialize', 'is_initialized', 'is_main_process', 'barrier',
    'all_gather', 'processes_with_flag', 'agree_on_step', 'barrier_timeout',
    'MULTIPROCESS_MODES', 'QUIET_JAX_LOGGERS', 'quiet_jax_loggers',
]

MULTIPROCESS_MODES = ('auto', 'on', 'off')

_MULTIPROCESS = flags.DEFINE_enum(
    'multiprocess', 'auto', MULTIPROCESS_MODES,
    'auto: call jax.distributed.initialize() under SLURM (srun) or Open MPI'
    ' (mpirun) with more than one task, or when a coordinator flag is given;'
    ' on: always (JAX auto-detects what is not given); off: never.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0\'s coordination service (explicit launches, e.g.'
    ' launch/local.sh). Not needed under SLURM or Open MPI.')
_PROCESS_COUNT = flags.DEFINE_integer(
    'process_count', None, 'Number of processes (explicit launches).',
    lower_bound=1)
_PROCESS_INDEX = flags.DEFINE_integer(
    'process_index', None, 'Index of this process, 0..process_count-1.',
    lower_bound=0)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', 300,
    'Seconds to wait for all processes to connect at start-up.',
    lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100,
    'Seconds without heartbeat after which a process is declared dead and'
    ' all others are terminated.', lower_bound=1)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    'shutdown_timeout', 300,
    'Seconds a finishing process waits for the others at exit.',
    lower_bound=1)
_BARRIER_TIMEOUT = flags.DEFINE_integer(
    'barrier_timeout', 600,
    'Seconds any host-side barrier (preemption agreement, resume step) waits'
    ' for the other processes before failing.', lower_bound=1)

_DEFAULTS = {
    'multiprocess': 'auto', 'coordinator_address': None,
    'process_count': None, 'process_index': None,
    'initialization_timeout': 300, 'heartbeat_timeout': 100,
    'shutdown_timeout': 300, 'barrier_timeout': 600,
}
_KEY_PREFIX = 'gintrain'
_ADDRESS_RE = re.compile(r'^(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})$')
_NAME_RE = re.compile(r'[A-Za-z0-9_.\-]+')  # a barrier's name


class DistributedConfigError(RunnerError, ValueError):
  """The multi-process flags or the launcher's environment are inconsistent
  (a user error: one ``gintrain: error:`` line)."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What :func:`initialize` does.

  Attributes:
    distributed: whether ``jax.distributed.initialize`` is called.
    source: why: ``'off'``, ``'single'`` (no launcher found), ``'flags'``,
      ``'slurm'``, ``'ompi'`` or ``'jax'`` (left to JAX's own detection).
    coordinator_address, process_count, process_index: the values passed
      to JAX; ``None`` lets JAX detect them.
    cluster_detection_method: passed to JAX (``'slurm'``, ``'ompi'`` or
      ``None``).
  """
  distributed: bool
  source: str
  coordinator_address: Optional[str] = None
  process_count: Optional[int] = None
  process_index: Optional[int] = None
  cluster_detection_method: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Environment:
  """A launcher found in the environment variables.

  ``detectable`` is False where JAX cannot find the coordinator by itself
  (Open MPI 5): ``--coordinator_address`` is then required.
  """
  name: str            # 'slurm' or 'ompi'
  process_count: int
  process_index: int
  detectable: bool = True


def _env_int(environ, key):
  value = environ.get(key, '')
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(
        f'Environment variable {key}={value!r} is not an integer.') from None


def detect_environment(environ: Mapping[str, str]) -> Optional[Environment]:
  """The launcher (SLURM step or Open MPI job) described by ``environ``.

  Mirrors what ``jax.distributed.initialize()`` detects. Open MPI 5 (no
  ``OMPI_MCA_orte_hnp_uri``) is returned with ``detectable=False``.

    >>> detect_environment({}) is None
    True
    >>> detect_environment({'SLURM_JOB_ID': '3', 'SLURM_STEP_NODELIST': 'n1',
    ...     'SLURM_NTASKS': '2', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '1'})
    Environment(name='slurm', process_count=2, process_index=1, detectable=True)

  Raises:
    DistributedConfigError: inside an ``sbatch`` script with several tasks
      but not under ``srun``, a set-up JAX would silently miss.
  """
  if 'OMPI_COMM_WORLD_SIZE' in environ:
    size = _env_int(environ, 'OMPI_COMM_WORLD_SIZE')
    rank = _env_int(environ, 'OMPI_COMM_WORLD_RANK')
    return Environment('ompi', size, rank,
                       detectable='OMPI_MCA_orte_hnp_uri' in environ)
  if 'SLURM_JOB_ID' in environ:
    step_keys = ('SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                 'SLURM_LOCALID')
    if all(k in environ for k in step_keys):
      return Environment('slurm', _env_int(environ, 'SLURM_NTASKS'),
                         _env_int(environ, 'SLURM_PROCID'))
    ntasks = _env_int(environ, 'SLURM_NTASKS') if 'SLURM_NTASKS' in environ else 1
    if ntasks > 1:
      raise DistributedConfigError(
          f'SLURM job {environ["SLURM_JOB_ID"]} has SLURM_NTASKS={ntasks} but'
          ' this process was not started by srun (no SLURM_STEP_NODELIST):'
          ' inside an sbatch script start Python with `srun python -m'
          ' runner.train ...`, or pass --multiprocess=off for one process.')
  return None


def _check_address(address):
  match = _ADDRESS_RE.match(address)
  if not match or not 0 < int(match.group(2)) < 65536:
    raise DistributedConfigError(
        f'--coordinator_address={address!r} is not HOST:PORT with a port in'
        ' 1..65535 (e.g. 10.0.0.1:24200 or [::1]:24200).')


def resolve(multiprocess: str = 'auto',
            coordinator_address: Optional[str] = None,
            process_count: Optional[int] = None,
            process_index: Optional[int] = None,
            environ: Optional[Mapping[str, str]] = None) -> Plan:
  """Decides what :func:`initialize` will do; pure, touches no device.

  ``environ`` defaults to ``os.environ``.

    >>> resolve('auto', environ={}).distributed
    False
    >>> resolve('auto', '127.0.0.1:24200', 2, 1, environ={})
    Plan(distributed=True, source='flags', coordinator_address='127.0.0.1:24200', process_count=2, process_index=1, cluster_detection_method=None)

  Raises:
    DistributedConfigError: naming the flag or environment variable at fault.
    validation.ArgumentError: ``--process_count`` below 1.
  """
  environ = os.environ if environ is None else environ
  if multiprocess not in MULTIPROCESS_MODES:
    raise DistributedConfigError(
        f'--multiprocess={multiprocess!r}: expected one of'
        f' {", ".join(MULTIPROCESS_MODES)}.')
  given = {name: value for name, value in (
      ('coordinator_address', coordinator_address),
      ('process_count', process_count),
      ('process_index', process_index)) if value is not None}
  if multiprocess == 'off':
    if given:
      raise DistributedConfigError(
          '--multiprocess=off contradicts '
          + ', '.join(f'--{k}={v}' for k, v in given.items())
          + ': drop them or use --multiprocess=auto.')
    return Plan(False, 'off')
  if coordinator_address is not None:
    _check_address(coordinator_address)
  if process_count is not None:
    validation.check_int('--process_count', process_count, 1)
  if len(given) == 3:
    if not 0 <= process_index < process_count:
      raise DistributedConfigError(
          f'--process_index={process_index} is outside 0..{process_count - 1}'
          f' (--process_count={process_count}).')
    return Plan(True, 'flags', coordinator_address, process_count,
                process_index)
  env = _usable_environment(environ, multiprocess, coordinator_address)
  if given:
    return _partial_flags_plan(given, coordinator_address, process_count,
                               process_index, env)
  if env is not None and (env.process_count > 1 or multiprocess == 'on'):
    return Plan(True, env.name, cluster_detection_method=env.name)
  if multiprocess == 'on':
    return Plan(True, 'jax')
  return Plan(False, 'single')


def _flag_or_default(name, value):
  if value is not None:
    return value
  flag = flags.FLAGS[name]
  return flag.value if flags.FLAGS.is_parsed() else _DEFAULTS[name]


def _usable_environment(environ, multiprocess, coordinator_address):
  """The detected cluster environment, or None when there is none or JAX
  cannot use it (Open MPI 5 without a coordinator: one rank only).

  Raises:
    DistributedConfigError: several such Open MPI ranks, or
      ``--multiprocess=on``, without ``--coordinator_address``.
  """
  env = detect_environment(environ)
  if env is not None and not env.detectable and coordinator_address is None:
    if env.process_count > 1 or multiprocess == 'on':
      raise DistributedConfigError(
          f'Started by Open MPI with {env.process_count} ranks but without'
          ' OMPI_MCA_orte_hnp_uri (Open MPI 5 / PRRTE), which JAX cannot'
          ' auto-detect: pass --coordinator_address=HOST_OF_RANK_0:PORT'
          ' (the process count and index are then read from'
          ' OMPI_COMM_WORLD_SIZE/RANK).')
    return None
  return env


def _partial_flags_plan(given, coordinator_address, process_count,
                        process_index, env) -> Plan:
  """:func:`resolve`'s plan when some process flags are given: the rest
  from the cluster environment ``env`` (None: none detected)."""
  count = process_count if process_count is not None else (
      env.process_count if env else None)
  index = process_index if process_index is not None else (
      env.process_index if env else None)
  missing = [f'--{k}' for k, v in (('process_count', count),
                                   ('process_index', index)) if v is None]
  if coordinator_address is None and env is None:
    missing.insert(0, '--coordinator_address')
  if missing:
    raise DistributedConfigError(
        f'{", ".join("--" + k for k in given)} given but {", ".join(missing)}'
        ' missing, and no SLURM/Open MPI environment to detect them from.')
  if not 0 <= index < count:
    raise DistributedConfigError(
        f'--process_index={index} is outside 0..{count - 1}'
        f' (--process_count={count}).')
  return Plan(True, 'flags', coordinator_address, count, index,
              env.name if env and env.detectable else None)


def initialize(multiprocess: Optional[str] = None,
               coordinator_address: Optional[str] = None,
               process_count: Optional[int] = None,
               process_index: Optional[int] = None,
               initialization_timeout: Optional[int] = None,
               heartbeat_timeout: Optional[int] = None,
               shutdown_timeout: Optional[int] = None) -> Plan:
  """Starts JAX's distributed runtime as the flags say; returns the plan.

  Arguments left ``None`` take their flag's value (or its default when the
  flags are not parsed). Call before any device use; calling it again once
  initialized returns the plan and does nothing.

  When it starts the distributed runtime it also installs
  ``runner.preemption``'s SIGTERM/SIGUSR1 handler (JAX's own SIGTERM
  notifier would otherwise swallow a signal arriving before the training
  loop starts); the flag is then acted on at the first preemption check.
  """
  import jax  # pylint: disable=g-import-not-at-top

  mode = _flag_or_default('multiprocess', multiprocess)
  address = _flag_or_default('coordinator_address', coordinator_address)
  count = _flag_or_default('process_count', process_count)
  index = _flag_or_default('process_index', process_index)
  plan = resolve(mode, address, count, index)
  if not plan.distributed or is_initialized():
    if not plan.distributed:
      logging.info('Single process (multiprocess=%s, %s).', mode, plan.source)
    return plan
  timeouts = dict(
      initialization_timeout=_flag_or_default('initialization_timeout',
                                              initialization_timeout),
      heartbeat_timeout_seconds=_flag_or_default('heartbeat_timeout',
                                                 heartbeat_timeout),
      shutdown_timeout_seconds=_flag_or_default('shutdown_timeout',
                                                shutdown_timeout))
  _start_runtime(plan, timeouts)
  # jax.distributed installs a SIGTERM notifier that only logs: a SIGTERM
  # before the training loop's first preemption check would be swallowed.
  # Take over now, so that it is honoured at that check.
  if threading.current_thread() is threading.main_thread():
    signals.install()
  quiet_jax_loggers()
  logging.info('Process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return plan


def _start_runtime(plan: Plan, timeouts: dict) -> None:
  """``jax.distributed.initialize`` as ``plan`` says, logged.

  Raises:
    DistributedConfigError: ``--multiprocess=on`` with no cluster found.
  """
  import jax  # pylint: disable=g-import-not-at-top
  logging.info(
      'jax.distributed.initialize via %s: coordinator %s, process %s of %s'
      ' (None: detected by JAX); waiting up to %d s for all processes,'
      ' heartbeat timeout %d s.', plan.source, plan.coordinator_address,
      plan.process_index, plan.process_count,
      timeouts['initialization_timeout'],
      timeouts['heartbeat_timeout_seconds'])
  try:
    jax.distributed.initialize(
        plan.coordinator_address, plan.process_count, plan.process_index,
        cluster_detection_method=plan.cluster_detection_method, **timeouts)
  except ValueError as e:
    if plan.source == 'jax':
      raise DistributedConfigError(
          f'--multiprocess=on but JAX found no cluster to join ({e}): pass'
          ' --coordinator_address, --process_count and --process_index, or'
          ' launch with srun/mpirun.') from e
    raise


# JAX modules that log several INFO lines per sharded checkpoint on every
# process ("Error check finished successfully", "Starting commit to storage
# layer", barrier keys, ...): a 2-process run printed dozens per checkpoint
# (issue 18). Their warnings and errors still show.
QUIET_JAX_LOGGERS = ('jax.experimental.array_serialization',)


def quiet_jax_loggers() -> None:
  """Raises :data:`QUIET_JAX_LOGGERS` to WARNING (called by
  :func:`initialize` once the distributed runtime is up)."""
  for name in QUIET_JAX_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


def _client():
  """The coordination-service client, or ``None`` in a single process."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def is_initialized() -> bool:
  """Whether ``jax.distributed`` runs in this process."""
  return _client() is not None


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and config files."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


_counters: dict = {}
_own_keys: dict = {}


def _next_key(name: str) -> str:
  """A key prefix unique per call of ``name``, identical across processes as
  long as every process makes the same sequence of calls (barriers require
  that anyway)."""
  count = _counters.get(name, 0)
  _counters[name] = count + 1
  return f'{_KEY_PREFIX}/{name}/{count}'


def _check_name(name):
  validation.check_name('barrier name', name, 'letters, digits and _.- only',
                        test=_NAME_RE.fullmatch)


def barrier_timeout() -> float:
  """``--barrier_timeout`` in seconds (its default if flags are not parsed)."""
  return float(_flag_or_default('barrier_timeout', None))


def _timeout_ms(timeout_s):
  return int(1000 * _flag_or_default('barrier_timeout', timeout_s))


def barrier(name: str, timeout_s: Optional[float] = None) -> None:
  """Blocks until every process reached ``barrier(name)``; host-side only.

  The same ``name`` may be used again once all processes passed it.

  Raises:
    RuntimeError: naming the barrier, after ``timeout_s`` (default
      ``--barrier_timeout``) if some process never came, or at once if the
      coordination service already knows a process died.
  """
  _check_name(name)
  client = _client()
  if client is None:
    return
  barrier_id = f'{_KEY_PREFIX}/{name}'
  try:
    client.wait_at_barrier(barrier_id, _timeout_ms(timeout_s))
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'Barrier {barrier_id!r} failed (a process died or hangs, or the'
        f' processes disagree on the sequence of barriers): {e}') from e


def _exchange(name, value, timeout_s):
  """Publishes ``value`` (unless None), waits for all, returns {index: str}.

  Deletes this process's key of the previous call of ``name``: every process
  read it before reaching this call's barrier.
  """
  import jax  # pylint: disable=g-import-not-at-top
  _check_name(name)
  client = _client()
  key = _next_key(name)
  if value is not None:
    client.key_value_set(f'{key}/{jax.process_index()}', value)
  barrier(name, timeout_s)
  entries = client.key_value_dir_get(key + '/')
  previous = _own_keys.pop(name, None)
  if previous is not None:
    client.key_value_delete(previous)
  if value is not None:
    _own_keys[name] = f'{key}/{jax.process_index()}'
  return {int(k.rsplit('/', 1)[1]): v for k, v in entries}


def all_gather(name: str, value: str,
               timeout_s: Optional[float] = None) -> list:
  """``value`` (a str) of every process, in process order; host-side only.

  All processes must call it with the same ``name``, in the same order.
  """
  if _client() is None:
    return [value]
  import jax  # pylint: disable=g-import-not-at-top
  entries = _exchange(name, value, timeout_s)
  return [entries[i] for i in range(jax.process_count())]


def processes_with_flag(name: str, flag: bool,
                        timeout_s: Optional[float] = None) -> list:
  """Indices of the processes that passed ``flag=True``; the same list on
  every process. Cheaper than :func:`all_gather` when flags are rare: only
  raised flags are written."""
  if _client() is None:
    return [0] if flag else []
  return sorted(_exchange(name, '1' if flag else None, timeout_s))


def agree_on_step(name: str, step: Optional[int],
                  timeout_s: Optional[float] = None) -> Optional[int]:
  """Checks that every process chose the same ``step`` (or ``None``).

  Use it for the step to resume from: each process computes its latest
  checkpoint; they must all see the same one, or restoring would mix states.

  Raises:
    DistributedConfigError: listing each process's step when they differ
      (typically a checkpoint directory that is not shared by all hosts).
  """
  steps = all_gather(name, 'none' if step is None else str(int(step)),
                     timeout_s)
  if len(set(steps)) > 1:
    raise DistributedConfigError(
        f'Processes disagree on {name}: '
        + ', '.join(f'process {i}: {s}' for i, s in enumerate(steps))
        + '. The checkpoint directory must be the same shared directory on'
        ' every host.')
  return step
