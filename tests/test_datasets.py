"""runner.datasets: digits and synthetic, splits fixed by seed."""

import doctest

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from gintrain.runner.data import datasets


def test_digits_is_a_stratified_disjoint_cover_fixed_by_seed():
  ds = datasets.digits(test_fraction=0.25, seed=0)
  raw = load_digits()
  assert ds.num_classes == 10 and ds.input_shape == (64,)
  assert ds.num_train + ds.num_test == len(raw.target) == 1797
  assert ds.num_test == pytest.approx(0.25 * 1797, abs=5)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.min() == 0 and ds.x_train.max() == 1
  # Every original example lands in exactly one split, with its own label.
  lookup = {row.tobytes(): [] for row in (raw.data / 16).astype(np.float32)}
  for row, label in zip((raw.data / 16).astype(np.float32), raw.target):
    lookup[row.tobytes()].append(label)
  rows = np.concatenate([ds.x_train, ds.x_test])
  labels = np.concatenate([ds.y_train, ds.y_test])
  assert len({r.tobytes() for r in rows}) == len(lookup)
  for row, label in zip(rows, labels):
    assert label in lookup[row.tobytes()]
  # Stratified: each class keeps its share in test (within one example).
  counts = np.bincount(raw.target)
  test_counts = np.bincount(ds.y_test, minlength=10)
  assert np.all(np.abs(test_counts - 0.25 * counts) <= 1)
  # Fixed by seed; another seed gives another split.
  again = datasets.digits(test_fraction=0.25, seed=0)
  np.testing.assert_array_equal(again.x_test, ds.x_test)
  np.testing.assert_array_equal(again.y_train, ds.y_train)
  other = datasets.digits(test_fraction=0.25, seed=1)
  assert not np.array_equal(other.x_test, ds.x_test)


def test_digits_split_is_pinned():
  # Guards reproducibility across library versions: the split depends only on
  # numpy's default_rng, so these values must never change.
  ds = datasets.digits(seed=0)
  assert (ds.num_train, ds.num_test) == (1347, 450)
  assert ds.y_test[:12].tolist() == PINNED_Y_TEST_HEAD
  assert float(ds.x_test.sum()) == pytest.approx(PINNED_X_TEST_SUM, rel=1e-6)


PINNED_Y_TEST_HEAD = [9, 6, 4, 5, 7, 1, 8, 8, 7, 0, 4, 4]
PINNED_X_TEST_SUM = 8753.9375


def test_digits_image_layout_and_fraction():
  flat = datasets.digits(seed=3)
  img = datasets.digits(seed=3, image=True)
  assert img.input_shape == (8, 8, 1) and img.x_test.shape == (450, 8, 8, 1)
  np.testing.assert_array_equal(img.x_train.reshape(-1, 64), flat.x_train)
  small = datasets.digits(test_fraction=0.1)
  assert small.num_test == pytest.approx(180, abs=5)


def test_synthetic_is_learnable_and_deterministic():
  ds = datasets.synthetic(num_train=512, num_test=256, num_features=8,
                          num_classes=3, seed=0)
  assert ds.x_train.shape == (512, 8) and ds.x_test.shape == (256, 8)
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  assert set(np.unique(ds.y_train)) == {0, 1, 2}
  clf = LogisticRegression(max_iter=500).fit(ds.x_train, ds.y_train)
  assert clf.score(ds.x_test, ds.y_test) > 0.9  # a learnable linear teacher
  again = datasets.synthetic(num_train=512, num_test=256, num_features=8,
                             num_classes=3, seed=0)
  np.testing.assert_array_equal(again.x_test, ds.x_test)
  other = datasets.synthetic(num_train=512, num_test=256, num_features=8,
                             num_classes=3, seed=1)
  assert not np.array_equal(other.y_train, ds.y_train)


@pytest.mark.parametrize('fn,kwargs,word', [
    (datasets.digits, {'test_fraction': 0}, 'test_fraction'),
    (datasets.digits, {'test_fraction': 1.0}, 'test_fraction'),
    (datasets.digits, {'test_fraction': '0.2'}, 'test_fraction'),
    (datasets.digits, {'seed': -1}, 'seed'),
    (datasets.digits, {'seed': 1.5}, 'seed'),
    (datasets.digits, {'image': 'yes'}, 'image'),
    (datasets.synthetic, {'num_train': 0}, 'num_train'),
    (datasets.synthetic, {'num_test': -3}, 'num_test'),
    (datasets.synthetic, {'num_features': 2.0}, 'num_features'),
    (datasets.synthetic, {'num_classes': 1}, 'num_classes'),
    (datasets.synthetic, {'seed': True}, 'seed'),
])
def test_bad_arguments_name_the_parameter(fn, kwargs, word):
  with pytest.raises(ValueError, match=word):
    fn(**kwargs)


def test_dataset_checks_consistency():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match='y_train'):
    datasets.Dataset(x, np.zeros(3, np.int32), x, np.zeros(4, np.int32), 2)
  with pytest.raises(ValueError, match='labels outside'):
    datasets.Dataset(x, np.full(4, 2, np.int32), x, np.zeros(4, np.int32), 2)
  with pytest.raises(ValueError, match='x_test'):
    datasets.Dataset(x, np.zeros(4, np.int32), np.zeros((4, 5), np.float32),
                     np.zeros(4, np.int32), 2)


def test_docstring_examples_run():
  for module in (datasets,):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__


def test_digits_read_without_sklearn_equals_load_digits():
  pixels, labels = datasets._digits_arrays()  # pylint: disable=protected-access
  raw = load_digits()
  np.testing.assert_array_equal(pixels, raw.data)
  np.testing.assert_array_equal(labels, raw.target)


def test_the_default_dataset_does_not_import_sklearn():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys\nfrom gintrain.runner.data import datasets\n'
          'datasets.digits(image=True)\nprint("sklearn" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, timeout=120).stdout
  assert out.strip() == 'False'
