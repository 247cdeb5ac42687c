"""``gintrain ckpt convert --to=hf`` / ``--from=hf``: runs <-> Hugging Face.

    gintrain ckpt convert --to=hf RUN_OR_CKPT OUT [--architecture=NAME]
        [--max_shard_bytes=N]
    gintrain ckpt convert --from=hf HF_FOLDER OUT

``--to=hf``: ``RUN_OR_CKPT`` is a run's workdir (its latest checkpoint) or
a checkpoint file of a run (``<workdir>/checkpoints/checkpoint_N``); the
model is the one the run's ``config.parsed.gin`` builds (``models.llama``),
and ``OUT`` becomes a folder that ``transformers.AutoModelForCausalLM.
from_pretrained`` loads (:func:`runner.models.hf.save`; LoRA adapters, if
any, merged into the weights).

``--from=hf``: ``OUT`` becomes a folder with ``checkpoint_0`` (the
parameters, a msgpack checkpoint ``--init_from=OUT`` reads) and
``llama.gin`` (the ``models.llama`` bindings of the folder's config, to
include in the run's gin files). ``--init_from=hf:HF_FOLDER`` reads the
folder directly, without converting.
"""

import os
import warnings

import jax

from gintrain.lib import checkpoints as lib_checkpoints
from gintrain.runner.errors import RunnerError

__all__ = ['to_hf', 'from_hf', 'gin_bindings']


def _run_and_checkpoint(src: str):
  from gintrain.runner.outputs import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if os.path.isfile(src):
    parent = os.path.dirname(os.path.abspath(src))
    return os.path.dirname(parent), src
  if os.path.isfile(os.path.join(src, workdir_lib.PARSED_CONFIG)):
    return src, None
  raise RunnerError(f'convert --to=hf: {src} is neither a run\'s workdir'
                    f' (with {workdir_lib.PARSED_CONFIG}) nor a checkpoint'
                    ' file of one.')


def to_hf(src: str, out: str, architecture: str | None = None,
          max_shard_bytes: int | None = None) -> list[str]:
  """Exports the run or checkpoint ``src`` as a Hugging Face folder."""
  from gintrain.runner.cli import sample  # pylint: disable=g-import-not-at-top
  from gintrain.runner.models import hf  # pylint: disable=g-import-not-at-top
  from gintrain.runner.models import llama  # pylint: disable=g-import-not-at-top
  if os.path.exists(out) and os.listdir(out):
    raise RunnerError(f'convert --to=hf: {out} exists and is not empty;'
                      ' choose a new destination.')
  workdir, checkpoint = _run_and_checkpoint(src)
  model, params, _ = sample.load_run(workdir, checkpoint)
  merge = getattr(model, 'merged', None)
  if callable(merge):  # LoRA: the adapters folded into the base weights
    model, params = merge(params)
  if not isinstance(model, llama.Llama):
    raise RunnerError(f'convert --to=hf: the run\'s model is'
                      f' {getattr(model, "name", model)}; only models.llama'
                      ' has a Hugging Face layout.')
  kwargs = {}
  if max_shard_bytes:
    kwargs['max_shard_bytes'] = max_shard_bytes
  return hf.save(out, model, params, architecture=architecture, **kwargs)


def gin_bindings(model) -> str:
  """``llama.NAME = VALUE`` lines rebuilding ``model``."""
  from gintrain.runner.models import llama  # pylint: disable=g-import-not-at-top
  lines = ['train.model = @models.llama()']
  for name, value in llama.config_of(model).items():
    lines.append(f'llama.{name} = {value!r}')
  return '\n'.join(lines) + '\n'


def from_hf(src: str, out: str) -> str:
  """Converts the Hugging Face folder ``src`` into ``out/checkpoint_0``
  plus ``out/llama.gin``; returns the checkpoint path."""
  from gintrain.runner.models import hf  # pylint: disable=g-import-not-at-top
  if os.path.exists(out) and os.listdir(out):
    raise RunnerError(f'convert --from=hf: {out} exists and is not empty;'
                      ' choose a new destination.')
  model, params = hf.load(src)
  os.makedirs(out, exist_ok=True)
  with warnings.catch_warnings():  # the msgpack format is the point here
    warnings.simplefilter('ignore', DeprecationWarning)
    path = lib_checkpoints.save_checkpoint(out, jax.device_get(params), 0)
  with open(os.path.join(out, 'llama.gin'), 'w', encoding='utf-8') as f:
    f.write(f'# models.llama bindings of {os.path.abspath(src)}\n')
    f.write(gin_bindings(model))
  return path
