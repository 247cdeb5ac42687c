"""lib.lr_schedule gives the same values, types and dtypes as flax's.

flax is imported only as the oracle: every case calls both factories with the
same arguments and compares the results exactly.
"""

import doctest
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import lr_schedule as flax_lr

from gintrain.lib import lr_schedule

STEPS = [0, 1, 2, 7, 99, 100, 101, 149, 150, 151, 299, 300, 301, 1000, 3000,
         3001, 6000, 6001, 8000, 8001, 10**6, -1, -50, 2.5, 300.0, 300.5,
         np.int32(301), np.float32(150.0), jnp.int32(300), jnp.int32(301),
         jnp.float32(0.5)]


def assert_same(ours, theirs):
  """Same Python type for Python scalars, else same dtype/shape/values."""
  if isinstance(theirs, (int, float)) and not isinstance(theirs, np.generic):
    assert type(ours) is type(theirs)
    np.testing.assert_array_equal(ours, theirs)
    return
  assert isinstance(ours, jax.Array) == isinstance(theirs, jax.Array)
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.dtype == theirs.dtype
  assert ours.shape == theirs.shape
  np.testing.assert_array_equal(ours, theirs)


def both(name, *args, **kwargs):
  factory = f'create_{name}_learning_rate_schedule'
  return (getattr(lr_schedule, factory)(*args, **kwargs),
          getattr(flax_lr, factory)(*args, **kwargs))


def test_docstring_examples_run():
  result = doctest.testmod(lr_schedule)
  assert result.attempted >= 4 and result.failed == 0


@pytest.mark.parametrize('name,args', [
    ('constant', (0.1, 100)),
    ('stepped', (0.1, 100, [[1, 0.5]])),
    ('cosine', (0.1, 100, 10)),
])
def test_each_factory_logs_a_deprecation_warning(name, args, caplog):
  factory = getattr(lr_schedule, f'create_{name}_learning_rate_schedule')
  with caplog.at_level(logging.WARNING, logger='absl'):
    factory(*args)
  records = [r for r in caplog.records if r.name == 'absl']
  assert len(records) == 1
  assert records[0].levelno == logging.WARNING
  assert 'deprecated' in records[0].getMessage()
  assert 'optax' in records[0].getMessage().lower()


@pytest.mark.parametrize('base', [0.1, 3, np.float32(0.25), jnp.float32(0.5),
                                  jnp.array([0.1, 0.2])])
def test_constant_without_warmup_returns_the_base_object(base):
  ours, theirs = both('constant', base, 100)
  for step in [0, 5, 10**9, -3, 2.5, jnp.int32(7), jnp.arange(4), None]:
    assert ours(step) is base
    assert theirs(step) is base


@pytest.mark.parametrize('base,spe,warmup', [
    (0.1, 100, 1), (0.1, 100, 2.5), (2, 7, 3), (0.5, 1, 0.5), (1.0, 3, -1.0),
    (0.1, 100, 0.0)])
def test_constant_matches_flax(base, spe, warmup):
  ours, theirs = both('constant', base, spe, warmup_length=warmup)
  for step in STEPS:
    assert_same(ours(step), theirs(step))


def test_constant_warmup_is_a_linear_ramp_then_flat():
  f = lr_schedule.create_constant_learning_rate_schedule(
      0.8, steps_per_epoch=10, warmup_length=2)
  got = [float(f(s)) for s in (0, 5, 10, 20, 25, 1000)]
  np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.8, 0.8, 0.8], rtol=1e-6)


STEPPED_CASES = [
    # (base, steps_per_epoch, lr_sched_steps, warmup)
    (0.1, 100, [[30, 0.1], [60, 0.01], [80, 0.001]], 0.0),
    (0.1, 100, [[30, 0.1], [60, 0.01], [80, 0.001]], 5.0),
    (1.0, 100, [[1, 0.5], [2, 0.25], [3, 0.125]], 2.0),
    (1.0, 100, [[3, 0.1], [1, 0.5]], 0.0),  # unsorted: index is a count
    (1.0, 5, [[0.5, 0.1], [0.7, 0.2], [1.5, 0.3]], 0.0),  # 2.5->2, 3.5->4
    (2.0, 1, [[0.5, 0.1], [1.5, 0.01], [2.5, 0.001]], 0.0),  # halves to even
    (0.3, 7, [[1.3, 2.0], [1.3, 3.0]], 0.0),  # duplicate boundaries
    (0.1, 100, [], 0.0),  # no steps: constant as an array
    (0.1, 100, [[0, 0.5]], 1.0),  # boundary at 0
    (1, 100, [[1, 2]], 0.0),  # integer base and factors
]


@pytest.mark.parametrize('base,spe,sched,warmup', STEPPED_CASES)
def test_stepped_matches_flax(base, spe, sched, warmup):
  ours, theirs = both('stepped', base, spe, sched, warmup_length=warmup)
  for step in STEPS:
    assert_same(ours(step), theirs(step))


@pytest.mark.parametrize('base,spe,sched,warmup', STEPPED_CASES[:5])
def test_stepped_under_jit_matches_flax(base, spe, sched, warmup):
  ours, theirs = both('stepped', base, spe, sched, warmup_length=warmup)
  ours, theirs = jax.jit(ours), jax.jit(theirs)
  for step in [0, 100, 101, 3000, 3001, 8001]:
    assert_same(ours(step), theirs(step))


def test_stepped_decay_takes_effect_at_boundary_plus_one():
  f = lr_schedule.create_stepped_learning_rate_schedule(
      0.1, 100, [[30, 0.1], [60, 0.01], [80, 0.001]])
  assert f(3000) == jnp.float32(0.1)
  assert f(3001) == jnp.float32(0.1 * 0.1)
  assert f(6000) == jnp.float32(0.1 * 0.1)
  assert f(6001) == jnp.float32(0.1 * 0.01)  # absolute, not cumulative
  assert f(8001) == jnp.float32(0.1 * 0.001)
  assert f(10**7) == jnp.float32(0.1 * 0.001)
  assert f(3000).dtype == jnp.float32


def test_stepped_unsorted_boundaries_count_rather_than_sort():
  f = lr_schedule.create_stepped_learning_rate_schedule(
      1.0, 100, [[3, 0.1], [1, 0.5]])
  # After step 100 one boundary is below the step: values[1] == 0.1 (the
  # factor listed first), although epoch 1 is the factor-0.5 entry.
  assert f(150) == jnp.float32(0.1)
  assert f(301) == jnp.float32(0.5)


def test_stepped_warmup_multiplies_rather_than_delays():
  f = lr_schedule.create_stepped_learning_rate_schedule(
      1.0, 10, [[1, 0.5]], warmup_length=2)
  np.testing.assert_allclose(
      [float(f(s)) for s in (0, 5, 10, 11, 20, 30)],
      [0.0, 0.25, 0.5, 0.5 * 0.55, 0.5, 0.5], rtol=1e-6)


def test_stepped_array_steps_behave_like_flax():
  ours, theirs = both('stepped', 1.0, 10, [[1, 0.5], [2, 0.25]])
  same_len = jnp.array([5, 25])
  assert_same(ours(same_len), theirs(same_len))
  assert ours(same_len).shape == ()  # collapses to a scalar, as in flax
  other_len = jnp.array([1, 2, 3])
  with pytest.raises(TypeError):
    theirs(other_len)
  with pytest.raises(TypeError):
    ours(other_len)


COSINE_CASES = [
    # (base, steps_per_epoch, halfcos_epochs, warmup)
    (0.1, 100, 90, 0.0), (0.1, 100, 90, 5.0), (1.0, 10, 2, 0.0),
    (1.0, 10, 2, 1.0), (3, 1, 1, 0.0), (0.5, 7, 2.5, 0.5), (1.0, 10, 2, -2.0),
    (jnp.float32(0.2), 10, 3, 0.0),
]


@pytest.mark.parametrize('base,spe,halfcos,warmup', COSINE_CASES)
def test_cosine_matches_flax(base, spe, halfcos, warmup):
  ours, theirs = both('cosine', base, spe, halfcos, warmup_length=warmup)
  for step in STEPS + [jnp.arange(0, 400, 7), np.arange(-10, 10),
                       jnp.linspace(0.0, 50.0, 11).reshape(1, 11)]:
    assert_same(ours(step), theirs(step))


@pytest.mark.parametrize('base,spe,halfcos,warmup', COSINE_CASES[:4])
def test_cosine_under_jit_matches_flax(base, spe, halfcos, warmup):
  ours, theirs = both('cosine', base, spe, halfcos, warmup_length=warmup)
  steps = jnp.arange(0, 2000, 13)
  assert_same(jax.jit(ours)(steps), jax.jit(theirs)(steps))
  assert_same(jax.jit(ours)(17), jax.jit(theirs)(17))


def test_cosine_is_not_clamped_past_the_half_wave():
  f = lr_schedule.create_cosine_learning_rate_schedule(1.0, 10, 2)
  np.testing.assert_allclose(
      f(jnp.array([0, 10, 20, 30, 40])), [1.0, 0.5, 0.0, 0.5, 1.0], atol=1e-6)
  assert float(f(30)) > float(f(20))


def test_cosine_warmup_multiplies():
  plain = lr_schedule.create_cosine_learning_rate_schedule(1.0, 10, 4)
  warm = lr_schedule.create_cosine_learning_rate_schedule(
      1.0, 10, 4, warmup_length=2)
  for step in [0, 5, 10, 19]:
    np.testing.assert_allclose(warm(step), plain(step) * step / 20, rtol=1e-6)
  for step in [20, 21, 35]:
    assert warm(step) == plain(step)


def test_cosine_zero_half_wave_fails_like_flax():
  ours, theirs = both('cosine', 1.0, 10, 0)
  with pytest.raises(ZeroDivisionError):
    theirs(3)
  with pytest.raises(ZeroDivisionError):
    ours(3)


def test_warning_free_builders_match_the_flax_named_factories(caplog):
  # pylint: disable=g-import-not-at-top
  import logging
  import numpy as np
  from gintrain.lib import lr_schedule as ls
  # pylint: enable=g-import-not-at-top
  steps = np.arange(0, 400, 7)
  cases = [
      (ls.create_constant_learning_rate_schedule, ls.constant_schedule,
       dict(base_learning_rate=0.5, steps_per_epoch=10, warmup_length=2)),
      (ls.create_stepped_learning_rate_schedule, ls.stepped_schedule,
       dict(base_learning_rate=1.0, steps_per_epoch=10,
            lr_sched_steps=[[3, 0.1], [6, 0.01]], warmup_length=1)),
      (ls.create_cosine_learning_rate_schedule, ls.cosine_schedule,
       dict(base_learning_rate=0.1, steps_per_epoch=10, halfcos_epochs=20,
            warmup_length=0.5)),
  ]
  for flax_named, builder, kwargs in cases:
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      quiet = builder(**kwargs)
      assert not caplog.records, builder.__name__
      loud = flax_named(**kwargs)
      assert caplog.records, flax_named.__name__
    np.testing.assert_array_equal([quiet(s) for s in steps],
                                  [loud(s) for s in steps])
