"""Where trials run: ``local`` (N at once), ``slurm`` (an array job), ``print``.

* :func:`run_local` runs the trials here, ``parallel`` at a time, each in
  its own runner subprocess (:class:`runner.sweep.trials.TrialProcess`).
  The machine is split between the slots: slot ``k`` of ``N`` gets its own
  CPU cores (affinity, and ``OMP_NUM_THREADS`` etc.) and, on GPUs, its own
  share of ``CUDA_VISIBLE_DEVICES`` (with fewer GPUs than slots, slots
  share a GPU and each gets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of it).
  SIGTERM or Ctrl-C stop the sweep: running trials checkpoint and exit
  (their records say ``interrupted``), no new trial starts.
* :func:`submit_slurm` writes nothing new: it submits ``launch/slurm.sbatch``
  as an array job, one array task per unfinished trial (``--array`` holds
  their indices in ``sweep.json``), with ``GINTRAIN_MODULE`` set to
  ``gintrain.runner.cli.sweep`` (arguments ``trial DIR``), which runs trial
  ``$SLURM_ARRAY_TASK_ID`` under
  ``srun`` as any runner job: multi-process trials (``--ntasks``),
  preemption and requeueing are the script's own.
* :func:`print_commands`: one shell command per unfinished trial, for any
  other scheduler (each runs the trial and keeps its record).
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.sweep import trials as trials_lib

__all__ = ['slot_environments', 'run_local', 'run_one', 'submit_slurm',
           'print_commands', 'trial_command', 'SBATCH_SCRIPT']

# launch/slurm.sbatch of the repository (not part of an installed wheel).
SBATCH_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(
        __file__)))), 'launch', 'slurm.sbatch')
_THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS')


def _gpus(environ) -> list:
  """The GPUs trials may use: ``CUDA_VISIBLE_DEVICES`` or nvidia-smi's."""
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [g for g in visible.split(',') if g.strip()]
  if environ.get('JAX_PLATFORMS', '').strip() == 'cpu':
    return []
  smi = shutil.which('nvidia-smi')
  if not smi:
    return []
  try:
    out = subprocess.run([smi, '-L'], capture_output=True, text=True,
                         timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.splitlines())
          if line.startswith('GPU ')]


def slot_environments(parallel: int, environ=None, cpus=None) -> list:
  """``[(env, cpus)]`` of each of ``parallel`` slots (see the module doc)."""
  environ = dict(os.environ if environ is None else environ)
  cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
  gpus = _gpus(environ)
  out = []
  for k in range(parallel):
    env = dict(environ)
    if len(cpus) >= parallel:
      mine = cpus[k * len(cpus) // parallel:(k + 1) * len(cpus) // parallel]
    else:
      mine = [cpus[k % len(cpus)]]
    for var in _THREAD_VARS:
      env[var] = str(len(mine))
    if gpus:
      if len(gpus) >= parallel:
        share = gpus[k * len(gpus) // parallel:(k + 1) * len(gpus) // parallel]
      else:
        share = [gpus[k % len(gpus)]]
        per_gpu = -(-parallel // len(gpus))
        env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / per_gpu:.3f}'
      env['CUDA_VISIBLE_DEVICES'] = ','.join(share)
    out.append((env, mine))
  return out


def _say(message: str) -> None:
  print(f'gintrain sweep: {message}', flush=True)


def run_local(sweep, trials, parallel=1, environ=None, monitor=None,
              next_trial=None, on_end=None) -> dict:
  """Runs ``trials`` here, ``parallel`` at once; returns ``{status: n}``.

  ``monitor(process)`` is called for each running trial every poll (the
  Optuna search reports eval records and prunes there); ``next_trial()``,
  if given, is asked for more trials once ``trials`` is used up (returns a
  trial or None); ``on_end(trial, status)`` is called as each trial ends
  or is skipped.
  """
  parallel = validation.check_int('--parallel', parallel, 1)
  local = _LocalRun(sweep, trials, slot_environments(parallel, environ),
                    monitor, next_trial, on_end)
  old = {s: signal.signal(s, local.on_signal)
         for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while True:
      local.start_trials()
      if not local.running:
        break
      local.poll()
      time.sleep(0.05)
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  if local.stop:
    local.counts['stopped'] = 1
  return local.counts


class _LocalRun:
  """The state of :func:`run_local`: the trials still to run, the slots
  (free, or running a trial) and the statuses counted so far."""

  def __init__(self, sweep, trials, slots, monitor, next_trial, on_end):
    self.sweep, self.slots = sweep, slots
    self.queue = list(trials)
    self.monitor, self.next_trial, self.on_end = monitor, next_trial, on_end
    self.free = list(range(len(slots)))
    self.running = {}  # slot -> TrialProcess
    self.counts = {}
    self.stop = []  # the signals received

  def on_signal(self, signum, frame) -> None:
    """SIGTERM/SIGINT: no new trial; the running ones get SIGTERM (Ctrl-C
    reaches them by itself)."""
    del frame
    if not self.stop:
      _say(f'{signal.Signals(signum).name}: stopping (running trials'
           ' checkpoint and exit; rerun the same command to resume).')
    self.stop.append(signum)
    if signum != signal.SIGINT:
      for proc in self.running.values():
        proc.signal(signal.SIGTERM)

  def _count(self, trial, status) -> None:
    self.counts[status] = self.counts.get(status, 0) + 1
    if self.on_end is not None:
      self.on_end(trial, status)

  def start_trials(self) -> None:
    """Starts trials in the free slots while there are any (a trial that
    needs no run, e.g. done already, is counted as skipped)."""
    while self.free and not self.stop:
      trial = self.queue.pop(0) if self.queue else (
          self.next_trial() if self.next_trial else None)
      if trial is None:
        return
      slot = self.free[0]
      env, cpus = self.slots[slot]
      proc = trials_lib.TrialProcess(self.sweep, trial, env=env, cpus=cpus)
      if proc.start():
        self.free.pop(0)
        self.running[slot] = proc
        _say(f'start {trial.name} (slot {slot})')
      else:
        _say(f'skip {trial.name}: {proc.status}')
        self._count(trial, proc.status)

  def poll(self) -> None:
    """Monitors each running trial; frees the slots of those that ended."""
    for slot, proc in list(self.running.items()):
      if self.monitor is not None:
        self.monitor(proc)
      status = proc.poll()
      if status is None:
        continue
      del self.running[slot]
      self.free.append(slot)
      self.free.sort()
      extra = proc.record.get('error') or proc.record.get('reason') or ''
      _say(f'{status} {proc.trial.name}' + (f': {extra}' if extra else ''))
      self._count(proc.trial, status)


def trial_command(sweep_dir: str, index: int) -> list:
  """The command that runs trial ``index`` of ``sweep_dir`` and records it."""
  gintrain = shutil.which('gintrain')
  head = [gintrain] if gintrain else [sys.executable, '-m',
                                      'gintrain.runner.train']
  return head + ['sweep', 'trial', sweep_dir, str(index)]


def print_commands(sweep, indices, out=None) -> int:
  """Prints one command per trial (``indices`` into ``sweep.json``)."""
  out = out or sys.stdout
  trials = sweep.trials()
  for i in indices:
    trial = trials[i]
    print(f'{shlex.join(trial_command(sweep.path, i))}  # {trial.label}',
          file=out)
  out.flush()
  return len(indices)


def _array_spec(indices) -> str:
  """``0-2,5,7-8`` of sorted indices."""
  ranges, start, prev = [], None, None
  for i in sorted(indices):
    if start is None:
      start = prev = i
    elif i == prev + 1:
      prev = i
    else:
      ranges.append((start, prev))
      start = prev = i
  if start is not None:
    ranges.append((start, prev))
  return ','.join(f'{a}' if a == b else f'{a}-{b}' for a, b in ranges)


def submit_slurm(sweep, indices, sbatch_args=(), script=None, wait=False,
                 environ=None) -> str:
  """Submits the array job; returns its job id.

  Raises:
    RunnerError: no sbatch, no script, or sbatch refused the job.
  """
  script = script or SBATCH_SCRIPT
  if not os.path.isfile(script):
    raise RunnerError(f'--sbatch_script={script}: no such file (the'
                      ' repository\'s launch/slurm.sbatch).')
  sbatch = shutil.which('sbatch')
  if not sbatch:
    raise RunnerError('--executor=slurm: sbatch is not on PATH.')
  env = dict(os.environ if environ is None else environ)
  env['GINTRAIN_MODULE'] = 'gintrain.runner.cli.sweep'
  env.setdefault('GINTRAIN_PYTHON', sys.executable)
  logs = os.path.join(sweep.path, 'slurm')
  os.makedirs(logs, exist_ok=True)
  command = [sbatch, '--parsable', f'--array={_array_spec(indices)}',
             '--job-name=gintrain-sweep', f'--output={logs}/%A_%a.out',
             *sbatch_args, *(['--wait'] if wait else []), script, 'trial',
             sweep.path]
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  job = result.stdout.strip().split(';')[0]
  if result.returncode and not (wait and job):
    raise RunnerError(f'sbatch failed ({result.returncode}):'
                      f' {result.stderr.strip() or result.stdout.strip()}')
  return job


def run_one(sweep, trial) -> int:
  """Runs one trial in the foreground (``gintrain sweep trial``): SIGTERM,
  SIGUSR1 and SIGINT go on to the runner; returns the exit status (0 for a
  trial already finished, :data:`trials.PRUNED_EXIT_CODE` if pruned).

  Under ``srun`` with several tasks (a multi-process trial) every task runs
  its share of the runner and task 0 keeps the record.
  """
  writer = os.environ.get('SLURM_PROCID', '0') == '0'
  proc = trials_lib.TrialProcess(sweep, trial, writer=writer)
  if not writer:
    status = trials_lib.trial_status(sweep.trial_dir(trial))[0]
    if status in trials_lib.FINISHED:
      _say(f'skip {trial.name}: {status}')
      return 0
  forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
  old = {s: signal.signal(s, lambda signum, _: proc.signal(signum))
         for s in forwarded}
  try:
    if not proc.start():
      _say(f'skip {trial.name}: {proc.status}')
      return 0
    _say(f'start {trial.name}')
    status = proc.wait()
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  record = proc.record or {}
  extra = record.get('error') or record.get('reason') or ''
  _say(f'{status} {trial.name}' + (f': {extra}' if extra else ''))
  return proc.exit_status()
