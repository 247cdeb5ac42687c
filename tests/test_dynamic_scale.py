"""lib.dynamic_scale against flax.training.dynamic_scale as an oracle.

Both run the same steps (finite gradients, injected inf and NaN, float16
overflow) eagerly, under jax.jit and under jax.pmap with an axis_name, and
must return the same states, flags, values and gradients (dtypes and bits);
plus the pytree layout and checkpoint round trips.
"""

import doctest

from flax import serialization as fser
from flax.training import dynamic_scale as fds
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.lib import checkpoints
from gintrain.lib import dynamic_scale as lds
from gintrain.lib import serialization as ser

INF, NAN = float('inf'), float('nan')
# Per step, the factor x in loss = sum(p * x): 1. is finite; inf/nan make the
# gradient non-finite; 3e4 overflows float16 once scaled.
XS = [1., 1., INF, 1., 1., 1., 1., 1., NAN, 3e4, 1., 1., 1., 1., 1., 1.]


def loss_fn(p, x):
  return jnp.sum(jnp.asarray(p['w'], jnp.float16) * jnp.asarray(x, jnp.float16))


def loss_f32_fn(p, x):
  return jnp.sum(p['w'] * x)


def loss_aux_fn(p, x):
  return loss_fn(p, x), {'x': x, 'n': jnp.int32(7)}


def loss_two_fn(p, q, x):
  return loss_fn(p, x) + jnp.sum(q * x)


def assert_same(a, b):
  """Same pytree structure, leaf dtypes, shapes and bits (NaN-safe)."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert str(ta).replace('flax.training.dynamic_scale', 'X').replace(
      'gintrain.lib.dynamic_scale', 'X') == str(tb).replace(
          'flax.training.dynamic_scale', 'X').replace(
              'gintrain.lib.dynamic_scale', 'X')
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
    assert x.tobytes() == y.tobytes(), (x, y)


def assert_same_state(ours, theirs):
  assert type(ours) is lds.DynamicScale
  assert type(theirs) is fds.DynamicScale
  for name in ('growth_factor', 'backoff_factor', 'growth_interval',
               'minimum_scale'):
    assert getattr(ours, name) == getattr(theirs, name), name
  for name in ('fin_steps', 'scale'):
    x, y = getattr(ours, name), getattr(theirs, name)
    assert jnp.asarray(x).dtype == jnp.asarray(y).dtype, name
    assert getattr(x, 'weak_type', None) == getattr(y, 'weak_type', None), name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def run_both(make_step, kwargs, xs=XS, fn=loss_fn, argnums=0, has_aux=False,
             args=None):
  """Runs the same steps with both classes; compares every result."""
  ours, theirs = lds.DynamicScale(**kwargs), fds.DynamicScale(**kwargs)
  step_ours = make_step(fn, argnums, has_aux)
  step_theirs = make_step(fn, argnums, has_aux)
  args = args or ({'w': jnp.ones(3, jnp.float32)},)
  finites = []
  for x in xs:
    r1 = step_ours(ours, *args, jnp.float32(x))
    r2 = step_theirs(theirs, *args, jnp.float32(x))
    assert isinstance(r1, lds.DynamicScaleResult)
    assert_same_state(r1.dynamic_scale, r2.dynamic_scale)
    assert_same(r1.finite, r2.finite)
    assert_same(r1.aux, r2.aux)
    assert_same(r1.grad, r2.grad)
    ours, theirs = r1.dynamic_scale, r2.dynamic_scale
    finites.append(bool(np.all(r1.finite)))
  return ours, finites


def eager_step(fn, argnums, has_aux):
  return lambda ds, *a: ds.value_and_grad(fn, argnums, has_aux)(*a)


def jit_step(fn, argnums, has_aux):
  return jax.jit(eager_step(fn, argnums, has_aux))


KWARGS = [
    ({}, loss_fn),
    ({'growth_interval': 3}, loss_fn),
    ({'growth_interval': 2, 'growth_factor': 4.0, 'backoff_factor': 0.25},
     loss_fn),
    ({'growth_interval': 3, 'scale': 8.0, 'minimum_scale': 2.0}, loss_fn),
    ({'growth_interval': 3, 'scale': 8.0, 'minimum_scale': None}, loss_fn),
    # Growth is capped at float32's max (the float32 value overflows, the
    # gradients do not).
    ({'growth_interval': 1, 'scale': 3e38}, loss_f32_fn),
]


@pytest.mark.parametrize('make_step', [eager_step, jit_step])
@pytest.mark.parametrize('kwargs,fn', KWARGS)
def test_matches_flax(make_step, kwargs, fn):
  final, finites = run_both(make_step, kwargs, fn=fn)
  assert not all(finites) and any(finites)  # both kinds of step happened
  assert final.growth_interval == kwargs.get('growth_interval', 2000)
  if fn is loss_f32_fn:
    assert float(final.scale) == float(np.finfo(np.float32).max)


def test_backoff_and_growth_rules():
  ds, finites = run_both(
      jit_step, {'growth_interval': 2, 'scale': 4.0, 'minimum_scale': 1.0},
      xs=[1., INF, INF, INF, 1., 1., 1., 1.])
  assert finites == [True, False, False, False, True, True, True, True]
  # 4 -> (3 backoffs, floored at 1) 1 -> 2 finite steps, then it grows.
  assert float(ds.scale) == 2.0 and int(ds.fin_steps) == 1


def test_has_aux_and_argnums_match_flax():
  run_both(jit_step, {'growth_interval': 3}, fn=loss_aux_fn, has_aux=True)
  run_both(jit_step, {'growth_interval': 3}, fn=loss_two_fn, argnums=(0, 1),
           args=({'w': jnp.ones(3, jnp.float32)}, jnp.ones(2, jnp.float32)))


def test_pmap_with_axis_name_matches_flax():
  n = jax.local_device_count()
  assert n == 8
  def make_step(fn, argnums, has_aux):
    return jax.pmap(
        lambda ds, p, x: ds.value_and_grad(fn, argnums, has_aux,
                                           axis_name='batch')(p, x),
        axis_name='batch')
  replicate = lambda t: jax.tree_util.tree_map(lambda v: jnp.stack([v] * n), t)
  ours = replicate(lds.DynamicScale(growth_interval=2, scale=jnp.float32(16.)))
  theirs = replicate(fds.DynamicScale(growth_interval=2,
                                      scale=jnp.float32(16.)))
  params = replicate({'w': jnp.ones(3, jnp.float32)})
  step_ours = make_step(loss_fn, 0, False)
  step_theirs = make_step(loss_fn, 0, False)
  # One device's non-finite gradient makes every device's (averaged) one so.
  for bad in [None, 3, None, None, None, 0, None]:
    x = np.arange(1, n + 1, dtype=np.float32)
    if bad is not None:
      x[bad] = INF
    r1, r2 = step_ours(ours, params, x), step_theirs(theirs, params, x)
    assert_same_state(r1.dynamic_scale, r2.dynamic_scale)
    assert_same(r1.finite, r2.finite)
    assert_same(r1.aux, r2.aux)
    assert_same(r1.grad, r2.grad)
    assert np.all(np.asarray(r1.finite) == (bad is None))
    # The gradients are averaged over the devices: all replicas are equal.
    np.testing.assert_array_equal(r1.grad['w'], r1.grad['w'][:1].repeat(n, 0))
    ours, theirs = r1.dynamic_scale, r2.dynamic_scale


def test_is_a_pytree_with_static_settings():
  ds = lds.DynamicScale(growth_interval=5)
  leaves, treedef = jax.tree_util.tree_flatten(ds)
  assert leaves == [0, 65536.0]  # fin_steps, scale
  assert jax.tree_util.tree_unflatten(treedef, [1, 2.0]) == ds.replace(
      fin_steps=1, scale=2.0)
  assert jax.tree_util.tree_structure(ds) != jax.tree_util.tree_structure(
      lds.DynamicScale(growth_interval=6))
  fields = [f for f in lds.DynamicScale.__dataclass_fields__]
  assert fields == [f for f in fds.DynamicScale.__dataclass_fields__]
  assert lds.DynamicScale() == lds.DynamicScale(
      2.0, 0.5, 2000, 0, 65536.0, np.finfo(np.float32).tiny)
  with pytest.raises(Exception):  # frozen
    ds.scale = 1.0  # pytype: disable=not-writable


def _trained_states():
  """Both implementations after a few steps (with array leaves)."""
  ours, theirs = lds.DynamicScale(growth_interval=2), fds.DynamicScale(
      growth_interval=2)
  for x in [INF, 1., 1., 1.]:
    ours = jit_step(loss_fn, 0, False)(
        ours, {'w': jnp.ones(2)}, jnp.float32(x)).dynamic_scale
    theirs = jit_step(loss_fn, 0, False)(
        theirs, {'w': jnp.ones(2)}, jnp.float32(x)).dynamic_scale
  return ours, theirs


def test_state_dict_and_bytes_match_flax():
  ours, theirs = _trained_states()
  assert set(ser.to_state_dict(ours)) == {'fin_steps', 'scale'}
  assert ser.to_bytes(ours) == fser.to_bytes(theirs)
  restored = ser.from_bytes(lds.DynamicScale(growth_interval=2),
                            fser.to_bytes(theirs))
  assert restored.growth_interval == 2
  np.testing.assert_array_equal(restored.scale, ours.scale)
  np.testing.assert_array_equal(restored.fin_steps, ours.fin_steps)
  flax_restored = fser.from_bytes(fds.DynamicScale(growth_interval=2),
                                  ser.to_bytes(ours))
  np.testing.assert_array_equal(flax_restored.scale, theirs.scale)


@pytest.mark.filterwarnings('ignore:Single-file msgpack:DeprecationWarning')
def test_checkpoint_round_trip(tmp_path):
  ours, _ = _trained_states()
  target = {'dynamic_scale': ours, 'step': 4}
  checkpoints.save_checkpoint(tmp_path, target, step=4)
  fresh = {'dynamic_scale': lds.DynamicScale(growth_interval=2), 'step': 0}
  restored = checkpoints.restore_checkpoint(tmp_path, fresh)
  assert restored['step'] == 4
  ds = restored['dynamic_scale']
  assert type(ds) is lds.DynamicScale and ds.growth_interval == 2
  np.testing.assert_array_equal(ds.scale, ours.scale)
  np.testing.assert_array_equal(ds.fin_steps, ours.fin_steps)
  # The restored state keeps training.
  r = jit_step(loss_f32_fn, 0, False)(ds, {'w': jnp.ones(2)}, jnp.float32(1.))
  assert bool(r.finite) and int(r.dynamic_scale.fin_steps) == int(
      ours.fin_steps) + 1


def test_doctests():
  result = doctest.testmod(lds)
  assert result.attempted and not result.failed
