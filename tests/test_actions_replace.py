"""Each built-in action replaced by a user action bound through gin
(``train.replace_actions``), and loop wirings: the eval batch checked before
training, ``data_wait_fraction`` and ``packing_efficiency`` in the train
records, hooks as actions.

Two tiny runs, one per module (about 10 s on 2 cores): the first replaces
every built-in but the finite check (the spike guard is on), the second the
finite check (the guard off)."""

import json
import os
import sys

import pytest

from gintrain.runner.actions import base
from gintrain.runner.training import action_list
from gintrain.runner.errors import RunnerError
from tiny import run

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'user_plugins')
if PLUGINS not in sys.path:
  sys.path.insert(0, PLUGINS)

BUILT_INS = ('report', 'eval', 'early_stopping', 'keep_best', 'checkpoint',
             'preemption', 'profiler', 'samples', 'spike_guard', 'goodput',
             'plot')


def _records(path):
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _replacing(tmp, names, *more):
  table = ', '.join(f"'{n}': @replacements.Recording" for n in names)
  return run(tmp, '--gin_bindings=import replacements',
             f'--gin.train.replace_actions={{{table}}}',
             f"--gin.Recording.path='{tmp / 'calls.jsonl'}'", *more)


@pytest.fixture(scope='module')
def replaced(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('replaced')
  assert _replacing(
      tmp, BUILT_INS,
      '--gin.train.early_stopping=@runner.early_stopping()',
      "--gin.early_stopping.metric='loss'",
      "--gin.checkpoint_policy.best_metric='loss'",
      '--gin.train.profile_steps=(2, 3)',
      '--gin.train.actions=[@actions.write_samples()]',
      '--gin.train.dataset=@replacements.WaitingSynthetic()') == 0
  return tmp, _records(tmp / 'calls.jsonl'), _records(tmp / 'metrics.jsonl')


@pytest.mark.parametrize('name', BUILT_INS)
def test_a_built_in_action_is_replaced_through_gin(replaced, name):
  tmp, calls, metrics = replaced
  mine = [c for c in calls if c['name'] == name]
  # the replacement runs after the steps and once at the end ...
  assert [c['step'] for c in mine if c['end']] == [12], mine
  assert [c['step'] for c in mine if not c['end']] == list(range(1, 12))
  # ... and the built-in does not
  splits = {m.get('split') for m in metrics}
  gone = {'report': lambda: 'train' not in splits,
          'eval': lambda: 'eval' not in splits,
          'goodput': lambda: 'goodput' not in splits,
          'checkpoint': lambda: not os.listdir(tmp / 'checkpoints')
                        if os.path.isdir(tmp / 'checkpoints') else True,
          'keep_best': lambda: not os.path.isdir(tmp / 'best_checkpoints')
                       or not os.listdir(tmp / 'best_checkpoints'),
          'profiler': lambda: not os.path.isdir(tmp / 'profile'),
          'samples': lambda: not os.path.exists(tmp / 'samples.txt'),
          'plot': lambda: not os.path.exists(tmp / 'metrics.png')}
  assert gone.get(name, lambda: True)(), (name, sorted(os.listdir(tmp)))


def test_the_finite_check_is_replaced_through_gin(tmp_path):
  assert _replacing(tmp_path, ['finite_check'],
                    '--gin.train.spike_guard=False',
                    '--gin.train.num_steps=4') == 0
  calls = _records(tmp_path / 'calls.jsonl')
  assert [(c['step'], c['end']) for c in calls] == [
      (1, False), (2, False), (3, False), (4, True)]


def test_an_unknown_name_is_one_line(tmp_path, capsys):
  assert _replacing(tmp_path, ['evaluation']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no action named 'evaluation'" in err[0], err
  assert 'eval, ' in err[0]


def test_replace_keeps_the_place_and_names_the_actions():
  class A(base.Action):
    name = 'a'
    def __call__(self, step, state, metrics):
      pass
  a, b = A(), A()
  b.name = 'b'
  out = action_list.replace([a, b], {'a': lambda built_in: built_in})
  assert out[0] is a and out[1] is b
  with pytest.raises(RunnerError, match="no action named 'c'.*a, b"):
    action_list.replace([a, b], {'c': lambda x: x})


def test_train_records_carry_the_data_wait_and_packing(tmp_path):
  assert run(tmp_path, '--gin_bindings=import replacements',
             '--gin.train.dataset=@replacements.WaitingSynthetic()') == 0
  train = [m for m in _records(tmp_path / 'metrics.jsonl')
           if m.get('split') == 'train']
  assert [m['step'] for m in train] == [4, 8, 12]
  assert all(m['data_wait_fraction'] == 0.25 for m in train), train
  assert train[0]['packing_efficiency'] == 0.875
  assert all('packing_efficiency' not in m for m in train[1:])


def test_an_eval_batch_too_large_for_the_host_is_one_line(tmp_path, capsys):
  assert run(tmp_path, '--gin_bindings=import replacements',
             '--gin.train.dataset=@replacements.Unsized()',
             '--gin.train.eval_batch_size=1000000000') == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('gintrain: error:'), err
  assert 'train.eval_batch_size=1000000000 is too large' in err[0], err
  assert not os.path.exists(tmp_path / 'checkpoints')
  # a source that knows its eval set caps the batch: the same value runs
  assert run(tmp_path / 'capped', '--gin.train.eval_batch_size=1000000000',
             '--gin.train.num_steps=4') == 0


def test_hooks_are_actions_seeing_the_final_checkpoint(tmp_path):
  seen = []
  def hook(step):
    seen.append((step, os.path.exists(tmp_path / 'checkpoints' /
                                      f'checkpoint_{step}')))
  assert run(tmp_path, '--gin.train.num_steps=6', hooks=[hook]) == 0
  # after each step before the checkpoint action; at the end after the
  # final checkpoint
  assert seen == [(s, False) for s in range(1, 6)] + [(6, True)], seen


def test_the_first_rates_leave_the_first_step_out():
  """The first record of a launch measures from the end of the first
  (compiling) step: a slow first step does not lower it."""
  import time  # pylint: disable=g-import-not-at-top
  from gintrain.runner.training import records  # pylint: disable=g-import-not-at-top
  rates = records.Rates(0, 10, lambda: 0.0, tokens_per_example=4)
  time.sleep(1.0)  # the first step, compiling
  rates.after_first_step(1, {})
  time.sleep(0.05)  # steps 2 and 3
  out = rates.means(3, {'loss': 3.0}, 0)
  assert out['loss'] == 1.0
  assert out['steps_per_sec'] > 5, out  # 3 steps over 1.05 s would be < 3
  assert out['examples_per_sec'] == 10 * out['steps_per_sec']
  assert out['tokens_per_sec'] == 40 * out['steps_per_sec']
