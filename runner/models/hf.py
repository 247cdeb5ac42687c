"""Hugging Face checkpoints in and out: ``config.json`` plus safetensors.

:func:`load` builds a :class:`~.llama.Llama` from a model folder's
``config.json`` (``LlamaForCausalLM``, ``MistralForCausalLM`` or
``Qwen2ForCausalLM``) and reads its weights from ``model.safetensors`` or
the shards a ``model.safetensors.index.json`` names; :func:`save` writes the
same layout (shards of at most ``max_shard_bytes`` plus the index), which
``transformers.AutoModelForCausalLM.from_pretrained`` loads. No network and
no hub: a folder on disk in, a folder on disk out.

Tensor names map one to one onto the model's parameters
(``model.layers.3.self_attn.q_proj.weight`` is ``layers_3/self_attn/q_proj/
kernel`` transposed, or row 3 of the scanned ``layers/...`` stack).

:func:`read_params` with ``shardings`` builds each array with
``jax.make_array_from_callback``, reading only the slices the local devices
hold through safetensors' lazy slices (a multi-process FSDP load reads each
process's part of each tensor).

Every fault in the folder (unsupported architecture or activation, a
missing file, shard or tensor, a tensor whose shape does not fit the
config) is a :class:`~gintrain.runner.errors.RunnerError` naming it.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from gintrain.runner.errors import RunnerError
from gintrain.runner.models import llama as llama_lib

__all__ = ['ARCHITECTURES', 'load', 'save', 'read_params', 'model_from_config',
           'config_of']

# architecture -> model_type
ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                 'Qwen2ForCausalLM': 'qwen2'}
CONFIG = 'config.json'
SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
DEFAULT_SHARD_BYTES = 5 * 10**9

_DTYPE_NAMES = {'float32': 'float32', 'bfloat16': 'bfloat16',
                'float16': 'float16'}


def _read_config(path: str) -> dict:
  file = os.path.join(path, CONFIG)
  if not os.path.isdir(path):
    raise RunnerError(f'{path}: not a Hugging Face model folder (not a'
                      ' directory).')
  try:
    with open(file, encoding='utf-8') as f:
      cfg = json.load(f)
  except FileNotFoundError:
    raise RunnerError(f'{file}: no such file; a Hugging Face model folder'
                      ' holds config.json and model.safetensors.') from None
  except (OSError, ValueError) as e:
    raise RunnerError(f'{file}: cannot read it as JSON'
                      f' ({" ".join(str(e).split())}).') from None
  if not isinstance(cfg, dict):
    raise RunnerError(f'{file}: not a JSON object.')
  return cfg


def _architecture(cfg: Mapping, where: str) -> str:
  """The config's architecture among :data:`ARCHITECTURES` (the first of
  ``architectures``, else found by ``model_type``).

  Raises:
    RunnerError: none of them.
  """
  archs = cfg.get('architectures') or []
  arch = archs[0] if archs else None
  if arch in ARCHITECTURES:
    return arch
  kind = cfg.get('model_type')
  arch = next((a for a, t in ARCHITECTURES.items() if t == kind), None) \
      if not archs else None
  if arch is None:
    raise RunnerError(
        f'{where}: architecture {(archs or [cfg.get("model_type")])[0]!r}'
        f' is not supported (supported: {", ".join(ARCHITECTURES)}).')
  return arch


def _rope(cfg: Mapping) -> tuple:
  """``(rope_theta, rope_scaling or None)`` of a config, from its keys of
  that name or from ``rope_parameters`` (newer transformers)."""
  rope = dict(cfg.get('rope_parameters') or {})
  scaling = cfg.get('rope_scaling') or None
  theta = cfg.get('rope_theta', rope.get('rope_theta', 10000.0))
  if scaling is None and rope.get('rope_type', 'default') != 'default':
    scaling = rope
  return theta, scaling


def model_from_config(cfg: Mapping, where: str = CONFIG,
                      **overrides) -> llama_lib.Llama:
  """The :class:`~.llama.Llama` of a Hugging Face ``config.json`` dict;
  ``overrides`` are :func:`~.llama.llama` arguments (``dtype``,
  ``param_dtype``, ``remat``, ``scan_layers``, ...).

  Raises:
    RunnerError: an unsupported architecture or setting, or a missing key.
  """
  arch = _architecture(cfg, where)
  kind = ARCHITECTURES[arch]

  def need(key):
    if key not in cfg:
      raise RunnerError(f'{where}: {arch} config has no {key!r}.')
    return cfg[key]
  act = cfg.get('hidden_act', 'silu')
  if act != 'silu':
    raise RunnerError(f'{where}: hidden_act {act!r} is not supported (silu'
                      ' only).')
  theta, scaling = _rope(cfg)
  sliding = None
  if kind == 'mistral':
    sliding = cfg.get('sliding_window')
  elif kind == 'qwen2' and cfg.get('use_sliding_window'):
    raise RunnerError(f'{where}: use_sliding_window=true is not supported'
                      ' for Qwen2.')
  attention_bias = bool(cfg.get('attention_bias', False))
  args = dict(
      vocab_size=need('vocab_size'), hidden_size=need('hidden_size'),
      intermediate_size=need('intermediate_size'),
      num_layers=need('num_hidden_layers'),
      num_heads=need('num_attention_heads'),
      num_kv_heads=cfg.get('num_key_value_heads')
      or cfg['num_attention_heads'],
      head_dim=cfg.get('head_dim'), rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=cfg.get('rms_norm_eps', 1e-6),
      tied=bool(cfg.get('tie_word_embeddings', False)),
      qkv_bias=(kind == 'qwen2') or attention_bias,
      out_bias=(kind == 'llama' and attention_bias),
      mlp_bias=(kind == 'llama' and bool(cfg.get('mlp_bias', False))),
      sliding_window=sliding,
      max_len=cfg.get('max_position_embeddings', 4096))
  args.update(overrides)
  try:
    return llama_lib.llama(**args)
  except ValueError as e:
    raise RunnerError(f'{where}: {e}') from None


def config_of(model: llama_lib.Llama, architecture: str | None = None,
              param_dtype: str | None = None) -> dict:
  """A ``config.json`` dict for ``model`` (the architecture chosen from its
  biases and window unless given).

  Raises:
    RunnerError: the model has no Hugging Face equivalent.
  """
  m = model
  if architecture is None:
    architecture = ('Qwen2ForCausalLM' if m.qkv_bias and not m.out_bias
                    else 'MistralForCausalLM' if m.sliding_window
                    else 'LlamaForCausalLM')
  if architecture not in ARCHITECTURES:
    raise RunnerError(f'architecture {architecture!r} is not supported'
                      f' (supported: {", ".join(ARCHITECTURES)}).')
  kind = ARCHITECTURES[architecture]
  fits = {'llama': m.qkv_bias == m.out_bias and not m.sliding_window,
          'mistral': not (m.qkv_bias or m.out_bias or m.mlp_bias),
          'qwen2': m.qkv_bias and not (m.out_bias or m.mlp_bias
                                       or m.sliding_window)}[kind]
  if not fits:
    raise RunnerError(
        f'{m.name} (qkv_bias={m.qkv_bias}, out_bias={m.out_bias},'
        f' mlp_bias={m.mlp_bias}, sliding_window={m.sliding_window}) has no'
        f' {architecture} equivalent.')
  dt = _DTYPE_NAMES[param_dtype or m.param_dtype]
  rope_parameters = {'rope_type': 'default', 'rope_theta': m.rope_theta}
  scaling = None
  if m.rope_scaling:
    scaling = dict(m.rope_scaling)
    rope_parameters.update(scaling)
  cfg = {
      'architectures': [architecture], 'model_type': kind,
      'vocab_size': m.vocab_size, 'hidden_size': m.hidden_size,
      'intermediate_size': m.intermediate_size,
      'num_hidden_layers': m.num_layers,
      'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.num_kv_heads, 'head_dim': m.head_dim,
      'hidden_act': 'silu', 'max_position_embeddings': m.max_len,
      'rms_norm_eps': m.rms_norm_eps, 'rope_theta': m.rope_theta,
      'rope_scaling': scaling, 'rope_parameters': rope_parameters,
      'tie_word_embeddings': m.tied, 'torch_dtype': dt, 'dtype': dt,
      'initializer_range': m.init_std, 'use_cache': True}
  if kind == 'llama':
    cfg.update(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias)
  elif kind == 'mistral':
    cfg.update(sliding_window=m.sliding_window)
  else:
    cfg.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=m.num_layers)
  return cfg


# -- name mapping ------------------------------------------------------------

def _layer_entries(model) -> list:
  """``[(path inside a block, hf suffix, transpose)]``."""
  out = [(('input_layernorm', 'scale'), 'input_layernorm.weight', False),
         (('post_attention_layernorm', 'scale'),
          'post_attention_layernorm.weight', False)]
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    out.append((('self_attn', name, 'kernel'), f'self_attn.{name}.weight',
                True))
    if (model.qkv_bias if name != 'o_proj' else model.out_bias):
      out.append((('self_attn', name, 'bias'), f'self_attn.{name}.bias',
                  False))
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    out.append((('mlp', name, 'kernel'), f'mlp.{name}.weight', True))
    if model.mlp_bias:
      out.append((('mlp', name, 'bias'), f'mlp.{name}.bias', False))
  return out


def mapping(model) -> dict:
  """``{parameter path tuple: (hf names, transpose, stacked)}``: one name,
  or one per layer for a scanned stack."""
  out = {('embed_tokens', 'embedding'): (['model.embed_tokens.weight'],
                                         False, False),
         ('norm', 'scale'): (['model.norm.weight'], False, False)}
  if not model.tied:
    out[('lm_head', 'kernel')] = (['lm_head.weight'], True, False)
  for sub, suffix, transpose in _layer_entries(model):
    names = [f'model.layers.{i}.{suffix}' for i in range(model.num_layers)]
    if model.scan_layers:
      out[('layers',) + sub] = (names, transpose, True)
    else:
      for i, name in enumerate(names):
        out[(f'layers_{i}',) + sub] = ([name], transpose, False)
  return out


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


# -- reading -----------------------------------------------------------------

class _Files:
  """The folder's tensors: name -> file, opened lazily with safe_open."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = safe_open
    self.path = path
    index = os.path.join(path, INDEX)
    single = os.path.join(path, SINGLE)
    if os.path.isfile(index):
      try:
        with open(index, encoding='utf-8') as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunnerError(f'{index}: not a safetensors index (no readable'
                          f' "weight_map": {e}).') from None
      self.where = {name: os.path.join(path, file)
                    for name, file in weight_map.items()}
      for file in sorted(set(self.where.values())):
        if not os.path.isfile(file):
          raise RunnerError(f'{index} names the shard'
                            f' {os.path.basename(file)}, which is missing'
                            f' from {path}.')
    elif os.path.isfile(single):
      with self._open(single, framework='numpy') as f:
        self.where = {name: single for name in f.keys()}
    else:
      raise RunnerError(f'{path}: no {SINGLE} and no {INDEX}.')
    self._handles = {}

  def _handle(self, file):
    if file not in self._handles:
      try:
        self._handles[file] = self._open(file, framework='numpy')
      except Exception as e:  # pylint: disable=broad-except
        raise RunnerError(f'{file}: not a readable safetensors file'
                          f' ({" ".join(str(e).split())}).') from None
    return self._handles[file]

  def slice(self, name: str):
    if name not in self.where:
      raise RunnerError(f'{self.path}: tensor {name} is missing (the config'
                        ' asks for it).')
    return self._handle(self.where[name]).get_slice(name)


def _check_shapes(files: _Files, model, where: str) -> dict:
  """Each parameter's expected shape, checked against the files'."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))['params']
  for path, (names, transpose, stacked) in mapping(model).items():
    want = _get(shapes, path).shape
    per = want[1:] if stacked else want
    hf_shape = tuple(reversed(per)) if transpose else tuple(per)
    for name in names:
      got = tuple(files.slice(name).get_shape())
      if got != hf_shape:
        raise RunnerError(
            f'{where}: tensor {name} has shape {got} but the config asks'
            f' for {hf_shape} (in {os.path.basename(files.where[name])}).')
  return shapes


def _read_block(files, names, transpose, stacked, index, dtype):
  """The block ``index`` (a tuple of slices, in the model's layout)."""
  if stacked:
    layers = range(len(names))[index[0]]
    index = index[1:]
  else:
    layers = [0]
  hf_index = tuple(reversed(index)) if transpose else tuple(index)
  parts = []
  for i in layers:
    block = np.asarray(files.slice(names[i])[hf_index] if hf_index
                       else files.slice(names[i])[:])
    parts.append(block.T if transpose else block)
  out = np.stack(parts) if stacked else parts[0]
  return out.astype(dtype)


def read_params(path: str, model, shardings: Any = None,
                where: str | None = None) -> dict:
  """The parameters in the Hugging Face folder ``path``, in ``model``'s
  layout and ``param_dtype``: numpy arrays, or with ``shardings`` (a tree
  of ``jax.sharding.Sharding`` like the params) global arrays built from
  the slices each process's devices hold.

  Raises:
    RunnerError: a missing file, shard or tensor, a shape mismatch.
  """
  where = where or path
  files = _Files(path)
  shapes = _check_shapes(files, model, where)
  dtype = np.dtype(llama_lib._DTYPES[model.param_dtype])  # pylint: disable=protected-access
  params = {}
  for p, (names, transpose, stacked) in mapping(model).items():
    shape = _get(shapes, p).shape
    if shardings is None:
      full = tuple(slice(None) for _ in shape)
      value = _read_block(files, names, transpose, stacked, full, dtype)
    else:
      value = jax.make_array_from_callback(
          shape, _get(shardings, p),
          lambda idx, n=names, t=transpose, s=stacked, sh=shape: (
              _read_block(files, n, t, s, _full_index(idx, sh), dtype)))
    _set(params, p, value)
  return params


def _full_index(index, shape):
  return tuple(index) + tuple(slice(None) for _ in shape[len(index):])


def load(path: str, shardings: Any = None, **overrides
         ) -> tuple[llama_lib.Llama, dict]:
  """``(model, params)`` of the Hugging Face folder ``path``.

  Args:
    path: a folder with ``config.json`` and ``model.safetensors`` (or an
      index and its shards).
    shardings: optional tree of shardings for the params (see
      :func:`read_params`).
    **overrides: :func:`~.llama.llama` arguments replacing the config's
      (``dtype``, ``param_dtype``, ``remat``, ``scan_layers``, ...).

  Raises:
    RunnerError: see the module doc.
  """
  cfg = _read_config(path)
  model = model_from_config(cfg, os.path.join(path, CONFIG), **overrides)
  return model, read_params(path, model, shardings)


# -- writing -----------------------------------------------------------------

def hf_tensors(model, params) -> dict:
  """``{hf name: numpy array}`` of ``params`` (in their dtype)."""
  out = {}
  for p, (names, transpose, stacked) in mapping(model).items():
    value = np.asarray(jax.device_get(_get(params, p)))
    rows = list(value) if stacked else [value]
    for name, row in zip(names, rows):
      out[name] = np.ascontiguousarray(row.T if transpose else row)
  return out


def save(path: str, model, params, architecture: str | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         extra_config: Mapping | None = None) -> list[str]:
  """Writes ``params`` of ``model`` as a Hugging Face folder at ``path``:
  ``config.json`` and ``model.safetensors``, or shards of at most
  ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)
  plus ``model.safetensors.index.json``.

  Returns:
    The safetensors files written (names in ``path``).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  params = params.get('params', params) if 'params' in params and len(
      params) == 1 else params
  tensors = hf_tensors(model, params)
  dtypes = {str(a.dtype) for a in tensors.values()}
  cfg = config_of(model, architecture,
                  param_dtype=dtypes.pop() if len(dtypes) == 1 and (
                      next(iter(dtypes)) in _DTYPE_NAMES) else None)
  cfg.update(extra_config or {})
  os.makedirs(path, exist_ok=True)
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  index = os.path.join(path, INDEX)
  if len(shards) == 1:
    files = [SINGLE]
    if os.path.exists(index):
      os.remove(index)
  else:
    n = len(shards)
    files = [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  for file, shard in zip(files, shards):
    save_file(shard, os.path.join(path, file), metadata={'format': 'pt'})
  if len(shards) > 1:
    weight_map = {name: file for file, shard in zip(files, shards)
                  for name in shard}
    with open(index, 'w', encoding='utf-8') as f:
      json.dump({'metadata': {'total_size': sum(
          a.nbytes for a in tensors.values())}, 'weight_map': weight_map},
                f, indent=2, sort_keys=True)
  with open(os.path.join(path, CONFIG), 'w', encoding='utf-8') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  return files


def read_like(path: str, params: Any, flag: str = '--init_from') -> dict:
  """The parameters of the Hugging Face folder ``path`` in the layout of
  ``params`` (a Llama's tree: per-block or scanned, in its dtype), as numpy
  arrays; ``--init_from=hf:PATH`` compares them leaf by leaf with the
  model (its include/exclude/rename rules apply).

  Raises:
    RunnerError: see the module doc (naming ``flag`` and the folder).
  """
  where = f'{flag}=hf:{path}'
  if not os.path.isdir(path):
    raise RunnerError(f'{where}: no such directory.')
  cfg = _read_config(path)
  params = params.get('params', params) if isinstance(params, Mapping) else {}
  overrides = {'scan_layers': 'layers' in params}
  leaf = params.get('embed_tokens', {}).get('embedding')
  dtype = str(np.dtype(getattr(leaf, 'dtype', np.float32)))
  if dtype in _DTYPE_NAMES:
    overrides['param_dtype'] = dtype
  model = model_from_config(cfg, f'{where}: {CONFIG}', **overrides)
  return read_params(path, model, where=where)
