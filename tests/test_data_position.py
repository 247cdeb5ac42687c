"""Data position independent of the process count, and mixtures.

Each process of a run binds its source with its own ``Spec``
(``process_index``, ``process_count``) and reads only its rows; here the
processes of 1-, 2- and 4-process runs are bound side by side in one
Python process (the code path of each real process), and their rows are
put together into the global batches.
"""

import json

import numpy as np
import pytest

from gintrain.runner.data import base
from gintrain.runner.data import corpora
from gintrain.runner.data import mixture

BATCH = 8
STEPS = 51


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('pos')
  rng = np.random.default_rng(0)
  out = []
  for name, alphabet in (('a', 'abc '), ('b', 'xyz\n')):
    path = root / f'{name}.jsonl'
    with open(path, 'w', encoding='utf-8') as f:
      for i in range(150):
        body = ''.join(rng.choice(list(alphabet), size=int(rng.integers(
            4, 90))))
        f.write(json.dumps({'text': f'<{name}{i}>' + body}) + '\n')
    out.append(str(path))
  return out


def _source(files, **kw):
  return corpora.jsonl(files[0], length=32, **kw)


def _bind(make, count, seed=7):
  out = []
  for p in range(count):
    s = make()
    s.bind(base.Spec(batch_size=BATCH, eval_batch_size=BATCH, seed=seed,
                     process_index=p, process_count=count))
    out.append(s)
  return out


def _global(procs):
  """The next global batch: the processes' rows in process order."""
  parts = [s.next_batch() for s in procs]
  return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


def _bytes(batch):
  return b''.join(batch[k].tobytes() for k in sorted(batch))


def test_global_batches_identical_for_1_2_4_processes(files):
  runs = {n: _bind(lambda: _source(files), n) for n in (1, 2, 4)}
  for step in range(STEPS):
    got = {n: _bytes(_global(procs)) for n, procs in runs.items()}
    assert got[1] == got[2] == got[4], step
  assert runs[1][0].steps_per_epoch < STEPS  # crossed an epoch boundary


def test_resume_on_another_process_count(files):
  rng = np.random.default_rng()
  kill_at = int(rng.integers(1, STEPS - 1))
  reference = _bind(lambda: _source(files), 1)
  expected = [_bytes(_global(reference)) for _ in range(STEPS)]
  two = _bind(lambda: _source(files), 2)
  for step in range(kill_at):
    assert _bytes(_global(two)) == expected[step]
  states = [s.get_state() for s in two]
  assert states[0] == states[1]  # the position is global, not per process
  for count in (1, 4):
    resumed = _bind(lambda: _source(files), count)
    for s in resumed:
      s.set_state(json.loads(json.dumps(states[0])))  # as in a checkpoint
    for step in range(kill_at, STEPS - 1):
      assert _bytes(_global(resumed)) == expected[step], (count, step)
    # a second resume, from the resumed run's own checkpoint
    state = resumed[0].get_state()
    assert json.loads(state['grain'])['next_index'] == STEPS - 1
    again = _bind(lambda: _source(files), 2)
    for s in again:
      s.set_state(state)
    assert _bytes(_global(again)) == expected[STEPS - 1]


def test_worker_processes_read_the_same_batches(files):
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
    flags.FLAGS.mark_as_parsed()
  plain = _bind(lambda: _source(files), 2)
  workers = _bind(lambda: _source(files, worker_count=1), 2)
  try:
    for _ in range(6):
      assert _bytes(_global(plain)) == _bytes(_global(workers))
    state = workers[0].get_state()
    again = _bind(lambda: _source(files), 2)
    for s in again:
      s.set_state(state)
    assert _bytes(_global(again)) == _bytes(_global(plain))
  finally:
    for s in workers:
      s.close()


def _mix(files, weights, **kw):
  return mixture.mixture([(corpora.jsonl(files[0], length=32), weights[0]),
                          (corpora.jsonl(files[1], length=32), weights[1])],
                         **kw)


def test_mixture_proportions_and_exact_resume(files, caplog):
  mix = _mix(files, (0.7, 0.3))
  mix.bind(base.Spec(batch_size=BATCH, eval_batch_size=BATCH, seed=1))
  rows = mix._train  # pylint: disable=protected-access
  picks = np.array([rows.source_of(i)[0] for i in range(10_000)])
  share = (picks == 0).mean()
  assert abs(share - 0.7) < 0.02, share
  # each source's examples are taken in order, none twice
  small = mixture.Mixture([None, None], [0.7, 0.3], block=10, seed=2)
  taken = [small.source_of(i) for i in range(100)]
  for k, n in ((0, 70), (1, 30)):
    assert sorted(j for kk, j in taken if kk == k) == list(range(n))
  # the rows really come from the sources it says (their alphabets)
  for i in range(50):
    k, _ = rows.source_of(i)
    tokens = bytes(rows[i]['tokens'][:-1].astype(np.uint8))
    assert not set(tokens) & set(b'xyz' if k == 0 else b'c'), (i, k)
  # deterministic and resumable, on any process count
  first = [_bytes(mix.next_batch()) for _ in range(5)]
  state = mix.get_state()
  later = [_bytes(mix.next_batch()) for _ in range(5)]
  again = _mix(files, (0.7, 0.3))
  again.bind(base.Spec(batch_size=BATCH, eval_batch_size=BATCH, seed=1))
  assert [_bytes(again.next_batch()) for _ in range(5)] == first
  for count in (1, 2):
    procs = _bind(lambda: _mix(files, (0.7, 0.3)), count, seed=1)
    for s in procs:
      s.set_state(state)
    assert [_bytes(_global(procs)) for _ in range(5)] == later
  # other weights on resume: allowed, with a warning naming the change
  changed = _mix(files, (0.5, 0.5))
  changed.bind(base.Spec(batch_size=BATCH, eval_batch_size=BATCH, seed=1))
  with caplog.at_level('WARNING'):
    changed.set_state(state)
  assert 'resuming with weights [0.5, 0.5]' in caplog.text
  assert '[0.7, 0.3]' in caplog.text
