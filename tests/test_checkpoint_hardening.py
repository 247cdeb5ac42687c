"""Checkpoints survive concurrent writers, hostile names, bad files (issue 12).

(a) two writer processes on one directory; (b) planted symlinks, FIFOs and
bad prefixes; (c) clear errors for a directory, a full disk and impossible
shapes; (d) the reader's memory on a file of tiny arrays; (e) resuming from
the newest checkpoint that reads back. Anything that could hang runs in a
subprocess with a timeout, so a regression fails instead of hanging.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pytest
from flax import serialization as flax_serialization
from flax.training import checkpoints as flax_ckpt

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import serialization

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
           OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1')
# Generous: only a hang (the bug) gets near it.
HANG_TIMEOUT_S = 120


def run_python(code, *args, timeout=HANG_TIMEOUT_S):
  """Runs ``code`` in a fresh interpreter; returns its stdout."""
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args],
                       env=ENV, capture_output=True, text=True,
                       timeout=timeout, check=False)
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.fixture(autouse=True)
def flax_msgpack_backend():
  import flax  # pylint: disable=g-import-not-at-top
  old = flax.config.flax_use_orbax_checkpointing
  flax.config.update('flax_use_orbax_checkpointing', False)
  yield
  flax.config.update('flax_use_orbax_checkpointing', old)


def tmp_names(d):
  return [n for n in os.listdir(d) if checkpoint_naming.is_tmp_name(n)]


# ---------------------------------------------------------------------------
# (a) Concurrent writers.

_WRITER = '''
    import json, os, sys, warnings
    import numpy as np
    from gintrain.lib import checkpoints, errors
    warnings.simplefilter('ignore')
    ckpt_dir, writer, saves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    committed = []
    for i in range(saves):
      # Steps ending in the writer's number are its own; both writers save
      # steps ending in 5 (without overwrite: at most one may succeed) and
      # in 7 (with overwrite: the last one wins, whole).
      kind = i % 3
      step = 10 * i + (writer, 5, 7)[kind]
      overwrite = kind == 2
      state = {'writer': writer, 'step': step,
               'w': np.full(50_000, writer * 1_000_000 + step, np.int64)}
      try:
        checkpoints.save_checkpoint(ckpt_dir, state, step, keep=0,
                                    overwrite=overwrite)
        committed.append(step)
      except (errors.InvalidCheckpointError, errors.AlreadyExistsError):
        pass  # the other writer got ahead: refused, as documented
    print(json.dumps(committed))
'''

SAVES = 200  # per writer


def test_two_writer_processes_never_mix_data(tmp_path):
  ckpt_dir = str(tmp_path / 'ckpts')
  procs = [subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(_WRITER), ckpt_dir, str(w),
       str(SAVES)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for w in (1, 2)]
  committed = {}
  for w, p in zip((1, 2), procs):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    committed[w] = set(json.loads(out))
  assert committed[1] and committed[2]
  files = checkpoints.available_steps(ckpt_dir)
  assert files, 'no checkpoint survived'
  shared = {s for s in files if s % 10 in (5, 7)}
  assert shared, 'no shared step survived: the race was not exercised'
  for step in files:
    got = checkpoints.restore_checkpoint(ckpt_dir, None, step=step)
    writer = int(got['writer'])
    # Whole, one writer's state for this step ...
    assert got['step'] == step, (step, got)
    assert (got['w'] == writer * 1_000_000 + step).all(), step
    # ... of a writer whose save of this step reported success (so no
    # success was reported for a file that holds the other's data, unless
    # both succeeded: an overwrite, or the file deleted in between).
    assert step in committed[writer], (step, writer)
    if step % 10 in (1, 2):
      assert writer == step % 10, step
  assert tmp_names(ckpt_dir) == [], 'a writer left its temporary file'
  both = committed[1] & committed[2]
  assert all(s % 10 in (5, 7) for s in both), both
  print(f'{len(committed[1]) + len(committed[2])} saves committed'
        f' ({len(both)} steps by both writers), {len(files)} checkpoints'
        f' kept ({len(shared)} shared steps)')


def test_unique_tmp_names_and_flax_reads_our_directory(tmp_path):
  tree = {'a': np.arange(5), 'b': {'c': 1.5}}
  paths = {checkpoint_naming.new_tmp_path(str(tmp_path), 'ck_')
           for _ in range(100)}
  assert len(paths) == 100
  for p in paths:
    name = os.path.basename(p)
    assert name.startswith('.ck_tmp-') and str(os.getpid()) in name
    assert checkpoint_naming.is_tmp_name(name, 'ck_')
    assert not checkpoint_naming.is_tmp_name(name, 'other_')
  # Our files are flax's bytes; flax lists and restores our directory.
  ours = checkpoints.save_checkpoint(tmp_path / 'ours', tree, 3)
  theirs = flax_ckpt.save_checkpoint(tmp_path / 'flax', tree, 3)
  with open(ours, 'rb') as f, open(theirs, 'rb') as g:
    assert f.read() == g.read()
  assert os.listdir(tmp_path / 'ours') == ['checkpoint_3']
  flax_got = flax_ckpt.restore_checkpoint(tmp_path / 'ours', None)
  np.testing.assert_array_equal(flax_got['a'], tree['a'])
  # A flax-written directory (with flax's tmp name present) restores.
  (tmp_path / 'flax' / 'checkpoint_tmp').write_bytes(b'a flax writer')
  got = checkpoints.restore_checkpoint(tmp_path / 'flax', None)
  np.testing.assert_array_equal(got['a'], tree['a'])


def test_listing_and_retention_ignore_other_writers_tmp_files(tmp_path):
  d = str(tmp_path)
  live = checkpoint_naming.new_tmp_path(d, 'checkpoint_')
  with open(live, 'wb') as f:
    f.write(b'another writer, still writing')
  os.mkdir(live + '_gda')
  (tmp_path / 'checkpoint_tmp').write_bytes(b'a live flax writer')
  for step in range(4):
    checkpoints.save_checkpoint(d, {'s': step}, step, keep=2)
    assert checkpoints.latest_checkpoint(d).endswith(f'checkpoint_{step}')
  assert checkpoints.available_steps(d) == [2, 3]
  assert os.path.exists(live) and os.path.isdir(live + '_gda')
  assert (tmp_path / 'checkpoint_tmp').exists()
  checkpoints.save_checkpoint(d, {'s': 9}, 2, overwrite=True, keep=5)
  assert os.path.exists(live) and (tmp_path / 'checkpoint_tmp').exists()
  assert checkpoints.available_steps(d) == [2]


def test_stale_tmp_files_of_dead_writers_are_removed(tmp_path):
  d = str(tmp_path)
  # A writer of this machine that died: its pid no longer exists.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  token = checkpoint_naming.new_tmp_token().split('-')
  dead_tmp = checkpoint_naming.new_tmp_path(
      d, 'checkpoint_', f'{token[0]}-{dead.stdout.strip()}-{token[2]}')
  # A writer elsewhere (unknown host): removed only once it is old.
  old_tmp = checkpoint_naming.new_tmp_path(
      d, 'checkpoint_', f'{"f" * 16}-1234-0badcafe')
  young_tmp = checkpoint_naming.new_tmp_path(
      d, 'checkpoint_', f'{"e" * 16}-1234-0badcafe')
  mine = checkpoint_naming.new_tmp_path(d, 'checkpoint_')  # alive: this one
  other_prefix = checkpoint_naming.new_tmp_path(d, 'other_',
                                                f'{"f" * 16}-1-00000000')
  for p in (dead_tmp, old_tmp, young_tmp, mine, other_prefix):
    with open(p, 'wb') as f:
      f.write(b'x')
  os.mkdir(old_tmp + '_gda')
  (tmp_path / (os.path.basename(old_tmp) + '_gda') / 'a').write_bytes(b'y')
  (tmp_path / 'checkpoint_tmp').write_bytes(b'old flax tmp')
  long_ago = time.time() - checkpoint_naming.STALE_TMP_SECONDS - 60
  for p in (old_tmp, old_tmp + '_gda', old_tmp + '_gda/a', other_prefix,
            str(tmp_path / 'checkpoint_tmp')):
    os.utime(p, (long_ago, long_ago))
  checkpoints.save_checkpoint(d, {'s': 1}, 1)
  left = set(os.listdir(d))
  assert left == {'checkpoint_1', os.path.basename(young_tmp),
                  os.path.basename(mine), os.path.basename(other_prefix)}


# ---------------------------------------------------------------------------
# (b) Hostile names.


def test_symlink_at_tmp_names_is_never_written_through(tmp_path):
  outside = tmp_path / 'outside'
  outside.write_bytes(b'precious')
  d = tmp_path / 'ckpts'
  d.mkdir()
  os.symlink(outside, d / 'checkpoint_tmp')  # flax's fixed name
  checkpoints.save_checkpoint(d, {'v': 1}, 1)
  assert outside.read_bytes() == b'precious'
  assert checkpoints.restore_checkpoint(d, None) == {'v': 1}
  # An explicit tmp path that is a symlink is refused, not followed.
  with pytest.raises(checkpoint_io.NotARegularFileError, match='symbolic'):
    checkpoint_io.write_checkpoint_file({'v': 2}, str(d / 'checkpoint_2'),
                                        str(d / 'checkpoint_tmp'), False)
  # write_file never writes through a symlink, even a dangling one.
  with pytest.raises(checkpoint_io.NotARegularFileError, match='symbolic'):
    checkpoint_io.write_file({'v': 3}, str(d / 'checkpoint_tmp'))
  os.symlink(tmp_path / 'nowhere', d / 'dangling')
  with pytest.raises(FileExistsError):
    checkpoint_io.write_file({'v': 3}, str(d / 'dangling'), exclusive=True)
  assert outside.read_bytes() == b'precious'
  assert not (tmp_path / 'nowhere').exists()


def test_retention_never_deletes_symlinks_or_their_targets(tmp_path):
  keep_me = tmp_path / 'keep_me'
  keep_me.mkdir()
  (keep_me / 'data').write_bytes(b'x')
  d = tmp_path / 'ckpts'
  d.mkdir()
  os.symlink(keep_me, d / 'checkpoint_0')
  os.symlink(keep_me / 'data', d / 'checkpoint_1')
  for step in (2, 3):
    checkpoints.save_checkpoint(d, {'s': step}, step, keep=1)
  assert (keep_me / 'data').read_bytes() == b'x'
  assert os.path.islink(d / 'checkpoint_0') and os.path.islink(
      d / 'checkpoint_1')
  assert checkpoints.available_steps(d) == [0, 1, 3]


_FIFO_SCRIPT = '''
    import os, sys, warnings
    from gintrain.lib import checkpoints, checkpoint_io
    warnings.simplefilter('ignore')
    d = sys.argv[1]
    for call in (lambda: checkpoints.restore_checkpoint(d, None),
                 lambda: checkpoints.restore_checkpoint(d, None, step=5),
                 lambda: checkpoint_io.read_checkpoint_file(
                     d + '/checkpoint_5'),
                 lambda: checkpoint_io.write_file({}, d + '/checkpoint_5')):
      try:
        call()
        print('no error')
      except checkpoint_io.NotARegularFileError as e:
        assert 'checkpoint_5' in str(e) and 'FIFO' in str(e), e
        print('refused')
    # Saving and resuming go on around it.
    checkpoints.save_checkpoint(d, {'v': 6}, 6, keep=5)
    os.mkfifo(d + '/checkpoint_9')
    print(os.path.basename(checkpoints.latest_valid_checkpoint(d)))
    checkpoints.save_checkpoint(d, {'v': 10}, 10, keep=1)
    print(sorted(os.listdir(d)))
'''


def test_fifo_checkpoint_never_hangs(tmp_path):
  d = tmp_path / 'ckpts'
  d.mkdir()
  os.mkfifo(d / 'checkpoint_5')
  out = run_python(_FIFO_SCRIPT, str(d)).split('\n')
  assert out[:4] == ['refused'] * 4, out
  assert out[4] == 'checkpoint_6', out  # the newest that reads back
  # Retention deleted checkpoint_6 but left the FIFOs alone.
  assert out[5] == "['checkpoint_10', 'checkpoint_5', 'checkpoint_9']", out


@pytest.mark.parametrize('prefix', ['../x_', 'a/b_', '/abs_', '', '.', '..',
                                    'nul\0_'])
def test_bad_prefixes_are_refused(tmp_path, prefix):
  d = tmp_path / 'ckpts'
  d.mkdir()
  victim = tmp_path / 'x_1'
  victim.write_bytes(b'not a checkpoint of this directory')
  with pytest.raises(ValueError, match='prefix') as e:
    checkpoints.save_checkpoint(d, {'v': 1}, 2, prefix=prefix, keep=1)
  assert repr(prefix) in str(e.value)
  with pytest.raises(ValueError, match='prefix'):
    checkpoints.save_checkpoint_multiprocess(d, {'v': 1}, 2, prefix=prefix)
  with pytest.raises(ValueError, match='prefix'):
    checkpoints.restore_checkpoint(d, None, step=1, prefix=prefix)
  with pytest.raises(ValueError, match='prefix'):
    checkpoints.latest_valid_checkpoint(d, prefix=prefix)
  assert victim.read_bytes() == b'not a checkpoint of this directory'
  assert os.listdir(d) == []


# ---------------------------------------------------------------------------
# (c) Clear errors.


def test_restore_of_a_directory_names_it(tmp_path):
  (tmp_path / 'checkpoint_3').mkdir()
  for call in (lambda: checkpoints.restore_checkpoint(tmp_path, None),
               lambda: checkpoints.restore_checkpoint(tmp_path, None, step=3)):
    with pytest.raises(checkpoint_io.NotARegularFileError) as e:
      call()
    assert isinstance(e.value, IsADirectoryError)
    assert str(tmp_path / 'checkpoint_3') in str(e.value)
    assert 'directory' in str(e.value) and '\n' not in str(e.value)


_ENOSPC_SCRIPT = '''
    import errno, os, sys, warnings
    import numpy as np
    from gintrain.lib import checkpoints, checkpoint_io
    warnings.simplefilter('ignore')
    d = sys.argv[1]
    checkpoints.save_checkpoint(d, {'w': np.ones(1000)}, 1, keep=1)
    try:
      checkpoints.save_checkpoint(d, {'w': np.ones(2**20)}, 2, keep=1)
    except checkpoint_io.CheckpointWriteError as e:
      assert e.errno == errno.ENOSPC, e
      assert isinstance(e, OSError) and '\\n' not in str(e)
      print(str(e))
    print(sorted(os.listdir(d)))
    print(checkpoints.restore_checkpoint(d, None)['w'].sum())
'''



def test_disk_full_gives_one_clear_error(tmp_path):
  cmd = harness.mount_namespace()
  if cmd is None:
    pytest.skip('cannot mount a small tmpfs here (no mount namespace)')
  d = tmp_path / 'small'
  d.mkdir()
  script = tmp_path / 'enospc.py'
  script.write_text(textwrap.dedent(_ENOSPC_SCRIPT))
  shell = (f'mount -t tmpfs -o size=512k tmpfs {d} && '
           f'{sys.executable} {script} {d}')
  out = subprocess.run(cmd + ['sh', '-c', shell], env=ENV, capture_output=True,
                       text=True, timeout=HANG_TIMEOUT_S, check=False)
  if out.returncode and 'mount' in out.stderr and 'permission' in (
      out.stderr.lower()):
    pytest.skip(f'cannot mount a tmpfs here: {out.stderr.strip()}')
  assert out.returncode == 0, out.stderr
  message, listing, total = out.stdout.strip().split('\n')
  assert f'{d}/checkpoint_2' in message and 'No space left' in message
  assert listing == "['checkpoint_1']"  # tmp removed, old one intact
  assert float(total) == 1000.0


_FSIZE_SCRIPT = '''
    import os, resource, signal, sys, warnings
    import numpy as np
    from gintrain.lib import checkpoints, checkpoint_io
    warnings.simplefilter('ignore')
    d = sys.argv[1]
    checkpoints.save_checkpoint(d, {'w': np.ones(1000)}, 1, keep=1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
      checkpoints.save_checkpoint(d, {'w': np.ones(2**20)}, 2, keep=1)
    except checkpoint_io.CheckpointWriteError as e:
      print(e.errno, str(e))
    print(sorted(os.listdir(d)))
'''


def test_write_error_removes_tmp_and_names_the_checkpoint(tmp_path):
  d = tmp_path / 'ckpts'
  out = run_python(_FSIZE_SCRIPT, str(d)).strip().split('\n')
  assert out[0].startswith(f'{errno.EFBIG} Cannot write checkpoint'
                           f' "{d}/checkpoint_2"'), out
  assert out[1] == "['checkpoint_1']", out


def _ext_array(shape, dtype_name, data=b''):
  payload = msgpack.packb([shape, dtype_name, data], use_bin_type=True)
  return msgpack.ExtType(serialization._ExtType.ndarray, payload)  # pylint: disable=protected-access


@pytest.mark.parametrize('shape', [
    [0, 2**62, 2**62],  # numpy: array is too big
    [0] + [1] * 70,  # more dimensions than numpy allows
    [0, 2**63],  # beyond int64
])
def test_impossible_shapes_name_the_file(tmp_path, shape):
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(msgpack.packb({'a': _ext_array(shape, 'float32')}))
  with pytest.raises(errors.CheckpointReadError) as e:
    checkpoints.restore_checkpoint(tmp_path, None)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_impossible_chunked_shape_names_the_file(tmp_path):
  chunked = {serialization.CHUNKED_KEY: True,
             'shape': {'0': 0, '1': 2**62, '2': 2**62},
             'chunks': {'0': _ext_array([0], 'float32')}}
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(msgpack.packb({'a': chunked}))
  with pytest.raises(errors.CheckpointReadError) as e:
    checkpoints.restore_checkpoint(tmp_path, None)
  assert str(path) in str(e.value)


# ---------------------------------------------------------------------------
# (d) Memory of the reader.

_MEMORY_SCRIPT = '''
    import os, resource, sys
    import numpy as np
    from gintrain.lib import checkpoint_io
    path, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    shape = (0,) if kind == 'empty' else (4,)
    def peak():
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = peak()
    got = checkpoint_io.read_checkpoint_file(path)
    assert len(got) == n and got[str(n - 1)].shape == shape
    print((peak() - before) / os.path.getsize(path))
'''


@pytest.mark.parametrize('kind,limit', [('empty', 6.0), ('tiny', 10.0)])
def test_reader_peak_memory_on_many_tiny_arrays(tmp_path, kind, limit):
  path, n = tmp_path / 'ck', 500_000
  shape = (0,) if kind == 'empty' else (4,)
  # Written here (a fresh interpreter only for the reader: its peak memory
  # is what is measured).
  path.write_bytes(serialization.to_bytes(
      {str(i): np.zeros(shape, np.float32) for i in range(n)}))
  ratio = float(run_python(_MEMORY_SCRIPT, str(path), kind, str(n)))
  # Extra peak memory / file size. Before the fix: about 26x (empty arrays)
  # and 14x (4-element arrays); the dict's key strings alone cost ~3.7x and
  # a numpy array object ~250 bytes; flax's reader: 17x and 12x.
  assert ratio < limit, ratio


def test_tiny_and_empty_arrays_restore_as_flax(tmp_path):
  tree = {'e': np.zeros((0, 3), np.float32), 'e2': np.zeros((0, 3), np.float32),
          'e3': np.zeros(0, np.int8), 's': np.float32(2.5),
          'm': np.arange(6, dtype=np.int16).reshape(2, 3),
          'l': [np.ones(2), np.zeros(0)], 'big': np.arange(300_000.)}
  data = serialization.to_bytes(tree)
  (tmp_path / 'checkpoint_1').write_bytes(data)
  got = checkpoint_io.read_checkpoint_file(str(tmp_path / 'checkpoint_1'))
  want = flax_serialization.msgpack_restore(data)
  assert got.keys() == want.keys()
  for k in ('e', 'e2', 'e3', 'm', 'big', 's'):
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
    np.testing.assert_array_equal(got[k], want[k])
  for a, b in zip(got['l'], want['l']):
    np.testing.assert_array_equal(a, b)
  for k in ('e', 'm', 'big'):
    assert not got[k].flags.writeable
  assert serialization.to_bytes(got) == data


# ---------------------------------------------------------------------------
# (e) Resuming past a corrupt latest checkpoint.


def test_latest_valid_checkpoint_skips_corrupt_ones(tmp_path, caplog):
  d = str(tmp_path)
  for step in (1, 2, 3, 4):
    checkpoints.save_checkpoint(d, {'w': np.full(1000, step)}, step, keep=5)
  assert checkpoints.latest_valid_checkpoint(d).endswith('checkpoint_4')
  with open(tmp_path / 'checkpoint_4', 'r+b') as f:
    f.truncate(100)
  (tmp_path / 'checkpoint_3').write_bytes(b'\xc1garbage')
  with caplog.at_level(logging.WARNING):
    path = checkpoints.latest_valid_checkpoint(d)
  assert path == str(tmp_path / 'checkpoint_2')
  skipped = [r.getMessage() for r in caplog.records
             if 'Skipping' in r.getMessage()]
  assert len(skipped) == 2
  assert 'checkpoint_4' in skipped[0] and 'checkpoint_3' in skipped[1]
  assert checkpoints.restore_checkpoint(path, None)['w'][0] == 2
  # Existing functions are unchanged: latest is still the corrupt one.
  assert checkpoints.latest_checkpoint(d).endswith('checkpoint_4')
  with pytest.raises(errors.CheckpointReadError):
    checkpoints.restore_checkpoint(d, None)
  for step in (1, 2):
    os.remove(tmp_path / f'checkpoint_{step}')
  assert checkpoints.latest_valid_checkpoint(d) is None
  assert checkpoints.latest_valid_checkpoint(tmp_path / 'missing') is None
