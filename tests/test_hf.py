"""Hugging Face import/export against transformers (PyTorch CPU) as oracle.

Tiny random models are built from configs here (never downloaded), saved
with ``save_pretrained``, loaded with ``hf.load``: the logits must equal
transformers' within 1e-4 (float32). The other way, a model trained a few
steps in gintrain and saved with ``hf.save`` loads in transformers with the
same logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gintrain.runner.errors import RunnerError
from gintrain.runner.models import hf
from gintrain.runner.models import llama as llama_lib

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 96
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)

CONFIGS = {
    'llama_gqa_llama3': ('LlamaConfig', 'LlamaForCausalLM', dict(
        _BASE, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0,
                      'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                      'original_max_position_embeddings': 8},
        tie_word_embeddings=False)),
    'llama_mqa_tied': ('LlamaConfig', 'LlamaForCausalLM', dict(
        _BASE, num_key_value_heads=1, tie_word_embeddings=True)),
    'mistral_window': ('MistralConfig', 'MistralForCausalLM', dict(
        _BASE, num_key_value_heads=2, sliding_window=5,
        tie_word_embeddings=False)),
    'qwen2_bias_tied': ('Qwen2Config', 'Qwen2ForCausalLM', dict(
        _BASE, num_key_value_heads=2, tie_word_embeddings=True)),
}


def _torch_model(name):
  config_cls, model_cls, kwargs = CONFIGS[name]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**kwargs)
  model = getattr(transformers, model_cls)(config).eval()
  # Random (not zero) biases and norms, so a mis-mapped one shows.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith('bias') or 'norm' in pname:
        p.add_(torch.randn_like(p) * 0.1)
  return model


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  out = {}
  for name in CONFIGS:
    model = _torch_model(name)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (path, model)
  return out


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (3, 12))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_load_matches_transformers(folders, name):
  path, torch_model = folders[name]
  model, params = hf.load(path)
  ours = np.asarray(model.apply({'params': params}, TOKENS))
  want = _torch_logits(torch_model, TOKENS)
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_load_scanned_and_remat_same_logits(folders):
  path, torch_model = folders['llama_gqa_llama3']
  model, params = hf.load(path, scan_layers=True, remat='full')
  assert params['layers']['self_attn']['k_proj']['kernel'].shape == (
      2, 32, 16)
  ours = np.asarray(model.apply({'params': params}, TOKENS))
  np.testing.assert_allclose(ours, _torch_logits(torch_model, TOKENS),
                             atol=1e-4, rtol=0)


def test_save_round_trip_sharded(folders, tmp_path):
  path, torch_model = folders['qwen2_bias_tied']
  model, params = hf.load(path, scan_layers=True)
  files = hf.save(str(tmp_path), model, params, max_shard_bytes=20_000)
  assert len(files) > 2, files
  index = json.load(open(tmp_path / hf.INDEX))
  assert set(index['weight_map'].values()) == set(files)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  np.testing.assert_allclose(_torch_logits(back, TOKENS),
                             _torch_logits(torch_model, TOKENS),
                             atol=1e-5, rtol=0)
  model2, params2 = hf.load(str(tmp_path))
  assert not model2.scan_layers
  np.testing.assert_array_equal(
      params2['layers_1']['self_attn']['q_proj']['bias'],
      params['layers']['self_attn']['q_proj']['bias'][1])


def test_sharded_load_reads_slices(folders):
  """Loading into FSDP shardings over 8 devices equals the plain load."""
  path, _ = folders['llama_gqa_llama3']
  model, params = hf.load(path)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))

  def sharding(x):
    spec = [None] * x.ndim
    spec[int(np.argmax(x.shape))] = 'data' if max(x.shape) % 8 == 0 else None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  shardings = jax.tree.map(sharding, params)
  _, sharded = hf.load(path, shardings=shardings)
  k = sharded['embed_tokens']['embedding']
  assert len(k.addressable_shards) == 8
  assert k.addressable_shards[0].data.shape == (VOCAB // 8, 32)
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.device_get(sharded))


def _export_train_check(tmp_path, model, steps=20):
  """Trains ``model`` ``steps`` Adam steps on random tokens, exports it and
  compares transformers' logits with ours."""
  import optax  # pylint: disable=g-import-not-at-top
  params = model.init(jax.random.key(1))['params']
  opt = optax.adam(3e-3)
  state = opt.init(params)
  data = jax.random.randint(jax.random.key(2), (4, 17), 0, model.vocab_size)

  @jax.jit
  def step(params, state):
    def loss(p):
      logits = model.apply({'params': p}, data[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, data[:, 1:]).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value
  first = None
  for _ in range(steps):
    params, state, value = step(params, state)
    first = value if first is None else first
  assert value < first
  hf.save(str(tmp_path), model, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  ours = np.asarray(model.apply({'params': params}, TOKENS))
  np.testing.assert_allclose(_torch_logits(back.eval(), TOKENS), ours,
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize('kwargs', [
    dict(num_kv_heads=2, tied=False, rope_theta=500000.0,
         rope_scaling={'rope_type': 'llama3', 'factor': 8.0,
                       'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                       'original_max_position_embeddings': 8}),
    dict(num_kv_heads=2, tied=True, qkv_bias=True, scan_layers=True),
], ids=['llama', 'qwen2_scanned'])
def test_trained_export_loads_in_transformers(tmp_path, kwargs):
  model = llama_lib.llama(vocab_size=VOCAB, hidden_size=32,
                          intermediate_size=64, num_layers=2, num_heads=4,
                          **kwargs)
  _export_train_check(tmp_path, model)


# -- bad input ---------------------------------------------------------------

def _copy(src, dst):
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    with open(os.path.join(src, name), 'rb') as f:
      data = f.read()
    with open(os.path.join(dst, name), 'wb') as f:
      f.write(data)
  return dst


def test_unknown_architecture(folders, tmp_path):
  path = _copy(folders['llama_mqa_tied'][0], str(tmp_path / 'm'))
  cfg = json.load(open(os.path.join(path, 'config.json')))
  cfg['architectures'] = ['GPTNeoXForCausalLM']
  json.dump(cfg, open(os.path.join(path, 'config.json'), 'w'))
  with pytest.raises(RunnerError, match=r"config.json: architecture "
                     r"'GPTNeoXForCausalLM' is not supported"):
    hf.load(path)


def test_shape_mismatch(folders, tmp_path):
  path = _copy(folders['llama_mqa_tied'][0], str(tmp_path / 'm'))
  cfg = json.load(open(os.path.join(path, 'config.json')))
  cfg['intermediate_size'] = 48
  json.dump(cfg, open(os.path.join(path, 'config.json'), 'w'))
  with pytest.raises(RunnerError, match=r'tensor model.layers.0.mlp.gate_proj'
                     r'.weight has shape \(64, 32\) but the config asks for'
                     r' \(48, 32\)'):
    hf.load(path)


def test_missing_shard(folders, tmp_path):
  model, params = hf.load(folders['llama_mqa_tied'][0])
  files = hf.save(str(tmp_path), model, params, max_shard_bytes=20_000)
  os.remove(tmp_path / files[1])
  with pytest.raises(RunnerError, match=f'names the shard {files[1]}, which'
                     ' is missing'):
    hf.load(str(tmp_path))


def test_missing_tensor(folders, tmp_path):
  path = _copy(folders['llama_gqa_llama3'][0], str(tmp_path / 'm'))
  cfg = json.load(open(os.path.join(path, 'config.json')))
  cfg['num_hidden_layers'] = 3
  json.dump(cfg, open(os.path.join(path, 'config.json'), 'w'))
  with pytest.raises(RunnerError, match='tensor model.layers.2.'
                     r'\S+ is missing'):
    hf.load(path)


# -- the runner: ckpt convert --to=hf / --from=hf, --init_from=hf: ----------

RUN_FLAGS = ['--gin_file=llama_tiny.gin', '--gin.llama.num_layers=2',
             '--gin.llama.hidden_size=32', '--gin.llama.intermediate_size=64',
             '--gin.text_files.length=32', '--gin.train.batch_size=8',
             '--gin.train.eval_every=1000', '--gin.train.log_every=10',
             '--gin.text_files.max_eval_examples=8',
             '--gin.write_samples.num=1']


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A 20-step run of gin/llama_tiny.gin (tiny) through the runner."""
  from gintrain.runner import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('run'))
  code = train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                *RUN_FLAGS, '--gin.train.num_steps=20'])
  assert code == 0
  return workdir


def _run_params(path):
  from gintrain.runner.training import init_from  # pylint: disable=g-import-not-at-top
  return init_from.checkpoint_params(path)[1]


def test_runner_run_exports_to_transformers(trained_run, tmp_path):
  from gintrain.runner.cli import main as cli  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'hf')
  assert cli.main_with_flags(['gintrain', 'ckpt', 'convert', '--to=hf',
                              trained_run, out,
                              '--max_shard_bytes=30000']) == 0
  assert os.path.isfile(os.path.join(out, hf.INDEX))  # several shards
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  params = _run_params(trained_run)
  model = hf.model_from_config(json.load(open(os.path.join(out,
                                                           'config.json'))))
  tokens = np.random.RandomState(1).randint(0, 256, (2, 32))
  ours = np.asarray(model.apply({'params': params}, tokens))
  np.testing.assert_allclose(_torch_logits(back, tokens), ours, atol=1e-4,
                             rtol=0)
  # --from=hf gives the run's parameters back, exactly.
  assert cli.main_with_flags(['gintrain', 'ckpt', 'convert', '--from=hf',
                              out, str(tmp_path / 'back')]) == 0
  jax.tree.map(np.testing.assert_array_equal, params,
               _run_params(str(tmp_path / 'back')))
  assert 'llama.hidden_size = 32' in open(tmp_path / 'back' /
                                          'llama.gin').read()


def test_init_from_hf(trained_run, tmp_path, capsys):
  """A new run (scanned layers) starts from the exported folder's weights:
  after one step at learning rate 0 its parameters are the run's."""
  from gintrain.runner import train  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import main as cli  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'hf')
  assert cli.main_with_flags(['gintrain', 'ckpt', 'convert', '--to=hf',
                              trained_run, out]) == 0
  workdir = str(tmp_path / 'ft')
  flags = [*RUN_FLAGS, '--gin.train.num_steps=1',
           '--gin.optimizer.learning_rate=0.0',
           '--gin.llama.scan_layers=True']
  assert train.main_with_flags(['gintrain', f'--workdir={workdir}',
                                f'--init_from=hf:{out}', *flags]) == 0
  got = _run_params(workdir)
  want = _run_params(trained_run)
  np.testing.assert_array_equal(
      got['layers']['mlp']['down_proj']['kernel'][1],
      want['layers_1']['mlp']['down_proj']['kernel'])
  np.testing.assert_array_equal(got['lm_head']['kernel'],
                                want['lm_head']['kernel'])
  # A model the folder does not fit: one line, before training.
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', f'--workdir={tmp_path}/bad',
                                f'--init_from=hf:{out}', *flags,
                                '--gin.llama.intermediate_size=48']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      f'gintrain: error: --init_from={"hf:" + out}'), err
  assert 'intermediate_size' in err[0] or '48' in err[0], err
  assert not os.path.exists(os.path.join(tmp_path, 'bad', 'checkpoints',
                                         'checkpoint_1'))


def test_two_process_fsdp_load_equals_one_process(folders, tmp_path):
  """2 processes x 2 devices load into FSDP shardings, each reading only
  its slices; every shard equals the same slice of the 1-process load."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, os.path.join(here, 'cluster'))
  import harness  # pylint: disable=g-import-not-at-top
  path, _ = folders['llama_gqa_llama3']
  port = harness.free_port()
  worker = os.path.join(here, 'hf_mp_worker.py')
  procs = [subprocess.Popen(
      [sys.executable, worker, str(port), str(i), path,
       str(tmp_path / f'p{i}.npz')], env=harness.env(devices=2),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  _, params = hf.load(path)
  from gintrain.runner.parallel import rules  # pylint: disable=g-import-not-at-top
  flat = {rules.path_of(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  seen = set()
  for i in range(2):
    shards = np.load(tmp_path / f'p{i}.npz')
    for key in shards.files:
      name, index = key.split('|')
      sl = tuple(slice(*(None if x == 'None' else int(x)
                         for x in part.split(':'))) for part in
                 index.split(',')) if index else ()
      np.testing.assert_array_equal(shards[key], flat[name][sl])
      seen.add((name, i, shards[key].size < flat[name].size))
  # The embedding is split: each process holds (and read) half of it.
  assert ('embed_tokens/embedding', 0, True) in seen
  assert ('embed_tokens/embedding', 1, True) in seen
