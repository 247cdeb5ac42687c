"""Actions: the base classes, a user action stopping a run, the profiler
action, a W&B writer bound from gin, and config errors before JAX work."""

import glob
import json
import os

import pytest

from gintrain.lib import checkpoints
from gintrain.runner import train
from gintrain.runner.actions import base

TINY = [
    '--gin_file=run.gin', '--gin_file=models/mlp.gin',
    '--gin_file=datasets/synthetic.gin', '--gin_file=optimizers/adam.gin',
    '--gin.mlp.features=(16,)', '--gin.mlp.num_classes=4',
    '--gin.train.batch_size=32', '--gin.train.num_epochs=None',
    '--gin.train.num_steps=12', '--gin.train.log_every=4',
    '--gin.train.eval_every=4', '--gin.train.parallelism="single"',
]


def run(workdir, *args):
  return train.main_with_flags(['gintrain', f'--workdir={workdir}', *TINY,
                                *args])


class _Every3(base.PeriodicAction):

  def __call__(self, step, state, metrics):
    pass


def test_periodic_action_due():
  action = _Every3(3)
  assert [s for s in range(1, 10) if action.due(s, False)] == [3, 6, 9]
  assert action.due(10, True) and not _Every3(3, at_end=False).due(10, True)
  assert not _Every3(None).due(3, False) and _Every3(0).due(7, True)
  with pytest.raises(ValueError, match='every_steps'):
    _Every3(-1)


def test_as_action_wraps_callables_and_refuses_others():
  seen = []
  action = base.as_action(lambda step, state, metrics: seen.append(step))
  assert isinstance(action, base.Callback) and action.due(1, False)
  action(5, None, {})
  assert seen == [5]
  assert base.as_action(action) is action
  with pytest.raises(TypeError, match='callable'):
    base.as_action(3)
  assert not base.is_stateful(action)


def test_user_action_can_stop_the_run(tmp_path, monkeypatch):
  module = tmp_path / 'stopper.py'
  module.write_text(
      'import gin\n'
      'from gintrain.runner.actions import base\n'
      '@gin.configurable\n'
      'class StopAt(base.Action):\n'
      '  def __init__(self, step=5):\n'
      '    self.step = step\n'
      '  def __call__(self, step, state, metrics):\n'
      '    return step >= self.step\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = tmp_path / 'run'
  assert run(workdir, '--gin_bindings=import stopper',
             '--gin.train.actions=[@stopper.StopAt()]') == 0
  # Stopped after step 5: the final eval and checkpoint are at step 5.
  path = checkpoints.latest_checkpoint(str(workdir / 'checkpoints'))
  assert path.endswith('checkpoint_5')
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [4, 5]


def test_records_only_actions_run_after_steps_with_records(tmp_path,
                                                          monkeypatch):
  module = tmp_path / 'seer.py'
  module.write_text(
      'import gin\n'
      'from gintrain.runner.actions import base\n'
      'SEEN = {}\n'
      '@gin.configurable\n'
      'class Seer(base.Action):\n'
      '  def __call__(self, step, state, metrics):\n'
      '    SEEN.setdefault(self.records_only, []).append(\n'
      '        (step, sorted(metrics)))\n'
      '@gin.configurable\n'
      'class RecordsSeer(Seer):\n'
      '  records_only = True\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  # log_every=4 and eval every 6: records after steps 4, 6 (eval), 8, 12.
  assert run(tmp_path / 'run', '--gin_bindings=import seer',
             '--gin.train.eval_every=6',
             '--gin.train.actions=[@seer.Seer(), @seer.RecordsSeer()]') == 0
  import seer  # pylint: disable=import-outside-toplevel
  assert [s for s, _ in seer.SEEN[False]] == list(range(1, 13))
  assert seer.SEEN[True] == [(4, ['train']), (6, ['eval']),
                             (8, ['train']), (12, ['eval', 'train'])]


def test_profiler_trace_of_a_step_range(tmp_path):
  workdir = tmp_path / 'run'
  assert run(workdir, '--gin.train.profile_steps=(3, 5)') == 0
  traces = glob.glob(str(workdir / 'profile' / '**' / '*.xplane.pb'),
                     recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_bad_profile_steps_fail_before_training(tmp_path, capsys):
  assert run(tmp_path / 'run', '--gin.train.profile_steps=(5, 3)') == 1
  assert 'train.profile_steps must be (first, last)' in capsys.readouterr().err


def test_wandb_writer_from_gin(tmp_path):
  pytest.importorskip('wandb')
  workdir = tmp_path / 'run'
  assert run(workdir, '--gin.train.writers=[@writers.jsonl, @writers.wandb]',
             '--gin.wandb.name="gin-run"') == 0
  assert glob.glob(str(workdir / 'wandb' / 'offline-run-*'))
  assert os.path.exists(workdir / 'metrics.jsonl')
  assert not os.path.exists(workdir / 'tensorboard')  # not bound


def test_eval_batch_size_is_checked_before_any_work(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert run(workdir, '--gin.train.eval_batch_size=-3') == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['gintrain: error: train.eval_batch_size must be a positive'
                 ' integer, got -3. (in gin configurable \'train\')'] or (
                     len(err) == 1 and 'train.eval_batch_size' in err[0]), err
  assert not os.path.exists(workdir / 'config.parsed.gin')


def test_write_samples_checks_its_arguments_and_num_zero_writes_nothing():
  from gintrain.runner import validation
  from gintrain.runner.actions import samples
  with pytest.raises(validation.ArgumentError, match='write_samples.num'):
    samples.WriteSamples(num=-1)
  with pytest.raises(validation.ArgumentError,
                     match='write_samples.temperature'):
    samples.WriteSamples(temperature=-0.5)
  with pytest.raises(validation.ArgumentError,
                     match='write_samples.prompt_length'):
    samples.WriteSamples(prompt_length=0)
  assert not samples.WriteSamples(num=0).due(10, last=True)
  assert samples.WriteSamples(num=1).due(10, last=True)
  assert not samples.WriteSamples(num=1).due(10, last=False)
