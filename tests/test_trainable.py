"""``train.trainable`` with LoRA through the runner, and the train records'
FLOPs/MFU: a tiny Llama fine-tuned from a Hugging Face folder
(``--init_from=hf:``) with only its adapters training. Only adapters
change; the optimizer state and the checkpoints shrink (the checkpoint
holds the adapters and the base's hash); resume is bitwise; a missing or
different base is one line; the merged export equals the adapted model;
``model_flops_per_sec`` and ``mfu`` follow the formula."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gintrain.lib import checkpoints as lib_checkpoints
from gintrain.runner import train
from gintrain.runner.models import hf
from gintrain.runner.models import llama as llama_lib
from gintrain.runner.training import flops

SIZES = dict(vocab_size=256, hidden_size=32, intermediate_size=64,
             num_layers=2, num_heads=4, num_kv_heads=2, max_len=128)
FLAGS = ['--gin_file=llama_tiny.gin', '--gin_file=models/lora.gin',
         *[f'--gin.llama.{k}={v}' for k, v in SIZES.items()],
         '--gin.lora.rank=2', '--gin.lora.targets=["q_proj", "down_proj"]',
         '--gin.init_from.exclude=["lora_"]',
         '--gin.text_files.length=32', '--gin.train.batch_size=8',
         '--gin.train.eval_every=1000', '--gin.train.log_every=2',
         '--gin.text_files.max_eval_examples=8', '--gin.write_samples.num=1',
         '--gin.checkpoint_policy.every_steps=2',
         '--gin.train.peak_flops_per_device=1e9']
PEAK = 1e9


def _flags(workdir, base, steps, *extra):
  return ['gintrain', f'--workdir={workdir}', f'--init_from=hf:{base}',
          *FLAGS, f'--gin.train.num_steps={steps}', *extra]


def _errors(capsys):
  err = capsys.readouterr().err
  return [l for l in err.splitlines() if l.startswith('gintrain: error:')]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A random base saved as a Hugging Face folder, and a LoRA run of 4
  steps from it (checkpoints at 2 and 4)."""
  root = tmp_path_factory.mktemp('lora')
  base_model = llama_lib.llama(**SIZES)
  base_params = base_model.init(jax.random.key(7))['params']
  hf.save(str(root / 'base'), base_model, base_params)
  workdir = str(root / 'run')
  assert train.main_with_flags(_flags(workdir, root / 'base', 4)) == 0
  return root, base_params, workdir


def _ckpt(workdir, step):
  return os.path.join(workdir, 'checkpoints', f'checkpoint_{step}')


@pytest.fixture(scope='module')
def loaded(runs):
  """``(model, whole params, path)`` of the run's last checkpoint, as
  ``gintrain sample`` and ``ckpt convert`` load it (base rebuilt)."""
  from gintrain.runner.cli import sample  # pylint: disable=g-import-not-at-top
  return sample.load_run(runs[2])


def test_only_adapters_change(runs, loaded):
  _, base_params, _ = runs
  model, params, _ = loaded
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  base = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(base_params)[0]}
  adapters = [k for k in flat if 'lora_' in k]
  assert len(adapters) == 2 * 2 * 2  # a, b x q_proj, down_proj x 2 layers
  for key, value in base.items():  # the base: bit for bit the HF folder's
    np.testing.assert_array_equal(flat[key], value, err_msg=key)
  assert any(np.abs(flat[k]).max() > 0 for k in adapters if 'lora_b' in k)
  assert model.rank == 2


def test_checkpoint_holds_adapters_and_base_hash(runs):
  _, base_params, workdir = runs
  raw = lib_checkpoints.restore_checkpoint(_ckpt(workdir, 4), None)['state']
  paths = ['/'.join(map(str, (getattr(p, 'key', p) for p in k))) for k, _ in
           jax.tree_util.tree_flatten_with_path(raw['params'])[0]]
  assert paths and all('lora_' in p for p in paths), paths
  assert np.asarray(raw['base_hash']).shape == (2,)
  adapters = sum(np.asarray(x).nbytes for x in
                 jax.tree_util.tree_leaves(raw['params']))
  base = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(
      base_params))
  size = os.path.getsize(_ckpt(workdir, 4))
  # Adapters + their two Adam slots + small things: far below the base's
  # parameters alone (a full checkpoint holds 3x the base).
  assert size < 3 * adapters + 8192 < base / 4, (size, adapters, base)


def test_resume_is_bitwise(runs, tmp_path):
  root, _, workdir = runs
  again = str(tmp_path / 'again')
  shutil.copytree(workdir, again)
  os.remove(_ckpt(again, 4))  # as if preempted after the step-2 save
  assert train.main_with_flags(_flags(again, root / 'base', 4)) == 0
  want = lib_checkpoints.restore_checkpoint(_ckpt(workdir, 4), None)
  got = lib_checkpoints.restore_checkpoint(_ckpt(again, 4), None)
  jax.tree.map(np.testing.assert_array_equal, got['state'], want['state'])


def test_missing_or_other_base_is_one_line(runs, tmp_path, capsys):
  root, _, workdir = runs
  again = str(tmp_path / 'again')
  shutil.copytree(workdir, again)
  capsys.readouterr()
  assert train.main_with_flags(_flags(again, tmp_path / 'gone', 6)) != 0
  errors = _errors(capsys)
  assert len(errors) == 1 and 'gone' in errors[0], errors
  other = llama_lib.llama(**SIZES)
  hf.save(str(tmp_path / 'other'), other,
          other.init(jax.random.key(8))['params'])
  assert train.main_with_flags(_flags(again, tmp_path / 'other', 6)) != 0
  errors = _errors(capsys)
  assert len(errors) == 1 and 'base whose hash is' in errors[0], errors
  assert sorted(os.listdir(os.path.join(again, 'checkpoints'))) == [
      'checkpoint_2', 'checkpoint_4']  # nothing trained


def test_merged_export_equals_adapted_model(runs, loaded, tmp_path):
  from gintrain.runner.cli import main as cli  # pylint: disable=g-import-not-at-top
  _, _, workdir = runs
  out = str(tmp_path / 'hf')
  assert cli.main_with_flags(['gintrain', 'ckpt', 'convert', '--to=hf',
                              workdir, out]) == 0
  model, params, _ = loaded
  exported, exported_params = hf.load(out)
  tokens = np.random.RandomState(0).randint(0, 256, (2, 16))
  want = np.asarray(model.apply({'params': params}, tokens))
  np.testing.assert_allclose(
      exported.apply({'params': exported_params}, tokens), want, atol=1e-5)
  base = np.asarray(model.base.apply({'params': model.merged(
      jax.tree.map(np.zeros_like, params))[1]}, tokens))
  assert np.abs(want - base).max() > 0  # (the adapters do something)


def test_eval_rebuilds_the_base(runs, capsys):
  """`gintrain eval` of the adapters-only checkpoint gives the run's own
  final eval."""
  _, _, workdir = runs
  final = [r for r in _all_records(workdir) if r.get('split') == 'eval'][-1]
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', 'eval',
                                f'--workdir={workdir}']) == 0
  again = [r for r in _all_records(workdir)
           if r.get('split') == 'eval_only'][-1]
  assert again['step'] == final['step'] == 4
  assert again['loss'] == pytest.approx(final['loss'], rel=1e-6)


def _all_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return list(map(json.loads, f))


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r.get('split') == 'train']


def test_records_model_flops_and_mfu(runs, loaded):
  _, _, workdir = runs
  model = loaded[0]
  per_token = llama_lib.llama(**SIZES).flops_per_token(32)
  assert model.flops_per_token(32) == per_token
  records = _records(workdir)
  assert records
  for r in records:
    assert r['model_flops_per_sec'] == pytest.approx(
        per_token * r['tokens_per_sec'], rel=1e-9)
    assert r['mfu'] == pytest.approx(
        r['model_flops_per_sec'] / (PEAK * jax.device_count()), rel=1e-9)


def test_no_peak_no_mfu():
  """The CPU (and any device kind not in the table) gives no mfu."""
  assert flops.device_peak(None) == (None, "device kind 'cpu'")
  assert flops.peak_flops('Some Future Accelerator') is None
  assert flops.device_peak(2e12) == (2e12, 'train.peak_flops_per_device')


def test_peak_table():
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert flops.peak_flops('NVIDIA H200') == 989e12
  assert flops.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert flops.peak_flops('NVIDIA L4') == 121e12
  assert flops.peak_flops('NVIDIA L40S') == 362e12
  assert flops.peak_flops('TPU v4') == 275e12
  assert flops.peak_flops('TPU v5 lite') == 197e12
  assert flops.peak_flops('TPU v5p') == 459e12
  assert flops.peak_flops('TPU v6 lite') == 918e12
  assert flops.peak_flops('cpu') is None


def test_bad_trainable_is_one_line(capsys):
  for value, words in (("['nope']", "matches no parameter"),
                       ("['(']", "is not a regular expression"),
                       ("[3]", "must be a non-empty list")):
    capsys.readouterr()
    assert train.main_with_flags([
        'gintrain', '--dry_run', '--gin_file=llama_tiny.gin',
        '--gin.llama.num_layers=1', f'--gin.train.trainable={value}']) != 0
    errors = _errors(capsys)
    assert len(errors) == 1 and words in errors[0], errors
    assert 'train.trainable' in errors[0]
  capsys.readouterr()
  assert train.main_with_flags([
      'gintrain', '--dry_run', '--gin_file=llama_tiny.gin',
      '--gin.train.peak_flops_per_device=-1']) != 0
  errors = _errors(capsys)
  assert len(errors) == 1, errors
  assert 'train.peak_flops_per_device must be' in errors[0]
  assert 'got -1' in errors[0]


def test_docstring_examples_run():
  import doctest  # pylint: disable=g-import-not-at-top
  from gintrain.runner.models import lora  # pylint: disable=g-import-not-at-top
  from gintrain.runner.training import frozen  # pylint: disable=g-import-not-at-top
  for module in (flops, frozen, lora):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__
