"""Every shipped gin file runs briefly without a DeprecationWarning from
gintrain's code; a gin file's own folder is importable from it."""

import glob
import logging
import os
import warnings

import pytest

from gintrain.runner import train
from gintrain.runner.cli import config

BRIEF = ['--gin.train.num_steps=2', '--gin.train.num_epochs=None',
         '--gin.train.eval_batch_size=64', '--gin.train.log_every=1']
# Each shipped file, run within an experiment that completes it.
RUNS = {
    'default.gin': ['default.gin'],
    'run.gin': ['default.gin'],
    'models/mlp.gin': ['default.gin'],
    'datasets/digits.gin': ['default.gin'],
    'optimizers/adam.gin': ['default.gin'],
    'models/cnn.gin': ['default.gin', 'models/cnn.gin',
                       'datasets/digits_image.gin'],
    'datasets/digits_image.gin': ['default.gin', 'models/cnn.gin',
                                  'datasets/digits_image.gin'],
    'optimizers/sgd_cosine.gin': ['default.gin', 'optimizers/sgd_cosine.gin',
                                  '--gin.cosine.halfcos_epochs=2'],
    'regression.gin': ['regression.gin'],
    'datasets/diabetes.gin': ['regression.gin'],
    'tasks/regression.gin': ['regression.gin'],
    'datasets/synthetic.gin': ['default.gin', 'datasets/synthetic.gin',
                               '--gin.mlp.num_classes=4'],
    'lm.gin': ['lm.gin', '--gin.text_files.max_eval_examples=64',
               '--gin.transformer.depth=1', '--gin.write_samples.num=1'],
    'models/transformer.gin': ['lm.gin'],
    'datasets/text_files.gin': ['lm.gin'],
    'datasets/packed_text_files.gin': ['lm.gin',
                                       'datasets/packed_text_files.gin'],
    'tasks/language_model.gin': ['lm.gin'],
    'llama_tiny.gin': ['llama_tiny.gin',
                       '--gin.text_files.max_eval_examples=64',
                       '--gin.llama.num_layers=1', '--gin.write_samples.num=1',
                       '--gin.llama.scan_layers=True',
                       "--gin.llama.remat='dots_saveable'"],
    'models/llama.gin': ['llama_tiny.gin',
                         '--gin.text_files.max_eval_examples=64',
                         '--gin.llama.num_layers=1', '--gin.write_samples.num=1',
                         '--gin.llama.scan_layers=True',
                         "--gin.llama.remat='dots_saveable'"],
    'models/lora.gin': ['llama_tiny.gin', 'models/lora.gin',
                        '--gin.text_files.max_eval_examples=64',
                        '--gin.llama.num_layers=1',
                        '--gin.write_samples.num=1', '--gin.lora.rank=2'],
    'parallel/fsdp.gin': ['lm.gin', 'parallel/fsdp.gin'],
    'parallel/tensor_parallel.gin': [  # one device here: a 1x1 mesh
        'lm.gin', 'parallel/tensor_parallel.gin',
        "--gin.partitioner.mesh_shape={'data': -1, 'model': 1}"],
}


def test_every_gin_file_is_covered():
  shipped = {os.path.relpath(p, config.REPO_GIN_DIR) for p in
             glob.glob(os.path.join(config.REPO_GIN_DIR, '**', '*.gin'),
                       recursive=True)}
  assert shipped == set(RUNS)


def _args(spec):
  out = []
  for item in spec:
    out.append(item if item.startswith('--') else f'--gin_file={item}')
  if 'lm.gin' in spec:  # complete the lm experiment's overrides
    out += RUNS['lm.gin'][1:]
  return out


@pytest.mark.parametrize('spec', sorted({tuple(v) for v in RUNS.values()}),
                         ids=lambda s: '+'.join(x for x in s
                                                if not x.startswith('--')))
def test_runs_without_deprecation_warnings(spec, tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  with warnings.catch_warnings():
    warnings.simplefilter('default')
    warnings.filterwarnings('error', category=DeprecationWarning,
                            module=r'gintrain\.')
    warnings.filterwarnings('error', category=DeprecationWarning,
                            module=r'gintrain$')
    code = train.main_with_flags(['gintrain', f'--workdir={tmp_path}',
                                  *_args(spec), *BRIEF])
  assert code == 0
  deprecated = [r.getMessage() for r in caplog.records
                if 'deprecat' in r.getMessage().lower()]
  assert not deprecated


def test_gin_file_imports_a_module_next_to_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the folder of the gin file
  folder = tmp_path / 'exp'
  folder.mkdir()
  (folder / 'my_next_door_model.py').write_text(
      'import gin\n'
      'from gintrain.runner.models import plain\n'
      '@gin.configurable\n'
      'def small_mlp(width=8):\n'
      '  return plain.mlp(features=(width,), num_classes=10)\n')
  (folder / 'exp.gin').write_text(
      "include 'default.gin'\n"
      'import my_next_door_model\n'
      'train.model = @my_next_door_model.small_mlp()\n'
      'small_mlp.width = 4\n')
  assert train.main_with_flags(['gintrain', f'--workdir={tmp_path}/w',
                                f'--gin_file={folder}/exp.gin', *BRIEF]) == 0
  assert str(folder) not in __import__('sys').path  # only while parsing
  assert 'small_mlp.width = 4' in (tmp_path / 'w' /
                                   'config.operative.gin').read_text()
