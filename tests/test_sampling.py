"""KV-cache sampling: greedy cached tokens equal full-forward greedy tokens;
top-k/top-p/temperature; ``gintrain sample`` from a run and an HF folder."""

import jax
import numpy as np
import pytest

from gintrain.runner.cli import main as cli
from gintrain.runner.models import hf
from gintrain.runner.models import llama as llama_lib
from gintrain.runner.models import sampling

KW = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
          num_heads=4, num_kv_heads=2, init_std=0.3)


@pytest.fixture(scope='module')
def model_params():
  model = llama_lib.llama(**KW)
  return model, model.init(jax.random.key(0))['params']


PROMPT = np.random.RandomState(0).randint(0, 48, (3, 7))


def test_greedy_cached_equals_full_forward(model_params):
  model, params = model_params
  cached = np.asarray(sampling.generate(model, params, PROMPT, 24))
  full = np.asarray(sampling.generate_uncached(model, params, PROMPT, 24))
  np.testing.assert_array_equal(cached, full)
  # Not a constant sequence (the test would be weak).
  assert len(set(cached.ravel().tolist())) > 5


def test_greedy_scanned_window_equals_full_forward():
  model = llama_lib.llama(**KW, scan_layers=True, sliding_window=6)
  params = model.init(jax.random.key(1))['params']
  np.testing.assert_array_equal(
      sampling.generate(model, params, PROMPT, 16),
      sampling.generate_uncached(model, params, PROMPT, 16))


def test_sampling_settings(model_params):
  model, params = model_params
  greedy = np.asarray(sampling.generate(model, params, PROMPT, 12))
  hot = dict(temperature=1.5, seed=3)
  np.testing.assert_array_equal(
      sampling.generate(model, params, PROMPT, 12, top_k=1, **hot), greedy)
  np.testing.assert_array_equal(
      sampling.generate(model, params, PROMPT, 12, top_p=1e-6, **hot), greedy)
  a = np.asarray(sampling.generate(model, params, PROMPT, 12, **hot))
  np.testing.assert_array_equal(
      a, sampling.generate(model, params, PROMPT, 12, **hot))
  assert (a != greedy).any()
  np.testing.assert_array_equal(  # same keys: the same draws uncached
      a, sampling.generate_uncached(model, params, PROMPT, 12, **hot))


def test_top_k_top_p_restrict_support():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  keys = jax.random.split(jax.random.key(0), 400)

  def support(**kw):
    draw = jax.jit(jax.vmap(
        lambda k: sampling.sample_logits(logits, k, 1.0, **kw)))
    return set(np.asarray(draw(keys)).ravel().tolist())
  assert support(top_k=2) == {0, 1}
  assert support(top_p=0.7) == {0, 1}
  assert support(top_p=0.85) == {0, 1, 2}
  assert support() == {0, 1, 2, 3}


def test_cli_sample_from_hf_folder(model_params, tmp_path, capsys):
  model, params = model_params
  big = llama_lib.llama(**dict(KW, vocab_size=256))
  hf.save(str(tmp_path), big, big.init(jax.random.key(2))['params'])
  argv = ['gintrain', 'sample', f'--hf={tmp_path}', '--prompt=def f(',
          '--max_new_tokens=8', '--temperature=0']
  assert cli.main_with_flags(argv) == 0
  first = capsys.readouterr().out
  assert first.startswith('def f(')
  assert cli.main_with_flags(argv) == 0
  assert capsys.readouterr().out == first  # greedy: deterministic
  del model, params


def test_cli_sample_errors(tmp_path, capsys):
  small = llama_lib.llama(**KW)  # 48 tokens < the byte tokenizer's 256
  hf.save(str(tmp_path), small, small.init(jax.random.key(2))['params'])
  assert cli.main_with_flags(['gintrain', 'sample', f'--hf={tmp_path}',
                              '--prompt=x']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'gintrain sample: error: --tokenizer=byte: 256 tokens,'
                 f" more than the model's embedding (48)."]
  assert cli.main_with_flags(['gintrain', 'sample', '--prompt=x']) == 1
  assert 'give one of --workdir=RUN or --hf=FOLDER' in capsys.readouterr().err
