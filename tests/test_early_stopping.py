"""lib.early_stopping.EarlyStopping: flax's behaviour, plus mode='max'.

flax's EarlyStopping is the oracle for the default mode='min'.
"""

import dataclasses
import doctest
import math

import jax
import numpy as np
import pytest
from flax import serialization as flax_serialization
from flax.training import early_stopping as flax_early_stopping

from gintrain.lib import early_stopping, serialization
from gintrain.lib.early_stopping import EarlyStopping

FlaxEarlyStopping = flax_early_stopping.EarlyStopping
FIELDS = ('min_delta', 'patience', 'best_metric', 'patience_count',
          'should_stop', 'has_improved')
DOC_LOSSES = [4, 3, 3, 3, 2, 2, 2, 2, 1, 1]


def fields(es):
  return tuple(getattr(es, name) for name in FIELDS)


def assert_same_state(ours, theirs):
  for name in FIELDS:
    a, b = getattr(ours, name), getattr(theirs, name)
    assert type(a) is type(b), name
    assert a == b or (math.isnan(a) and math.isnan(b)), (name, a, b)


def stop_step(es, metrics):
  """Index of the update after which should_stop first holds, else None."""
  for i, metric in enumerate(metrics):
    es = es.update(metric)
    if es.should_stop:
      return i
  return None


def test_docstring_examples_run():
  result = doctest.testmod(early_stopping)
  assert result.attempted >= 8 and result.failed == 0


def test_docstring_sequence_per_epoch_table():
  expected = [  # (should_stop, has_improved, patience_count, best_metric)
      (False, True, 0, 4), (False, True, 0, 3), (False, False, 1, 3),
      (False, False, 2, 3), (False, True, 0, 2), (False, False, 1, 2),
      (False, False, 2, 2), (True, False, 3, 2), (True, True, 0, 1),
      (True, False, 1, 1)]
  ours = EarlyStopping(min_delta=1e-3, patience=2)
  theirs = FlaxEarlyStopping(min_delta=1e-3, patience=2)
  for loss, want in zip(DOC_LOSSES, expected):
    ours, theirs = ours.update(loss), theirs.update(loss)
    assert_same_state(ours, theirs)
    assert (ours.should_stop, ours.has_improved, ours.patience_count,
            ours.best_metric) == want


def test_defaults_and_positional_order_match_flax():
  assert fields(EarlyStopping()) == fields(FlaxEarlyStopping())
  assert fields(EarlyStopping()) == (0, 0, math.inf, 0, False, False)
  args = (0.5, 3, 2.0, 1, True, True)
  assert fields(EarlyStopping(*args)) == fields(FlaxEarlyStopping(*args))
  assert EarlyStopping().mode == 'min'


# The cases of flax's early_stopping_test.py (spec section 20).


def test_patience_zero_constant_metric_stops_at_step_one_and_after_reset():
  es = EarlyStopping(min_delta=0, patience=0)
  for _ in range(2):
    steps = []
    for i in range(10):
      es = es.update(1.0)
      if not es.has_improved:
        steps.append(i)
      if es.should_stop:
        break
    assert steps == [1] and i == 1
    es = es.reset()
    assert fields(es) == (0, 0, math.inf, 0, False, False)


@pytest.mark.parametrize('patience,step', [(0, 1), (1, 2), (6, 7)])
def test_patience_constant_metric(patience, step):
  assert stop_step(EarlyStopping(patience=patience), [1.0] * 20) == step
  assert stop_step(FlaxEarlyStopping(patience=patience), [1.0] * 20) == step


def test_small_decrease_below_min_delta():
  metrics = [1.0 - 1e-4 * i for i in range(100)]
  es = EarlyStopping(min_delta=0, patience=0)
  for i, metric in enumerate(metrics):
    es = es.update(metric)
    assert not es.should_stop
  assert i == 99
  assert stop_step(EarlyStopping(min_delta=1e-3, patience=0), metrics) == 1


def test_flax_ten_value_case():
  # flax's test: improvements at steps 0, 1, 2, 4 and a stop at step 6.
  metrics = [10, 9, 8, 8, 7, 7, 7, 7, 6, 5]
  es = EarlyStopping(min_delta=1e-3, patience=1)
  improved = []
  for i, metric in enumerate(metrics):
    es = es.update(metric)
    if es.has_improved:
      improved.append(i)
    if es.should_stop:
      break
  assert improved == [0, 1, 2, 4]
  assert i == 6
  assert stop_step(FlaxEarlyStopping(min_delta=1e-3, patience=1), metrics) == 6


def test_improvement_of_exactly_min_delta_does_not_count():
  es = EarlyStopping(min_delta=0.5, patience=5).update(2.0).update(1.5)
  assert not es.has_improved and es.best_metric == 2.0
  assert es.update(1.25).has_improved


def test_should_stop_is_sticky_until_reset():
  es = EarlyStopping(patience=0).update(1.0).update(1.0)
  assert es.should_stop
  es = es.update(0.5)
  assert es.should_stop and es.has_improved and es.patience_count == 0
  es = es.reset()
  assert not es.should_stop and es.best_metric == math.inf
  assert es.patience == 0 and es.min_delta == 0


def test_random_sequences_match_flax_exactly():
  rng = np.random.default_rng(0)
  specials = [math.inf, -math.inf, math.nan, 0.0, 0, 1, -1]
  for trial in range(300):
    min_delta = float(rng.choice([0.0, 1e-3, 0.1, 0.5, 2.0]))
    patience = int(rng.integers(0, 5))
    n = int(rng.integers(1, 25))
    metrics = rng.choice([1.0, 1.05, 0.9, 0.5, 2.0], size=n).tolist()
    if trial % 3 == 0:
      metrics[int(rng.integers(n))] = specials[trial % len(specials)]
    if trial % 5 == 0:
      metrics = [float(x) for x in np.cumsum(rng.normal(size=n))]
    ours = EarlyStopping(min_delta=min_delta, patience=patience)
    theirs = FlaxEarlyStopping(min_delta=min_delta, patience=patience)
    for k, metric in enumerate(metrics):
      ours, theirs = ours.update(metric), theirs.update(metric)
      assert_same_state(ours, theirs)
      if k == n // 2:
        ours, theirs = ours.reset(), theirs.reset()
        assert_same_state(ours, theirs)


def test_inf_and_nan_edge_cases_as_flax():
  es = EarlyStopping().update(-math.inf)
  assert es.update(5.0).has_improved  # isinf(-inf): every update improves
  es = EarlyStopping(patience=10).update(math.nan)
  assert math.isnan(es.best_metric)
  for metric in [0.0, -100.0, math.inf]:
    es = es.update(metric)
    assert not es.has_improved


def test_state_dict_and_bytes_equal_flax():
  ours = EarlyStopping(min_delta=1e-3, patience=2)
  theirs = FlaxEarlyStopping(min_delta=1e-3, patience=2)
  for loss in DOC_LOSSES[:5]:
    ours, theirs = ours.update(loss), theirs.update(loss)
  sd = serialization.to_state_dict(ours)
  assert sd == flax_serialization.to_state_dict(theirs)
  assert set(sd) == set(FIELDS)
  assert serialization.to_bytes(ours) == flax_serialization.to_bytes(theirs)
  restored = serialization.from_bytes(
      EarlyStopping(), flax_serialization.to_bytes(theirs))
  assert_same_state(restored, theirs)


def test_leaves_match_flax_and_mode_is_static():
  ours = EarlyStopping(min_delta=1e-3, patience=2, mode='max')
  theirs = FlaxEarlyStopping(min_delta=1e-3, patience=2)
  assert len(jax.tree_util.tree_leaves(ours)) == len(
      jax.tree_util.tree_leaves(theirs)) == 6
  assert 'mode' not in serialization.to_state_dict(ours)
  assert jax.tree_util.tree_map(lambda x: x, ours) == ours
  passed = jax.jit(lambda es: es)(ours)
  assert passed.mode == 'max'
  assert (jax.tree_util.tree_structure(ours) !=
          jax.tree_util.tree_structure(EarlyStopping(min_delta=1e-3,
                                                     patience=2)))


# mode='max'


def test_max_mode_starts_at_minus_inf_and_state_dict_keys_match():
  es = EarlyStopping(mode='max')
  assert es.best_metric == -math.inf
  sd = serialization.to_state_dict(es)
  assert set(sd) == set(FIELDS) and sd['best_metric'] == -math.inf
  assert es.reset().best_metric == -math.inf
  assert EarlyStopping(best_metric=0.3, mode='max').best_metric == 0.3


def test_max_mode_accuracy_sequence():
  accs = [0.5, 0.6, 0.6, 0.6004, 0.7, 0.69, 0.7, 0.7005]
  expected = [  # (should_stop, has_improved, patience_count, best_metric)
      (False, True, 0, 0.5), (False, True, 0, 0.6), (False, False, 1, 0.6),
      (False, False, 2, 0.6), (False, True, 0, 0.7), (False, False, 1, 0.7),
      (False, False, 2, 0.7), (True, False, 3, 0.7)]
  es = EarlyStopping(min_delta=1e-3, patience=2, mode='max')
  for acc, want in zip(accs, expected):
    es = es.update(acc)
    assert (es.should_stop, es.has_improved, es.patience_count,
            es.best_metric) == want


def test_max_mode_mirrors_min_mode_on_negated_metrics():
  rng = np.random.default_rng(1)
  for _ in range(100):
    min_delta = float(rng.choice([0.0, 0.01, 0.3]))
    patience = int(rng.integers(0, 4))
    metrics = rng.choice([0.1, 0.2, 0.25, 0.5, 0.51], size=15).tolist()
    hi = EarlyStopping(min_delta=min_delta, patience=patience, mode='max')
    lo = FlaxEarlyStopping(min_delta=min_delta, patience=patience)
    for metric in metrics:
      hi, lo = hi.update(metric), lo.update(-metric)
      assert (hi.patience_count, hi.should_stop, hi.has_improved) == (
          lo.patience_count, lo.should_stop, lo.has_improved)
      assert hi.best_metric == -lo.best_metric


def test_max_mode_restores_from_state_dict_and_keeps_mode():
  es = EarlyStopping(patience=3, mode='max').update(0.8).update(0.7)
  restored = serialization.from_bytes(EarlyStopping(mode='max'),
                                      serialization.to_bytes(es))
  assert restored == es
  assert restored.mode == 'max' and restored.best_metric == 0.8
  assert not restored.update(0.75).has_improved
  assert restored.update(0.9).has_improved


def test_max_mode_plus_inf_metric_is_kept():
  es = EarlyStopping(mode='max').update(math.inf)
  assert es.best_metric == math.inf and es.has_improved
  es = es.update(1.0)  # isinf(best): every update improves, as in flax
  assert es.has_improved and es.best_metric == 1.0


@pytest.mark.parametrize('bad', ['maximum', 'MIN', '', None, 1])
def test_bad_mode_raises_naming_the_value(bad):
  with pytest.raises(ValueError, match=repr(bad).replace('(', r'\(')):
    EarlyStopping(mode=bad)
  with pytest.raises(ValueError, match='mode'):
    dataclasses.replace(EarlyStopping(), mode=bad)
