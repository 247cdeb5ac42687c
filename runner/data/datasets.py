"""In-memory datasets that need no download (classification and regression).

    >>> ds = digits(test_fraction=0.25, seed=0)
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((1347, 64), (450, 64), 10)
    >>> digits(image=True).input_shape
    (8, 8, 1)
    >>> synthetic(num_train=64, num_test=16, num_features=5).x_train.shape
    (64, 5)
    >>> diabetes().y_train.dtype, diabetes().num_classes
    (dtype('float32'), None)

Inputs are float32; classification labels are int32 in
``[0, num_classes)``, regression targets float32 (``num_classes=None``). Splits depend only
on the arguments (``seed`` included), so runs are reproducible.
"""

import dataclasses
import gzip
import importlib.util
import os

import numpy as np

from gintrain.runner.validation import check_fraction, check_int

__all__ = ['Dataset', 'digits', 'synthetic', 'diabetes']


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test split held in host memory as numpy arrays.

  Attributes:
    x_train, y_train: training inputs (N, ...) and labels/targets (N, ...).
    x_test, y_test: the held-out split, same layout.
    num_classes: labels lie in ``[0, num_classes)``; ``None`` for
      regression targets (any real values).
    name: a short description, for logs.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int | None
  name: str = 'dataset'

  def __post_init__(self):
    for split in ('train', 'test'):
      x, y = getattr(self, f'x_{split}'), getattr(self, f'y_{split}')
      if x.ndim < 2 or y.shape[:1] != x.shape[:1]:
        raise ValueError(
            f'{self.name}: x_{split} {x.shape} and y_{split} {y.shape} must'
            ' have the same number of rows, with x at least 2-D.')
      if self.num_classes is not None and y.size and (
          y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f'{self.name}: y_{split} has labels outside'
                         f' [0, {self.num_classes}).')
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(f'{self.name}: x_train rows {self.x_train.shape[1:]}'
                       f' differ from x_test rows {self.x_test.shape[1:]}.')

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.x_test.shape[0])

  @property
  def info(self) -> dict:
    """What tasks check against: ``num_classes`` or ``target_dim``."""
    if self.num_classes is None:
      return {'target_dim': 1 if self.y_train.ndim == 1 else
              int(self.y_train.shape[-1])}
    return {'num_classes': self.num_classes}

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one example (no batch axis)."""
    return tuple(self.x_train.shape[1:])


def _stratified_split(labels, test_fraction, rng):
  """Indices (train, test): each class contributes round(n_c * fraction) test
  rows (at least one, and at least one left to train when n_c >= 2)."""
  train, test = [], []
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(rows) * test_fraction))
    n_test = min(max(n_test, 1), max(len(rows) - 1, 1))
    test.append(rows[:n_test])
    train.append(rows[n_test:])
  train = rng.permutation(np.concatenate(train))
  test = rng.permutation(np.concatenate(test))
  return train, test


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as (pixels (1797, 64), labels (1797,)).

  Read from the data file scikit-learn ships (``digits.csv.gz``: 64 pixels
  and the label per row, what ``load_digits`` parses) without importing
  scikit-learn, whose import (scipy.stats) costs seconds of every run's
  start; ``load_digits`` where that file is not found or not as expected.
  """
  spec = importlib.util.find_spec('sklearn')
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, 'datasets', 'data', 'digits.csv.gz')
    if os.path.isfile(path):
      with gzip.open(path, 'rt') as f:
        data = np.loadtxt(f, delimiter=',')
      if data.shape == (1797, 65):
        return data[:, :-1], data[:, -1].astype(int)
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  raw = load_digits()
  return raw.data, raw.target


def digits(test_fraction: float = 0.25, seed: int = 0,
           image: bool = False) -> Dataset:
  """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

  Args:
    test_fraction: the share of each class held out for test, in (0, 1).
    seed: fixes the stratified shuffle-split (numpy ``default_rng(seed)``,
      independent of the scikit-learn version).
    image: ``False``: rows of 64 pixels; ``True``: NHWC images (N, 8, 8, 1).

  Pixels are scaled from 0..16 to [0, 1].
  """
  check_fraction('test_fraction', test_fraction)
  seed = check_int('seed', seed, 0)
  if not isinstance(image, (bool, np.bool_)):
    raise ValueError(f'image must be True or False, got {image!r}.')
  pixels, labels = _digits_arrays()
  x = (np.asarray(pixels, np.float32) / 16.0).astype(np.float32)
  y = np.asarray(labels, np.int32)
  if image:
    x = x.reshape((-1, 8, 8, 1))
  train, test = _stratified_split(y, float(test_fraction),
                                  np.random.default_rng(seed))
  return Dataset(x[train], y[train], x[test], y[test], num_classes=10,
                 name=f'digits(test_fraction={test_fraction}, seed={seed},'
                 f' image={bool(image)})')


def synthetic(num_train: int = 512, num_test: int = 128,
              num_features: int = 16, num_classes: int = 4,
              seed: int = 0) -> Dataset:
  """A learnable Gaussian task labelled by a random linear teacher.

  Inputs are standard normal; the label is the arg-max of ``x @ W + b`` for a
  random ``W`` and ``b`` fixed by ``seed``, so a linear model can reach 100%
  accuracy and a small MLP learns it in a few hundred steps.
  """
  num_train = check_int('num_train', num_train, 1)
  num_test = check_int('num_test', num_test, 1)
  num_features = check_int('num_features', num_features, 1)
  num_classes = check_int('num_classes', num_classes, 2)
  seed = check_int('seed', seed, 0)
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((num_features, num_classes))
  b = 0.1 * rng.standard_normal(num_classes)
  x = rng.standard_normal((num_train + num_test, num_features))
  y = np.argmax(x @ w + b, axis=-1)
  x, y = x.astype(np.float32), y.astype(np.int32)
  return Dataset(x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                 num_classes=num_classes,
                 name=(f'synthetic(num_train={num_train}, num_test={num_test},'
                       f' num_features={num_features},'
                       f' num_classes={num_classes}, seed={seed})'))


def diabetes(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's bundled diabetes regression data (442 patients, 10
  standardised features, a disease-progression target), for regression.

  The target is standardised with the training split's mean and standard
  deviation, so a constant predictor has a mean squared error of about 1.

  Args:
    test_fraction: the share held out for test, in (0, 1).
    seed: fixes the shuffle-split (numpy ``default_rng(seed)``).
  """
  check_fraction('test_fraction', test_fraction)
  seed = check_int('seed', seed, 0)
  from sklearn.datasets import load_diabetes  # pylint: disable=g-import-not-at-top
  raw = load_diabetes()
  x = np.asarray(raw.data, np.float64)
  y = np.asarray(raw.target, np.float64)
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = max(1, int(round(len(y) * test_fraction)))
  test, train = order[:n_test], order[n_test:]
  mean, std = x[train].mean(0), x[train].std(0)
  x = (x - mean) / std
  y = (y - y[train].mean()) / y[train].std()
  x, y = x.astype(np.float32), y.astype(np.float32)
  return Dataset(x[train], y[train], x[test], y[test], num_classes=None,
                 name=f'diabetes(test_fraction={test_fraction}, seed={seed})')
