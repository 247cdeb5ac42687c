"""The Llama-family decoder: packed sequences, scanned layers, remat,
tensor-parallel rules, argument checks. (Logits against transformers are
in tests/test_hf.py; the runner trains gin/llama_tiny.gin, scanned and
rematerialised, in tests/test_cli_gin_files.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.runner.models import llama as llama_lib
from gintrain.runner.parallel import rules as rules_lib

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
          num_heads=4, num_kv_heads=2)


@pytest.fixture(scope='module')
def model_params():
  model = llama_lib.llama(**KW)
  return model, model.init(jax.random.key(0))['params']


def test_packed_segments_equal_separate_sequences(model_params):
  model, params = model_params
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, 64)
  b = jax.random.randint(jax.random.key(2), (1, 7), 0, 64)
  packed = jnp.concatenate([a, b], 1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  apply = jax.jit(model.apply)
  out = apply({'params': params}, packed, segment_ids=segments,
              positions=positions)
  np.testing.assert_allclose(out[:, :5], apply({'params': params}, a),
                             atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], apply({'params': params}, b),
                             atol=1e-5)
  # Without the segment ids the second sequence sees the first.
  mixed = apply({'params': params}, packed, positions=positions)
  assert np.abs(mixed[:, 5:] - out[:, 5:]).max() > 1e-3


def test_scan_layers_same_logits_and_grads(model_params):
  model, params = model_params
  scanned = llama_lib.llama(**KW, scan_layers=True)
  sparams = scanned.with_layers(params, model.layer_params(params))
  assert sparams['layers']['mlp']['up_proj']['kernel'].shape == (2, 32, 64)
  x = jax.random.randint(jax.random.key(3), (2, 9), 0, 64)
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             scanned.apply({'params': sparams}, x),
                             atol=1e-5)
  g = jax.jit(jax.grad(lambda p: model.apply({'params': p}, x).std()))(
      params)
  gs = jax.jit(jax.grad(lambda p: scanned.apply({'params': p}, x).std()))(
      sparams)
  back = model.with_layers(gs, scanned.layer_params(gs))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6),
               g, back)


def _step(model, params, x):
  loss = lambda p: model.apply({'params': p}, x).std()  # pylint: disable=unnecessary-lambda-assignment
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled(params)


def test_remat_same_grads_less_temp_memory(model_params):
  _, params = model_params
  x = jax.random.randint(jax.random.key(4), (2, 64), 0, 64)
  temps, grads = {}, {}
  for remat in ('none', 'full'):
    temps[remat], grads[remat] = _step(llama_lib.llama(**KW, remat=remat),
                                       params, x)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6),
               grads['none'], grads['full'])
  assert temps['full'] < temps['none'], temps


def test_tensor_parallel_rules_same_logits(model_params):
  model, params = model_params
  for scan in (False, True):
    m = llama_lib.llama(**KW, scan_layers=scan)
    p = m.with_layers(params, model.layer_params(params))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2),
                             ('data', 'model'))
    rules = rules_lib.resolve(['tensor_parallel', 'fsdp'])
    specs = rules_lib.tree_specs({'params': p}, rules,
                                 {'data': 4, 'model': 2})['params']
    name = 'layers' if scan else 'layers_1'
    want = (None, None, 'model') if scan else (None, 'model')
    assert tuple(specs[name]['self_attn']['k_proj']['kernel']) == want
    assert 'model' in tuple(specs[name]['mlp']['down_proj']['kernel'])
    placed = jax.tree.map(
        lambda a, s: jax.device_put(a, jax.sharding.NamedSharding(mesh, s)),
        p, specs)
    x = jax.random.randint(jax.random.key(5), (4, 8), 0, 64)
    out = jax.jit(lambda q: m.apply({'params': q}, x))(placed)
    np.testing.assert_allclose(out, model.apply({'params': params}, x),
                               atol=1e-5)


def test_cached_prefill_equals_forward(model_params):
  model, params = model_params
  x = jax.random.randint(jax.random.key(6), (2, 10), 0, 64)
  full = model.apply({'params': params}, x)
  cache = model.init_cache(2, 16)
  cached = jax.jit(model.apply_cached)
  logits, cache = cached(params, x[:, :6], cache, 0)
  np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
  for i in range(6, 10):
    logits, cache = cached(params, x[:, i:i + 1], cache, i)
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5)


def test_num_params(model_params):
  model, params = model_params
  assert model.num_params() == sum(a.size for a in jax.tree.leaves(params))
  biased = llama_lib.llama(**KW, qkv_bias=True, out_bias=True,
                           mlp_bias=True, tied=True)
  assert biased.num_params() == sum(
      a.size for a in jax.tree.leaves(biased.init(jax.random.key(0))))


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_kv_heads=3), 'num_heads=4 must be a multiple of'
     ' num_kv_heads=3'),
    (dict(remat='some'), "llama.remat must be one of none, full"),
    (dict(dtype='float64'), 'llama.dtype must be one of'),
    (dict(rope_scaling={'rope_type': 'yarn', 'factor': 2.0}),
     "rope_type 'yarn' is not supported"),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 2.0}),
     'needs low_freq_factor, high_freq_factor'),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    llama_lib.llama(**{**KW, **kwargs})



def test_flops_per_token_matches_xla_cost_analysis():
  """The formula (causal attention halved) within 10% of XLA's count of the
  compiled forward and gradient (which also counts the masked half and
  the elementwise ops)."""
  model = llama_lib.llama(vocab_size=256, hidden_size=128,
                          intermediate_size=352, num_layers=2, num_heads=4,
                          num_kv_heads=2)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0)))['params']
  b, t = 2, 64
  x = jax.ShapeDtypeStruct((b, t), jnp.int32)
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(
      params, x).compile().cost_analysis()
  grad = jax.jit(jax.grad(lambda p, x: model.apply(
      {'params': p}, x).sum())).lower(params, x).compile().cost_analysis()
  fwd, grad = (c[0] if isinstance(c, list) else c for c in (fwd, grad))
  forward = model.flops_per_token(t, training=False)
  assert abs(fwd['flops'] / (b * t) / forward - 1) < 0.10, (
      fwd['flops'] / (b * t), forward)
  assert abs(grad['flops'] / (b * t) / model.flops_per_token(t) - 1) < 0.10, (
      grad['flops'] / (b * t), model.flops_per_token(t))
