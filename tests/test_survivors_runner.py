"""The runner end to end on the tests' tiny experiment (issue 26, item 3 and
its weak catches), sharing one 12-step run (module-scoped):

* the logged ``learning_rate`` of each train record is the rate the step
  used, on a schedule that changes every step;
* ``keep_every_n_steps`` keeps its checkpoints in ``checkpoints/`` (and
  ``keep`` drops the others);
* keep-best keeps the checkpoints of the best eval values, the newest best
  included (in the run, and step by step on a real ``Checkpointer``);
* ``--init_from`` a checkpoint whose leaves have another dtype (bfloat16,
  int32) fails with one line naming the leaf, with and without rules;
* two processes on one ``--workdir``: the second fails "in use";
* a setting dropped (or added) on resume is named: in the one-line refusal
  of the resume guard, and, with ``--allow_config_change``, in the resume
  warning; the settings saved then are the new ones.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.lib import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.actions.keep_best import KeepBest  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.errors import RunnerError  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.models import plain  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.outputs import checkpoints as checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.outputs import lock  # pylint: disable=g-import-not-at-top,wrong-import-position
from gintrain.runner.outputs import settings  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

LR0, LR1, STEPS = 0.012, 0.0, 12
RUN = ['--gin.train.log_every=1',
       '--gin.optimizer.learning_rate=@optax.linear_schedule()',
       f'--gin.linear_schedule.init_value={LR0}',
       f'--gin.linear_schedule.end_value={LR1}',
       f'--gin.linear_schedule.transition_steps={STEPS}',
       '--gin.checkpoint_policy.keep=1',
       '--gin.checkpoint_policy.keep_every_n_steps=8',
       '--gin.checkpoint_policy.best_metric="loss"',
       '--gin.checkpoint_policy.keep_best=2',
       '--gin.checkpoint_policy.async_save=False',
       '--gin.optimizer.b1=0.9']


def _records(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def _errors(capsys):
  return [l for l in capsys.readouterr().err.splitlines()
          if l.startswith('gintrain: error:')]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp('run') / 'w'
  assert tiny.run(path, *RUN) == 0
  return path


@pytest.mark.parametrize('mode,values,keep', [
    ('min', [3.0, 2.0, 2.5, 1.0, 4.0, 0.5], 1),
    ('min', [3.0, 2.0, 2.5, 1.0, 4.0, 0.5], 2),
    ('max', [0.1, 0.5, 0.3, 0.7, 0.2, 0.9], 2),
    ('max', [0.1, 0.5, 0.3, 0.7, 0.2, 0.9], 3),
])
def test_keep_best_step_by_step(tmp_path, mode, values, keep):
  ckpt = checkpointing.Checkpointer(str(tmp_path), checkpointing.CheckpointPolicy(
      every_steps=0, async_save=False))
  action = KeepBest(ckpt, lambda step: {'step': step}, 'm', mode=mode,
                    keep=keep, log=False)
  seen = []
  for i, value in enumerate(values):
    step = 10 * (i + 1)
    action(step, None, {'eval': {'m': value}})
    seen.append((step, value))
    ranked = sorted(seen, key=lambda sv: sv[1], reverse=mode == 'max')[:keep]
    on_disk = sorted(int(n.split('_')[-1])
                     for n in os.listdir(tmp_path / 'best_checkpoints')
                     if n.startswith('checkpoint_'))
    assert on_disk == sorted(s for s, _ in ranked), (step, value)
    state = action.get_state()
    assert state['steps'].tolist() == [s for s, _ in ranked]
    assert state['values'].tolist() == [v for _, v in ranked]
    for s in on_disk:
      restored = checkpoints.restore_checkpoint(
          str(tmp_path / 'best_checkpoints' / f'checkpoint_{s}'), None)
      assert restored == {'step': s}
  ckpt.close()


def _params_with(tmp_path, leaf, dtype):
  """The tiny experiment's parameters, ``leaf`` cast to ``dtype``."""
  model = plain.mlp(features=(16,), num_classes=4)
  params = model.init(jax.random.key(0), np.zeros((1, 16), np.float32))[
      'params']
  params = jax.tree_util.tree_map(np.asarray, params)
  layer, name = leaf.split('/')
  params[layer][name] = np.asarray(params[layer][name]).astype(dtype)
  out = tmp_path / f'params_{np.dtype(dtype).name}'
  checkpoints.save_checkpoint(str(out), params, 0)
  return out


# A plain --init_from (every leaf must match) and one with rules (the
# selected leaves must match).
@pytest.mark.parametrize('leaf,dtype,name,rules', [
    ('Dense_0/kernel', ml_dtypes.bfloat16, 'bfloat16', []),
    ('Dense_1/bias', np.int32, 'int32',
     ["--gin.init_from.exclude=['^none$']"]),
])
def test_init_from_another_dtype_is_refused(tmp_path, capsys, leaf, dtype,
                                            name, rules):
  src = _params_with(tmp_path, leaf, dtype)
  capsys.readouterr()
  code = tiny.run(tmp_path / 'w', f'--init_from={src}', *rules,
                  '--gin.train.num_steps=1')
  errors = _errors(capsys)
  assert code == 1, errors
  assert len(errors) == 1, errors
  assert f'--init_from={src}' in errors[0]
  assert f'{leaf}: {name}[' in errors[0], errors
  assert 'float32[' in errors[0], errors
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints' /
                            'checkpoint_1')


_HOLDER = textwrap.dedent('''
    import sys
    from gintrain.runner.outputs import lock
    held = lock.WorkdirLock(sys.argv[1]).acquire()
    print('held', flush=True)
    sys.stdin.read()  # until the test closes our stdin
    held.release()
''')


def test_second_process_on_one_workdir_fails_in_use(tmp_path, capsys):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  holder = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, '-c', _HOLDER, str(workdir)], stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(RunnerError, match='is in use by another run'):
      lock.WorkdirLock(str(workdir)).acquire()
    capsys.readouterr()
    assert tiny.run(workdir, '--gin.train.num_steps=1') == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and 'is in use by another run' in errors[0], (
        errors)
    assert f'pid {holder.pid} ' in errors[0]
    assert not os.path.exists(workdir / 'checkpoints' / 'checkpoint_1')
  finally:
    holder.stdin.close()
    holder.wait(timeout=30)
  assert holder.returncode == 0
  with lock.WorkdirLock(str(workdir)):  # released with its holder's end
    pass


def test_logged_learning_rate_is_the_one_used(workdir):
  train = _records(workdir, 'train')
  assert [r['step'] for r in train] == list(range(1, STEPS + 1))
  # Step s (1-based) applied update s - 1 of the schedule.
  for r in train:
    want = LR0 + (LR1 - LR0) * (r['step'] - 1) / STEPS
    assert r['learning_rate'] == pytest.approx(want, rel=1e-6), r


def test_keep_every_n_steps_keeps_its_checkpoints(workdir):
  # keep=1 holds the newest (12); keep_every_n_steps=8 (flax's rule: the
  # oldest, then one at least 8 steps after the last kept) also keeps 4.
  names = sorted(os.listdir(workdir / 'checkpoints'))
  assert [n for n in names if n.startswith('checkpoint_')] == [
      'checkpoint_12', 'checkpoint_4']


def test_keep_best_keeps_the_best_two_in_the_run(workdir):
  evals = _records(workdir, 'eval')
  assert [r['step'] for r in evals] == [4, 8, 12]
  best = sorted(evals, key=lambda r: r['loss'])[:2]
  kept = sorted(n for n in os.listdir(workdir / 'best_checkpoints')
                if n.startswith('checkpoint_'))
  assert kept == sorted(f'checkpoint_{r["step"]}' for r in best)


def test_setting_dropped_on_resume_is_named(workdir, tmp_path, capsys,
                                            caplog):
  """optimizer.b1 was bound in the run; the resume drops it (and binds b2):
  refused with one line naming both, then, with --allow_config_change,
  resumed with a warning naming both and the new settings saved."""
  copy = tmp_path / 'w'
  shutil.copytree(workdir, copy)
  before = settings.load(str(copy))
  assert before['gin.optimizer.b1'] == 0.9
  args = [a for a in RUN if not a.startswith('--gin.optimizer.b1=')]
  args += ['--gin.optimizer.b2=0.99', '--gin.train.num_steps=13']
  capsys.readouterr()
  assert tiny.run(copy, *args) == 1
  errors = _errors(capsys)
  assert len(errors) == 1, errors
  assert ('changed: gin.optimizer.b1: 0.9 -> <unset>; gin.optimizer.b2:'
          ' <unset> -> 0.99.') in errors[0], errors
  assert settings.load(str(copy)) == before  # nothing written
  with caplog.at_level(logging.WARNING):
    assert tiny.run(copy, *args, '--allow_config_change') == 0
  messages = ' | '.join(r.getMessage() for r in caplog.records)
  assert 'gin.optimizer.b1: 0.9 -> <unset>' in messages, messages
  assert 'gin.optimizer.b2: <unset> -> 0.99' in messages, messages
  after = settings.load(str(copy))
  assert 'gin.optimizer.b1' not in after and after['gin.optimizer.b2'] == 0.99
  same = lambda flat: {k: v for k, v in flat.items() if k.startswith('gin.')  # pylint: disable=g-long-lambda,unnecessary-lambda-assignment
                       and 'optimizer.b' not in k and 'num_steps' not in k}
  assert same(after) == same(before)
  assert [r['step'] for r in _records(copy, 'train')][-2:] == [12, 13]


def test_settings_keep_every_binding_through_save_and_load(tmp_path):
  bindings = {'train.batch_size': 32, '%LR': 0.1, 'optax.adam.b1': 0.9,
              'optax.sgd.momentum': 0.5, 'scope/mlp.features': (16, 8),
              'a.b': 1, 'checkpoint_policy.keep': None}
  cfg = settings.build(bindings, {'workdir': str(tmp_path)},
                       versions={'jax': 'x'}, devices={'count': 1})
  settings.save(str(tmp_path), cfg)
  loaded = settings.load(str(tmp_path))
  gin_keys = sorted(k[len('gin.'):] for k in loaded if k.startswith('gin.'))
  assert gin_keys == sorted(bindings)
  assert loaded['gin.scope/mlp.features'] == [16, 8]
  assert loaded['gin.%LR'] == 0.1 and loaded['gin.a.b'] == 1
  for key in bindings:
    dropped = {k: v for k, v in loaded.items() if k != f'gin.{key}'}
    assert settings.changes(loaded, dropped) == [
        f'gin.{key}: {loaded[f"gin.{key}"]} -> <unset>']
