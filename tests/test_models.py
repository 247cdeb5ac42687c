"""runner.models / runner.losses against flax.linen as the oracle."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.runner.tasks import losses
from gintrain.runner.models import plain as models


class FlaxMLP(nn.Module):
  features: tuple
  num_classes: int
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = getattr(nn, self.activation)(nn.Dense(f)(x))
    return nn.Dense(self.num_classes)(x)


class FlaxCNN(nn.Module):
  features: tuple
  dense: int
  num_classes: int
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x):
    pool = nn.avg_pool if self.pool == 'avg' else nn.max_pool
    for f in self.features:
      x = nn.Conv(f, (3, 3), padding='SAME')(x)
      x = pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    if self.dense:
      x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


CASES = [
    ('mlp_default', models.mlp(), FlaxMLP((128,), 10), (5, 64)),
    ('mlp_deep_tanh_image_input', models.mlp((32, 16), 4, 'tanh'),
     FlaxMLP((32, 16), 4, 'tanh'), (3, 4, 4, 2)),
    ('mlp_linear', models.mlp((), 3), FlaxMLP((), 3), (2, 5)),
    ('cnn_default', models.cnn(), FlaxCNN((16, 32), 64, 10), (4, 8, 8, 1)),
    ('cnn_max_odd_sizes', models.cnn((4, 6), 0, 5, pool='max'),
     FlaxCNN((4, 6), 0, 5, 'max'), (2, 9, 7, 3)),
]
# XLA compilation dominates the run time on CPU: the tests below compile as
# few programs as they can (eval_shape compiles nothing; parameters for the
# output comparison come from numpy).


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)


@pytest.mark.parametrize('name,model,oracle,shape', CASES,
                         ids=[c[0] for c in CASES])
def test_param_tree_and_outputs_match_flax(name, model, oracle, shape):
  del name
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  flax_shapes = jax.eval_shape(oracle.init, jax.random.key(0), x)
  our_shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  # Same names, nesting, shapes and dtypes, so checkpoints interchange.
  assert (jax.tree_util.tree_structure(our_shapes) ==
          jax.tree_util.tree_structure(dict(flax_shapes)))
  assert _shapes(our_shapes) == _shapes(dict(flax_shapes))
  # Same function: with the same parameters flax gives the same logits.
  params = jax.tree_util.tree_map(
      lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32),
      our_shapes)
  want = jax.jit(oracle.apply)(params, x)
  got = jax.jit(model.apply)(params, x)
  assert got.shape == want.shape == (shape[0], oracle.num_classes)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_init_follows_flax_initializers_and_rng():
  model = models.cnn((32,), 256, 10)
  x = np.zeros((1, 8, 8, 4), np.float32)
  p = model.init(jax.random.key(0), x)['params']
  for name in ('Conv_0', 'Dense_0', 'Dense_1'):
    assert not np.any(p[name]['bias'])
  # LeCun normal: truncated normal with std 1/sqrt(fan_in).
  for name, fan_in in (('Conv_0', 3 * 3 * 4), ('Dense_0', 4 * 4 * 32)):
    k = np.asarray(p[name]['kernel']) * np.sqrt(fan_in)  # unit std
    tol = 5 / np.sqrt(k.size)  # 5 standard errors
    assert abs(k.std() - 1) < tol and abs(k.mean()) < tol, name
    assert 2 < np.abs(k).max() < 2.3, name  # truncated at 2 (rescaled)
  # Deterministic in the key, independent of x's values. (Same shapes: no
  # recompilation.)
  again = model.init(jax.random.key(0), x + 5)['params']
  other = model.init(jax.random.key(1), x)['params']
  for a, b in zip(jax.tree_util.tree_leaves(p),
                  jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(p['Conv_0']['kernel'], other['Conv_0']['kernel'])


def test_model_is_hashable_and_compared_by_value():
  assert models.mlp((8,), 3) == models.mlp((8,), 3)
  assert hash(models.cnn()) == hash(models.cnn())
  assert models.mlp((8,), 3) != models.mlp((8,), 4)
  # Usable as a static jit argument (tracing needs a hashable value).
  fn = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  model = models.mlp((4,), 2)
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3)))
  lowered = fn.lower(model, v, jnp.ones((2, 3)))
  assert lowered.out_info.shape == (2, 2)


def test_mlp_learns_a_separable_task():
  # Behaviour, not just shapes: full-batch gradient descent on a linear task.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 4)).astype(np.float32)
  y = (x @ np.array([1., -2., 0.5, 1.]) > 0).astype(np.int32)
  model = models.mlp((16,), 2)

  @jax.jit
  def train(key):
    params = model.init(key, x)

    def step(params, _):
      loss, g = jax.value_and_grad(
          lambda p: losses.cross_entropy_loss(model.apply(p, x), y))(params)
      return jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, params, g), loss

    params, curve = jax.lax.scan(step, params, length=100)
    return curve, losses.accuracy(model.apply(params, x), y)

  curve, acc = train(jax.random.key(0))
  assert float(curve[-1]) < 0.3 * float(curve[0])
  assert float(acc) > 0.95


@pytest.mark.parametrize('factory,kwargs,word', [
    (models.mlp, {'features': (0,)}, 'features'),
    (models.mlp, {'features': (4.5,)}, 'features'),
    (models.mlp, {'num_classes': 0}, 'num_classes'),
    (models.mlp, {'activation': 'swish2'}, 'activation'),
    (models.cnn, {'pool': 'median'}, 'pool'),
    (models.cnn, {'dense': -1}, 'dense'),
    (models.cnn, {'kernel_size': 0}, 'kernel_size'),
])
def test_bad_factory_arguments_name_the_parameter(factory, kwargs, word):
  with pytest.raises(ValueError, match=word):
    factory(**kwargs)


def test_bad_inputs_raise_clear_errors():
  key = jax.random.key(0)
  cnn = models.cnn()
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(cnn.init, key, jnp.zeros((2, 64)))
  with pytest.raises(ValueError, match='rank'):
    jax.eval_shape(models.mlp().init, key, jnp.zeros((64,)))
  with pytest.raises(ValueError, match='fewer'):  # 2x2 image, 2 pool stages
    jax.eval_shape(cnn.init, key, jnp.zeros((1, 2, 2, 1)))
  v = jax.eval_shape(models.mlp((4,), 2).init, key, jnp.zeros((1, 3)))
  with pytest.raises(KeyError, match='Dense_1'):
    jax.eval_shape(models.mlp((4, 4), 2).apply, v, jnp.zeros((1, 3)))
  with pytest.raises(KeyError, match="'params'"):
    jax.eval_shape(models.mlp((4,), 2).apply, v['params'], jnp.zeros((1, 3)))


def test_losses_match_optax_and_reject_bad_shapes():
  import optax  # pylint: disable=g-import-not-at-top
  logits = 3 * np.random.default_rng(0).standard_normal((6, 5))
  labels = np.array([0, 1, 2, 3, 4, 4])

  @jax.jit
  def both(logits, labels):
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (losses.cross_entropy_loss(logits, labels), want.mean(),
            losses.accuracy(logits, labels))

  loss, want, acc = both(logits.astype(np.float32), labels)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(acc) == pytest.approx(np.mean(logits.argmax(-1) == labels))
  with pytest.raises(ValueError, match='labels'):
    jax.eval_shape(losses.cross_entropy_loss, logits, labels[:3])
  with pytest.raises(ValueError, match='logits'):
    jax.eval_shape(losses.accuracy, logits[0], labels)


def test_docstring_examples_run():
  for module in (models, losses,):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__


def test_transformer_flops_formula_against_xla():
  """``Transformer.flops_per_token`` (causal attention counted as half)
  against XLA's ``cost_analysis()`` of the forward and the gradient at
  lm.gin's widths (one block): XLA also counts the masked half of the attention matrix
  (the model computes it) and elementwise work, so it is compared with the
  formula plus that half, within 5%."""
  from gintrain.runner.models import transformer  # pylint: disable=g-import-not-at-top
  m = transformer.transformer(vocab_size=256, width=128, depth=1, heads=4,
                              max_len=128)
  params = jax.eval_shape(m.init, jax.random.key(0), None)  # shapes suffice
  x = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  masked_half = m.depth * 2 * 128 * m.width  # per token, forward

  def xla(fn):
    cost = jax.jit(fn).lower(params, x).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops'] / 128
  forward = xla(m.apply)
  grad = xla(jax.grad(lambda p, x: m.apply(p, x).mean()))
  assert forward == pytest.approx(
      m.flops_per_token(128, training=False) + masked_half, rel=0.05)
  assert grad == pytest.approx(
      m.flops_per_token(128) + 3 * masked_half, rel=0.05)
