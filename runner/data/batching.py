"""Deterministic batch order: the batch at a step depends on (seed, step) only.

Epoch ``e = step // steps_per_epoch`` visits the examples in the order of
``np.random.default_rng([seed, e]).permutation(num_examples)``; step ``s`` takes
the ``s % steps_per_epoch``-th full batch of it (the remainder is dropped).
So a run resumed at step ``s`` sees exactly the batches an uninterrupted run
sees, whatever process count either uses::

    >>> spe = steps_per_epoch(10, 4)
    >>> spe
    2
    >>> idx = global_batch_indices(10, 4, seed=0, step=3)
    >>> idx.shape, bool((idx == global_batch_indices(10, 4, 0, 3)).all())
    ((4,), True)
    >>> process_slice(np.arange(8), process_index=1, process_count=2)
    array([4, 5, 6, 7])
"""

import functools

import numpy as np

from gintrain.runner.validation import check_int

__all__ = ['steps_per_epoch', 'global_batch_indices', 'process_slice',
           'epoch_permutation']


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch: ``num_examples // batch_size``.

  Raises:
    ValueError: ``batch_size`` is not positive, or is larger than
      ``num_examples`` (no full batch would exist).
  """
  num_examples = check_int('num_examples', num_examples, 1)
  batch_size = check_int('batch_size', batch_size, 1)
  if batch_size > num_examples:
    raise ValueError(
        f'batch_size {batch_size} is larger than the dataset'
        f' ({num_examples} examples); use batch_size <= {num_examples}.')
  return num_examples // batch_size


@functools.lru_cache(maxsize=4)
def _permutation(num_examples, seed, epoch):
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.setflags(write=False)
  return perm


def epoch_permutation(num_examples: int, seed: int,
                      epoch: int) -> np.ndarray:
  """The (read-only) example order of ``epoch``; cached for recent epochs."""
  num_examples = check_int('num_examples', num_examples, 1)
  seed = check_int('seed', seed, 0)
  epoch = check_int('epoch', epoch, 0)
  return _permutation(num_examples, seed, epoch)


def global_batch_indices(num_examples: int, batch_size: int, seed: int,
                         step: int) -> np.ndarray:
  """Example indices (``batch_size``, int64) of the global batch at ``step``.

  A pure function of its arguments. Within an epoch no index repeats; every
  epoch uses a fresh permutation.

  Raises:
    ValueError: for a negative ``seed`` or ``step``, or a bad ``batch_size``
      (see ``steps_per_epoch``).
  """
  spe = steps_per_epoch(num_examples, batch_size)
  seed = check_int('seed', seed, 0)
  step = check_int('step', step, 0)
  epoch, i = divmod(step, spe)
  perm = epoch_permutation(num_examples, seed, epoch)
  return perm[i * batch_size:(i + 1) * batch_size].copy()


def process_slice(indices: np.ndarray, process_index: int,
                  process_count: int) -> np.ndarray:
  """This process's contiguous share of a global batch.

  Process ``p`` of ``n`` gets rows ``[p * B/n, (p+1) * B/n)``, so the shares
  concatenated in process order are the global batch.

  Raises:
    ValueError: the batch size is not divisible by ``process_count``, or
      ``process_index`` is not in ``[0, process_count)``.
  """
  process_count = check_int('process_count', process_count, 1)
  process_index = check_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index {process_index} must be less than'
                     f' process_count {process_count}.')
  n = len(indices)
  if n % process_count:
    raise ValueError(
        f'The global batch_size {n} is not divisible by process_count'
        f' {process_count}; choose a batch_size that is a multiple of'
        f' {process_count}.')
  share = n // process_count
  return indices[process_index * share:(process_index + 1) * share]
