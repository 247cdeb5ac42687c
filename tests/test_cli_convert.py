"""``gintrain ckpt convert``: msgpack -> Orbax -> msgpack gives the same bytes."""

import os

import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.runner.cli import ckpt
from gintrain.runner.training import state as state_lib

pytest.importorskip('orbax.checkpoint')
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def test_round_trip_gives_identical_bytes(tmp_path):
  import optax  # pylint: disable=g-import-not-at-top
  variables = {'params': {'Dense_0': {'kernel': np.ones((3, 4), np.float32),
                                      'bias': np.zeros(4, np.float32)}}}
  state = state_lib.create_train_state(variables, None, optax.adam(1e-3))
  tree = {'state': state, 'data': {'seed': 0, 'step': 7},
          'best': {'steps': np.array([5]), 'values': np.array([0.25])}}
  checkpoints.save_checkpoint(str(tmp_path / 'ck'), tree, step=7)
  src = str(tmp_path / 'ck' / 'checkpoint_7')
  assert ckpt.main(['convert', src, str(tmp_path / 'orbax_7')]) == 0
  assert os.path.isdir(tmp_path / 'orbax_7')
  assert ckpt.main(['convert', str(tmp_path / 'orbax_7'),
                    str(tmp_path / 'back_7')]) == 0
  assert (tmp_path / 'back_7').read_bytes() == open(src, 'rb').read()


def test_convert_refuses_an_existing_destination(tmp_path, capsys):
  src = tmp_path / 'a'
  src.write_bytes(b'x')
  assert ckpt.main(['convert', str(src), str(src)]) == 1
  assert 'exists; choose a new destination' in capsys.readouterr().err
