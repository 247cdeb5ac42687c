"""The packed layout on an object store (issue 21): the two files of each
process are two objects on a real S3 API server (moto, tests/s3_server.py),
committed by the marker written last; restores are ranged GETs, exact into
other shardings, and a swapped slice is caught by its hash."""

import os
import sys

import jax
import numpy as np
import pytest
from jax.experimental.array_serialization import serialization as jax_ser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from s3_server import s3  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position

from gintrain.lib import checkpoints_multiprocess  # pylint: disable=wrong-import-position
from gintrain.lib import errors  # pylint: disable=wrong-import-position
from gintrain.lib import multiprocess_arrays as mpa  # pylint: disable=wrong-import-position
from gintrain.lib import storage  # pylint: disable=wrong-import-position

W = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)


def _named(spec):
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))
  return NamedSharding(mesh, spec)


def test_packed_arrays_on_s3(s3, tmp_path):  # pylint: disable=redefined-outer-name
  del tmp_path
  s3.create_bucket('packed')
  ckpt, tmp = 's3://packed/run/checkpoint_1', 's3://packed/run/.tmp_1'
  arrays = {'params/w': jax.device_put(W, _named(P('data', 'model'))),
            'params/v': jax.device_put(W[:8] * 2, _named(P()))}
  mpa.prepare_array_dir(tmp, ckpt, list(arrays), 'packed')
  mgr = jax_ser.GlobalAsyncCheckpointManager(timeout_secs=60)
  mpa.save_multiprocess_arrays(
      mgr, list(arrays.items()), tmp, ckpt,
      on_commit=lambda: mpa.commit_array_dir(tmp, ckpt),
      array_format='packed', buffers_stay_valid=True)
  mgr.wait_until_finished()
  gda = mpa.array_dir(ckpt)
  assert storage.listdir(gda) == [mpa.COMMIT_SUCCESS_FILE, 'packed']
  assert storage.listdir(f'{gda}/packed') == ['process_0.bin',
                                              'process_0.json']
  assert checkpoints_multiprocess.checkpoint_files(ckpt)[1] == 3
  state = {'params': {'w': mpa.MP_ARRAY_PH + 'params/w',
                      'v': mpa.MP_ARRAY_PH + 'params/v'}}
  mpa.verify_arrays(ckpt, state)
  for w_spec in (P('data', 'model'), P(None, 'data'), P()):
    out = mpa.read_arrays(state, ckpt, {'params': {
        'w': _named(w_spec), 'v': _named(P('model'))}})
    assert out['params']['w'].sharding == _named(w_spec)
    np.testing.assert_array_equal(np.asarray(out['params']['w']), W)
    np.testing.assert_array_equal(np.asarray(out['params']['v']), W[:8] * 2)
  # Two slices of w swapped in the data object: its hash names the array.
  import json  # pylint: disable=g-import-not-at-top
  index = json.loads(storage.read_bytes(f'{gda}/packed/process_0.json'))
  a, b = index['arrays']['params/w']['chunks'][:2]
  data = bytearray(storage.read_bytes(f'{gda}/packed/process_0.bin'))
  first = bytes(data[a['offset']:a['offset'] + a['nbytes']])
  data[a['offset']:a['offset'] + a['nbytes']] = data[
      b['offset']:b['offset'] + b['nbytes']]
  data[b['offset']:b['offset'] + b['nbytes']] = first
  storage.write_bytes(f'{gda}/packed/process_0.bin', bytes(data))
  with pytest.raises(errors.CheckpointReadError, match='params/w'):
    mpa.read_arrays(state, ckpt, {'params': {
        'w': _named(P('data', 'model')), 'v': _named(P())}})
  # Without the commit marker the arrays do not count as written.
  storage.remove(f'{gda}/{mpa.COMMIT_SUCCESS_FILE}')
  with pytest.raises(errors.MPARestoreDataCorruptedError):
    mpa.read_arrays(state, ckpt, {'params': {
        'w': _named(P('data', 'model')), 'v': _named(P())}})
