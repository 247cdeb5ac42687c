"""The integrity sidecar (``.<checkpoint>.xxh3``, issue 12): beyond flax.

Shown here, on local files (the S3 side is in tests/test_object_store.py):
* the fuzz corpus of tests/test_checkpoint_io.py (every truncation, bit
  flips at every byte, random bytes, hostile headers and malicious arrays)
  put in place of a checkpoint whose sidecar is present: 100% detected, each
  a one-line ``CheckpointReadError`` naming the file, including the flips
  inside array data that decode without a sidecar;
* the main file stays byte-identical to flax's; flax-written files (no
  sidecar) restore as before; retention deletes sidecars with their
  checkpoints and listing never shows one; ``gintrain ckpt ls`` ignores
  them; a malformed sidecar is reported;
* peak RSS of restoring a crafted 40 MB file of hostile array headers, in a
  subprocess (``resource.getrusage`` in a child forked after the imports,
  whose peak starts at the RSS of the imports, about 70 MB, not at their
  transient peak): when the sidecar does not match, the file is rejected
  before any parsing, the restore adds under 16 MB and the process peaks
  under 200 MB (77 MB measured); even with a crafted matching sidecar, when
  the file is decoded, the restore adds under 200 MB (68 -> 187 MB).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash
from flax.training import checkpoints as flax_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from test_checkpoint_io import chunk_size  # pylint: disable=unused-import
from test_checkpoint_io import ext_array
from test_checkpoint_io import sample_file
from test_checkpoints import flax_msgpack_backend  # pylint: disable=unused-import  (autouse)

from gintrain.lib import checkpoint_io
from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints
from gintrain.lib import errors
from gintrain.lib import serialization
from gintrain.runner.cli import ckpt as ckpt_cli
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sidecars_on():
  checkpoint_io.set_integrity_sidecar(True)
  yield
  checkpoint_io.set_integrity_sidecar('auto')


def corpus(good: bytes):
  """``(kind, bytes)``: the fuzz corpus of tests/test_checkpoint_io.py."""
  rng = np.random.default_rng(0)
  for n in range(len(good)):
    yield 'truncation', good[:n]
  yield 'extra byte', good + b'\x00'
  for i in range(len(good)):
    for bit in (0, 3, 7):
      mutated = bytearray(good)
      mutated[i] ^= 1 << bit
      yield 'bit flip', bytes(mutated)
  for n in list(range(1, 40)) + [100, 1000, 10_000]:
    for _ in range(20 if n < 100 else 5):
      yield 'random', rng.integers(0, 256, n, dtype=np.uint8).tobytes()
  for data in (b'', b'\xc1', b'\xdd\xff\xff\xff\xff', b'\xc6\xff\xff\xff\xff',
               b'\x91' * 10_000, b'\x81\x91\x01\x02', b'\xa2\xff\xfe',
               ext_array([1], b'object', b'\x00' * 8),
               ext_array([1], b'V8,O', b'\x00' * 16),
               ext_array([2], b'float32', b'\x00' * 4),
               ext_array([-1], b'float32', b'\x00' * 4),
               ext_array([10**12], b'uint8', b'\x00' * 4),
               ext_array([1], b'no_such_dtype', b'\x00'),
               ext_array([1], b'(1000,)f4', b'\x00' * 4000),
               ext_array([0, 2**62, 2**62], b'float32', b''),
               ext_array([0] + [1] * 70, b'float32', b'')):
    yield 'hostile header', data


def test_fuzz_corpus_is_always_detected_with_a_sidecar(tmp_path, chunk_size,  # pylint: disable=redefined-outer-name
                                                       sidecars_on):  # pylint: disable=unused-argument
  good = sample_file(chunk_size)
  tree = serialization.msgpack_restore(good)
  path = checkpoints.save_checkpoint(tmp_path, tree, 1)
  with open(path, 'rb') as f:
    assert f.read() == good  # the main file is unchanged by the sidecar
  assert os.path.exists(checkpoint_naming.sidecar_path(path))
  total, detected, decodes_without = 0, 0, 0
  for kind, data in corpus(good):
    if data == good:
      continue
    with open(path, 'wb') as f:
      f.write(data)
    total += 1
    try:
      serialization.msgpack_restore(data)
      decodes_without += 1  # would pass unnoticed without the sidecar
    except Exception:  # pylint: disable=broad-except
      pass
    try:
      checkpoints.restore_checkpoint(tmp_path, None)
    except errors.CheckpointReadError as e:
      assert path in str(e) and '\n' not in str(e), (kind, str(e))
      detected += 1
  assert detected == total, (detected, total)
  assert total > 2000 and decodes_without > 100, (total, decodes_without)
  with open(path, 'wb') as f:
    f.write(good)
  assert checkpoints.restore_checkpoint(tmp_path, None).keys() == tree.keys()


def test_flax_files_retention_listing_and_ckpt_ls(tmp_path, sidecars_on):  # pylint: disable=unused-argument
  tree = {'w': np.arange(10.0), 'step': 3}
  ours = checkpoints.save_checkpoint(tmp_path / 'ours', tree, 3)
  theirs = flax_ckpt.save_checkpoint(tmp_path / 'flax', tree, 3)
  with open(ours, 'rb') as a, open(theirs, 'rb') as b:
    assert a.read() == b.read()
  assert checkpoints.restore_checkpoint(tmp_path / 'flax', None)['step'] == 3
  # flax reads our directory: it never lists the sidecar
  assert flax_ckpt.latest_checkpoint(tmp_path / 'ours') == ours
  d = tmp_path / 'ret'
  for step in range(6):
    checkpoints.save_checkpoint(d, {'s': step}, step, keep=2)
  assert sorted(os.listdir(d)) == ['.checkpoint_4.xxh3', '.checkpoint_5.xxh3',
                                   'checkpoint_4', 'checkpoint_5']
  assert checkpoints.available_steps(d) == [4, 5]
  rows = ckpt_cli.list_checkpoints(str(d))
  assert [(r['step'], r['status']) for r in rows] == [(4, 'complete'),
                                                      (5, 'complete')]
  result = subprocess.run(
      [sys.executable, '-m', 'gintrain.runner.train', 'ckpt', 'ls', str(d)],
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr
  assert 'xxh3' not in result.stdout and 'checkpoint_5' in result.stdout


def test_malformed_sidecar_is_reported(tmp_path, sidecars_on):  # pylint: disable=unused-argument
  path = checkpoints.save_checkpoint(tmp_path, {'a': 1}, 1)
  side = checkpoint_naming.sidecar_path(path)
  for text in (b'garbage', b'xxh3_64 zz 5\n', b'x' * 1000, b''):
    with open(side, 'wb') as f:
      f.write(text)
    with pytest.raises(errors.CheckpointReadError, match='sidecar') as e:
      checkpoints.restore_checkpoint(tmp_path, None)
    assert path in str(e.value)


_RSS_SCRIPT = textwrap.dedent('''
    import os, resource, sys
    import msgpack
    from gintrain.lib import checkpoint_io, errors
    path, sidecar, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if not os.path.exists(path):  # a first run crafts the file
      ext = msgpack.ExtType(1, msgpack.packb([[0, 2**40], 'float32', b''],
                                             use_bin_type=True))
      with open(path, 'wb') as f:
        f.write(msgpack.packb({f'{i:07d}': ext for i in range(n)}))
      sys.exit(0)
    def peak():
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Measured in a forked child: its peak starts at the RSS it has now,
    # not at the transient peak of importing jax.
    sys.stdout.flush()
    pid = os.fork()
    if pid:
      os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    before = peak()
    try:
      checkpoint_io.read_checkpoint_file(path)
      outcome = 'decoded'
    except errors.CheckpointReadError as e:
      outcome = 'rejected'
    print(outcome, before, peak(), flush=True)
    os._exit(0)
''')


def test_peak_rss_of_a_crafted_40mb_file(tmp_path):
  path = str(tmp_path / 'checkpoint_1')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')

  def run(sidecar):
    out = subprocess.run(
        [sys.executable, '-c', _RSS_SCRIPT, path, sidecar, '1200000'],
        env=env, capture_output=True, text=True, check=True, timeout=600)
    return out.stdout.split() if out.stdout else None

  def write_sidecar(digest):
    with open(checkpoint_naming.sidecar_path(path), 'w',
              encoding='ascii') as f:
      f.write(f'xxh3_64 {digest} {os.path.getsize(path)}\n')

  run('none')  # crafts the file
  assert 39e6 < os.path.getsize(path) < 41e6
  write_sidecar('0123456789abcdef')  # another file's
  outcome, before, after = run('mismatching')
  assert outcome == 'rejected'
  # rejected before parsing: the hash pass's 8 MiB buffer at most
  assert int(after) - int(before) < 16 << 20, (before, after)
  assert int(after) < 200 << 20, (before, after)  # the whole process
  print('rejected: peak RSS', int(before) >> 20, '->', int(after) >> 20,
        'MiB')
  hasher = xxhash.xxh3_64()
  with open(path, 'rb') as f:
    for piece in iter(lambda: f.read(1 << 20), b''):
      hasher.update(piece)
  write_sidecar(hasher.hexdigest())  # a crafted, valid sidecar
  outcome, before, after = run('matching')
  assert outcome == 'decoded'
  assert int(after) - int(before) < 200 << 20, (before, after)
  print('decoded: peak RSS', int(before) >> 20, '->', int(after) >> 20, 'MiB')
