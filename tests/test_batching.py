"""runner.batching: batches are a pure function of (seed, step)."""

import doctest
import json
import subprocess
import sys

import numpy as np
import pytest

from gintrain.runner.data import batching


def test_each_epoch_is_a_permutation_without_repeats():
  n, b = 23, 5  # 4 full batches per epoch, 3 examples dropped each epoch
  spe = batching.steps_per_epoch(n, b)
  assert spe == 4
  epochs = []
  for epoch in range(3):
    seen = np.concatenate([
        batching.global_batch_indices(n, b, 7, epoch * spe + i)
        for i in range(spe)])
    assert len(seen) == spe * b and len(set(seen.tolist())) == len(seen)
    assert seen.min() >= 0 and seen.max() < n
    np.testing.assert_array_equal(
        seen, batching.epoch_permutation(n, 7, epoch)[:spe * b])
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1])  # fresh order per epoch


def test_resumed_run_sees_the_same_batches():
  # An uninterrupted run, and one that "restarts" at step 9 (new process
  # state: caches cleared), must see identical batches at every step.
  n, b, seed = 50, 8, 3
  full = [batching.global_batch_indices(n, b, seed, s) for s in range(20)]
  batching._permutation.cache_clear()  # pylint: disable=protected-access
  resumed = [batching.global_batch_indices(n, b, seed, s)
             for s in range(9, 20)]
  for s, idx in zip(range(9, 20), resumed):
    np.testing.assert_array_equal(idx, full[s])
  # Order of calls does not matter either.
  for s in (17, 2, 11, 2):
    np.testing.assert_array_equal(
        batching.global_batch_indices(n, b, seed, s), full[s])
  assert not np.array_equal(full[0],
                            batching.global_batch_indices(n, b, seed + 1, 0))


def test_batches_are_stable_across_interpreters():
  # The permutation comes from numpy's default_rng([seed, epoch]) only:
  # another interpreter (another host) computes the same batch.
  code = ('from gintrain.runner.data import batching;'
          'print(batching.global_batch_indices(1000, 16, 5, 123).tolist())')
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       capture_output=True, text=True).stdout
  here = batching.global_batch_indices(1000, 16, 5, 123)
  assert json.loads(out) == here.tolist()
  epoch, i = divmod(123, 1000 // 16)
  want = np.random.default_rng([5, epoch]).permutation(1000)[i * 16:][:16]
  np.testing.assert_array_equal(
      batching.global_batch_indices(1000, 16, 5, 123), want)


def test_returned_indices_are_a_private_copy():
  idx = batching.global_batch_indices(10, 5, 0, 0)
  idx[:] = -1  # must not corrupt the cached permutation
  assert batching.global_batch_indices(10, 5, 0, 0).min() >= 0
  with pytest.raises(ValueError):
    batching.epoch_permutation(10, 0, 0)[0] = 3  # read-only


def test_process_slices_concatenate_to_the_global_batch():
  idx = batching.global_batch_indices(100, 12, 1, 4)
  for count in (1, 2, 3, 4, 6, 12):
    parts = [batching.process_slice(idx, p, count) for p in range(count)]
    assert all(len(part) == 12 // count for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), idx)


def test_process_slice_errors():
  idx = np.arange(10)
  with pytest.raises(ValueError, match='not divisible by process_count 4'):
    batching.process_slice(idx, 0, 4)
  with pytest.raises(ValueError, match='process_index'):
    batching.process_slice(idx, 2, 2)
  with pytest.raises(ValueError, match='process_index'):
    batching.process_slice(idx, -1, 2)
  with pytest.raises(ValueError, match='process_count'):
    batching.process_slice(idx, 0, 0)


@pytest.mark.parametrize('args,word', [
    ((10, 11, 0, 0), 'batch_size 11 is larger'),
    ((10, 0, 0, 0), 'batch_size'),
    ((0, 1, 0, 0), 'num_examples'),
    ((10, 2, -1, 0), 'seed'),
    ((10, 2, 0, -5), 'step'),
    ((10, 2, 0, 1.0), 'step'),
    ((10, True, 0, 0), 'batch_size'),
])
def test_bad_arguments_name_the_parameter(args, word):
  with pytest.raises(ValueError, match=word):
    batching.global_batch_indices(*args)


def test_numpy_integer_arguments_are_accepted():
  a = batching.global_batch_indices(np.int64(30), np.int32(6), np.uint8(2),
                                    np.int64(7))
  np.testing.assert_array_equal(a, batching.global_batch_indices(30, 6, 2, 7))
  assert batching.steps_per_epoch(30, 30) == 1


def test_docstring_examples_run():
  for module in (batching,):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__
