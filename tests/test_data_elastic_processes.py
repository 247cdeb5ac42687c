"""Elastic data position with real processes (launch/local.sh).

A tiny LM trains on a JSONL corpus whose documents carry ids (one document
per row, ``packing='pad'``); ``tests/cluster/recorded_data.py`` writes down
the ids of every row each process trains on, per step. An uninterrupted
2-process run is the reference. A 2-process run SIGKILLed at a random step
is resumed from its last checkpoint on 1, on 4 and on 2 processes (1 CPU
device each): every resume sees exactly the reference's global batches from
the checkpoint's step on (no repeat, no skip), and the 2-process resume ends
bitwise-identical to the reference.
"""

import glob
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import kills  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 24
EVERY = 4
BATCH = 8
DOCS = 120  # 15 steps an epoch: the runs cross an epoch boundary


def _gin(root):
  path = os.path.join(root, 'run.gin')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f"""import recorded_data
include 'lm.gin'
train.dataset = @recorded_data.recorded()
recorded.source = @data.jsonl()
recorded.delay = 0.15
data.jsonl.paths = '{root}/docs.jsonl'
data.jsonl.eval_paths = '{root}/held.jsonl'
data.jsonl.length = 16
data.jsonl.packing = 'pad'
transformer.vocab_size = 256
transformer.width = 16
transformer.depth = 1
transformer.heads = 2
transformer.max_len = 32
train.num_steps = {STEPS}
train.batch_size = {BATCH}
train.eval_every = 1000
train.log_every = {EVERY}
train.eval_batch_size = 8
train.parallelism = 'sharded'
train.actions = []
checkpoint_policy.every_steps = {EVERY}
checkpoint_policy.keep = 0
""")
  return path


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('elastic')
  rng = np.random.default_rng(0)
  for name, n in (('docs', DOCS), ('held', 8)):
    with open(root / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      for i in range(n):
        body = ''.join(rng.choice(list('abcdefgh'), size=20))
        f.write(json.dumps({'text': f'{name[0]}{i:03d} {body}'}) + '\n')
  return str(root)


def _launch(root, workdir, record_dir, processes, environ):
  command = [sys.executable, '-m', 'gintrain.runner.train',
             f'--workdir={workdir}', f'--gin_file={_gin(root)}',
             *kills.FAST_FAILURE]
  return harness.Launch(command, os.path.join(record_dir, 'logs'),
                        num_processes=processes, devices=1,
                        environ=dict(environ, GINTRAIN_RECORD_DIR=record_dir),
                        stall_s=120)


def _records(record_dir, processes, complete=True):
  """``{step: [global batch ids]}`` (process 0's rows first); a step read
  twice (by a launch and a later one) keeps the later launch's rows. A
  killed run (``complete=False``): the steps every process read."""
  per = []
  for p in range(processes):
    steps = {}
    files = sorted(glob.glob(f'{record_dir}/p{p}of{processes}.*.jsonl'),
                   key=os.path.getmtime)
    for path in files:
      with open(path, encoding='utf-8') as f:
        for line in f:
          r = json.loads(line)
          steps[r['step']] = r['ids']
    per.append(steps)
  steps = set(per[0]).intersection(*per)
  assert not complete or all(p.keys() == steps for p in per)
  return {s: sum((p[s] for p in per), []) for s in sorted(steps)}


def _first_step(record_dir, processes):
  out = set()
  for path in glob.glob(f'{record_dir}/p*of{processes}.*.jsonl'):
    with open(path, encoding='utf-8') as f:
      out.add(json.loads(f.readline())['step'])
  return out


def _finish(run):
  begun = time.monotonic()
  status = run.wait(timeout=300)
  assert status == 0, run.describe()
  print(f'{run.num_processes} process(es): {time.monotonic() - begun:.0f} s')


@pytest.mark.skipif(not os.environ.get('GINTRAIN_SLOW'), reason=(
    'slow (5 launches, 220-275 s on 2 cores): GINTRAIN_SLOW=1; the same'
    ' position logic is tested in one process by tests/test_data_position.py'))
def test_killed_run_resumes_on_1_2_4_processes(root, tmp_path):
  begun = time.monotonic()
  environ = harness.env(cache_dir=tmp_path / 'jax_cache')
  ref_dir, ref_rec = tmp_path / 'reference', str(tmp_path / 'ref_ids')
  _finish(_launch(root, ref_dir, ref_rec, 2, environ))
  reference = _records(ref_rec, 2)
  assert sorted(reference) == list(range(STEPS))
  ids = [i for s in range(STEPS) for i in reference[s]]
  epoch = ids[:DOCS]
  assert sorted(epoch) == sorted(f'd{i:03d}' for i in range(DOCS))
  assert epoch != sorted(epoch)  # shuffled

  kill_at = random.Random().randint(EVERY + 1, STEPS - EVERY - 1)
  killed, killed_rec = tmp_path / 'killed', str(tmp_path / 'killed_ids')
  run = _launch(root, killed, killed_rec, 2, environ)
  p0 = os.path.join(killed_rec, 'p0of2.*.jsonl')
  while True:
    done = [json.loads(l)['step'] for path in glob.glob(p0)
            for l in open(path, encoding='utf-8')]
    if done and max(done) >= kill_at:
      break
    assert run.proc.poll() is None, run.describe()
    time.sleep(0.02)
  kills.kill(run)
  resume_at = harness.checkpoint_steps(killed)[-1]
  assert 0 < resume_at <= kill_at, (resume_at, kill_at)
  before = _records(killed_rec, 2, complete=False)
  assert set(before) >= set(range(resume_at))
  assert all(before[s] == reference[s] for s in before)

  for processes in (1, 4, 2):
    workdir = tmp_path / f'resumed{processes}'
    shutil.copytree(killed, workdir)
    record_dir = str(tmp_path / f'resumed{processes}_ids')
    run = _launch(root, workdir, record_dir, processes, environ)
    _finish(run)
    assert 'Resumed from' in ''.join(run.log(i) for i in range(processes))
    got = _records(record_dir, processes)
    # no skip, no repeat: the resume starts at the checkpoint's step
    assert _first_step(record_dir, processes) == {resume_at}, processes
    assert sorted(got) == list(range(resume_at, STEPS)), processes
    seen = {**{s: before[s] for s in range(resume_at)}, **got}
    assert seen == reference, (processes, kill_at, resume_at)
    if processes == 2:
      kills.assert_identical(workdir, ref_dir, STEPS)
  print(f'killed at step {kill_at}, resumed from {resume_at}; 5 launches in'
        f' {time.monotonic() - begun:.0f} s')
