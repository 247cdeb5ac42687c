"""LoRA: only adapters train, frozen parameters hold no optimizer state,
the merged export equals the adapted model; the runner's dry run shows the
smaller state."""

import jax
import numpy as np
import optax
import pytest

from gintrain.runner.models import hf
from gintrain.runner.models import llama as llama_lib
from gintrain.runner.models import lora as lora_lib
from gintrain.runner.training import frozen

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
          num_heads=4, num_kv_heads=2)


def _bytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def trained():
  """A LoRA model (scanned base) trained 10 steps with only adapters
  trainable: ``(model, initial params, final params, opt state)``."""
  base = llama_lib.llama(**KW, scan_layers=True)
  model = lora_lib.lora(base, rank=4, alpha=8.0,
                        targets=('q_proj', 'v_proj', 'down_proj'))
  params = model.init(jax.random.key(0))['params']
  tx = frozen.mask_optimizer(optax.adamw(1e-2, weight_decay=0.1), ['lora_'])
  state = tx.init(params)
  data = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)

  @jax.jit
  def step(params, state):
    def loss(p):
      logits = model.apply({'params': p}, data[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, data[:, 1:]).mean()
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  new, s = params, state
  for _ in range(10):
    new, s = step(new, s)
  return model, params, new, s


def test_fresh_adapters_change_nothing(trained):
  model, params, _, _ = trained
  x = np.arange(12).reshape(2, 6)
  _, plain = model.merged(params)
  np.testing.assert_array_equal(
      model.apply({'params': params}, x),
      model.base.apply({'params': plain}, x))


def test_only_adapters_change(trained):
  _, before, after, _ = trained
  flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  flat_a = dict(jax.tree_util.tree_flatten_with_path(after)[0])
  changed = {jax.tree_util.keystr(k) for k in flat_b
             if not np.array_equal(flat_b[k], flat_a[k])}
  assert changed and all('lora_' in k for k in changed), changed
  # lora_b of every target moved off zero (so the adapted model differs).
  assert sum('lora_b' in k for k in changed) == 3


def test_optimizer_state_only_for_adapters(trained):
  _, params, _, state = trained
  adapters = _bytes([v for k, v in jax.tree_util.tree_flatten_with_path(
      params)[0] if 'lora_' in jax.tree_util.keystr(k)])
  full = _bytes(optax.adamw(1e-2).init(params))
  # Adam keeps two slots per trained parameter (plus a step count).
  assert _bytes(state) <= 2 * adapters + 64
  assert _bytes(state) < full / 5, (_bytes(state), full)


def test_merged_export_equals_adapted_model(trained, tmp_path):
  model, _, after, _ = trained
  base, merged = model.merged(after)
  hf.save(str(tmp_path), base, merged)
  loaded_model, loaded = hf.load(str(tmp_path))
  x = np.random.RandomState(0).randint(0, 64, (2, 10))
  want = model.apply({'params': after}, x)
  np.testing.assert_allclose(loaded_model.apply({'params': loaded}, x), want,
                             atol=1e-5)
  assert np.abs(want - model.base.apply(
      {'params': model.merged(trained[1])[1]}, x)).max() > 1e-4


def test_bad_arguments():
  base = llama_lib.llama(**KW)
  with pytest.raises(ValueError, match='lora.rank must be an integer >= 1'):
    lora_lib.lora(base, rank=0)
  with pytest.raises(ValueError, match=r"match no dense layer"):
    lora_lib.lora(base, targets=('nope',)).init(jax.random.key(0))


def test_runner_dry_run_state_bytes(capsys):
  """--dry_run's state bytes: frozen base parameters carry no Adam slots."""
  from gintrain.runner import train  # pylint: disable=g-import-not-at-top

  def total(extra):
    capsys.readouterr()
    assert train.main_with_flags([
        'gintrain', '--dry_run', '--gin_file=llama_tiny.gin',
        '--gin.llama.num_layers=1', *extra]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if 'total state per device' in l][0]
    return int(line.rsplit('(', 1)[1].split()[0])
  full = total([])
  adapted = total([
      '--gin.train.model=@models.lora()', '--gin.lora.model=@models.llama()',
      '--gin.lora.rank=4',
      "--gin.train.trainable=['lora_']"])
  # Params stay (plus small adapters); the optimizer's 2 slots of the base
  # are gone: about a third of the state.
  assert adapted < full * 0.45, (adapted, full)
