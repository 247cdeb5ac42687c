"""SIGKILL soak (issue 12, item 3): the runner SIGKILLed at random moments
(frequent asynchronous checkpoints, 1 and 2 processes), each kill followed
by a relaunch in the same workdir: no relaunch fails, and every run ends
with the bitwise-identical state of an uninterrupted run of its process
count.

CI runs 6 kills (1- and 2-process episodes alternate, at most 4 kills
each); set ``GINTRAIN_SOAK_KILLS=30`` (the CI count until issue 26) or
``=200`` for the long soak (docs/guides/long_runs.md, Reliability, has its
figures). ``GINTRAIN_SOAK_SEED`` changes the random moments.
"""

import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import kills  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.lib import checkpoint_naming  # pylint: disable=g-import-not-at-top,wrong-import-position

KILLS = int(os.environ.get('GINTRAIN_SOAK_KILLS', '6'))
SEED = int(os.environ.get('GINTRAIN_SOAK_SEED', '0'))
# The multi-host experiment, shorter, with a checkpoint every 2 steps (the
# last 3 kept: retention deletes files while kills land) written in the
# background.
ARGS = ('--gin.train.num_steps=30', '--gin.train.eval_every=10',
        '--gin.checkpoint_policy.every_steps=2',
        '--gin.checkpoint_policy.keep=3',
        '--gin.checkpoint_policy.async_save=True')


def _workdir(run) -> str:
  (arg,) = [a for a in map(str, run.proc.args) if a.startswith('--workdir=')]
  return arg.split('=', 1)[1]


def _log(run, index) -> str:
  try:
    return run.log(index)
  except OSError:  # killed before its log was made
    return ''


def _temporaries(workdir) -> set:
  """The save temporaries in ``workdir``'s checkpoint folder."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except OSError:
    return set()
  return {n for n in names if checkpoint_naming.is_tmp_name(n)}


def _record_phases(monkeypatch) -> collections.Counter:
  """Counts what each killed launch was doing at its kill (looked at just
  before it): 'start-up' (no save of its own begun), 'saving' (a save's
  temporary file that was not there at its launch: a save in flight) or
  'between saves'. Only observes: the kills are the soak's own."""
  phases = collections.Counter()
  at_launch = {}
  start, kill = kills.start, kills.kill

  def recording_start(workdir, *args, **kwargs):
    run = start(workdir, *args, **kwargs)
    at_launch[id(run)] = _temporaries(workdir)
    return run

  def recording_kill(run):
    workdir = _workdir(run)
    if _temporaries(workdir) - at_launch.get(id(run), set()):
      phases['saving'] += 1
    elif any('Saving checkpoint at step' in _log(run, i)
             for i in range(run.num_processes)):
      phases['between saves'] += 1
    else:
      phases['start-up'] += 1
    kill(run)

  monkeypatch.setattr(kills, 'start', recording_start)
  monkeypatch.setattr(kills, 'kill', recording_kill)
  return phases


def test_sigkill_soak(tmp_path, monkeypatch):
  phases = _record_phases(monkeypatch)
  environ = harness.env(tmp_path / 'jax_cache')
  begun = time.monotonic()
  references, durations = {}, {}
  for processes in (1, 2):
    references[processes], durations[processes] = kills.reference(
        tmp_path, environ, ARGS, processes)
  soak = kills.Soak(tmp_path, environ, ARGS, references, KILLS, seed=SEED)
  soak.durations = durations
  stats = soak.run()
  seconds = time.monotonic() - begun
  print(f'SOAK kills={stats.kills} (1 process: {stats.kills_by_processes[1]},'
        f' 2 processes: {stats.kills_by_processes[2]}) launches='
        f'{stats.launches} resumes={stats.resumes} episodes={stats.episodes}'
        f' failures={len(stats.failures)} wall={seconds:.0f}s phases at'
        f' the kills: {dict(phases)}')
  assert stats.kills == KILLS and not stats.failures
  assert stats.kills_by_processes[1] and stats.kills_by_processes[2]
  assert stats.resumes > 0
