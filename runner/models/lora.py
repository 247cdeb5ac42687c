"""LoRA: low-rank adapters on a :class:`~.llama.Llama`'s projections.

:func:`lora` wraps a model: each dense layer whose path matches one of
``targets`` (regular expressions, ``re.search`` on paths like
``layers_0/self_attn/q_proj``) gets ``lora_a`` ``(in, rank)`` (normal,
``1/rank`` std) and ``lora_b`` ``(rank, out)`` (zeros) next to its
``kernel``, and computes with ``kernel + alpha / rank * lora_a @ lora_b``
(so a fresh adapter changes nothing). :meth:`Lora.merged` folds the
adapters into the kernels, giving the base model and plain parameters
(``gintrain ckpt convert --to=hf`` exports that).

Only the adapters train with ``train.trainable = ['lora_']``
(``runner.training.frozen``): the base gets no optimizer state and stays out
of the checkpoints (``gin/models/lora.gin`` binds it all)::

    include 'models/llama.gin'
    include 'models/lora.gin'
    lora.rank = 8
    lora.targets = ['q_proj', 'v_proj']
    # starting from a published model: the adapters stay at their init
    init_from.exclude = ['lora_']

    >>> import jax, jax.numpy as jnp
    >>> from gintrain.runner.models import llama
    >>> base = llama.llama(vocab_size=32, hidden_size=16,
    ...                    intermediate_size=32, num_layers=1, num_heads=2)
    >>> m = lora(base, rank=2, targets=('q_proj',))
    >>> p = m.init(jax.random.key(0))['params']
    >>> sorted(p['layers_0']['self_attn']['q_proj'])
    ['kernel', 'lora_a', 'lora_b']
"""

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from gintrain.runner import validation

__all__ = ['Lora', 'lora', 'merge_params']


def _paths(tree, prefix=()):
  """``(path tuple, dict)`` of every dict holding a 2-D+ ``kernel``."""
  if isinstance(tree, dict):
    if 'kernel' in tree and getattr(tree['kernel'], 'ndim', 0) >= 2:
      yield prefix, tree
    for k, v in tree.items():
      if isinstance(v, dict):
        yield from _paths(v, prefix + (k,))


def merge_params(params: dict, scale: float) -> dict:
  """``params`` with each ``lora_a``/``lora_b`` pair folded into its
  ``kernel`` (``kernel + scale * lora_a @ lora_b``) and removed."""
  if not isinstance(params, dict):
    return params
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and 'lora_a' in v:
      delta = jnp.einsum('...ir,...ro->...io', v['lora_a'], v['lora_b'])
      out[k] = {n: x for n, x in v.items() if n not in ('lora_a', 'lora_b')}
      out[k]['kernel'] = (v['kernel'] + scale * delta).astype(
          v['kernel'].dtype)
    else:
      out[k] = merge_params(v, scale)
  return out


@dataclasses.dataclass(frozen=True)
class Lora:
  """A model with low-rank adapters; build it with :func:`lora`."""
  base: Any
  rank: int
  alpha: float
  targets: tuple

  @property
  def name(self) -> str:
    return (f'lora({getattr(self.base, "name", self.base)}, rank={self.rank},'
            f' targets={list(self.targets)})')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def vocab_size(self):
    return getattr(self.base, 'vocab_size', None)

  def init(self, rng, x=None) -> dict:
    """The base model's fresh parameters plus adapters on the targets."""
    k_base, k_lora = jax.random.split(rng)
    params = self.base.init(k_base, x)['params']
    patterns = [re.compile(t) for t in self.targets]
    chosen = [(p, d) for p, d in _paths(params)
              if any(r.search('/'.join(p)) for r in patterns)]
    if not chosen:
      raise ValueError(f'lora.targets {list(self.targets)} match no dense'
                       ' layer of the model.')
    keys = jax.random.split(k_lora, len(chosen))
    for key, (_, dense) in zip(keys, chosen):
      kernel = dense['kernel']
      lead, (fan_in, fan_out) = kernel.shape[:-2], kernel.shape[-2:]
      dense['lora_a'] = (jax.random.normal(key, lead + (fan_in, self.rank),
                                           jnp.float32)
                         / self.rank).astype(kernel.dtype)
      dense['lora_b'] = jnp.zeros(lead + (self.rank, fan_out), kernel.dtype)
    return {'params': params}

  def merged(self, params) -> tuple[Any, dict]:
    """``(base model, params with the adapters merged)``."""
    params = params.get('params', params) if 'params' in params else params
    return self.base, merge_params(params, self.scale)

  def apply(self, variables, tokens, **kwargs):
    merged = merge_params(variables['params'], self.scale)
    return self.base.apply({**variables, 'params': merged}, tokens, **kwargs)

  @property
  def flops_per_token(self):
    """The base model's count (the adapters' FLOPs are left out)."""
    count = getattr(self.base, 'flops_per_token', None)
    if count is None:
      raise AttributeError('flops_per_token')
    return count

  def init_cache(self, *args, **kwargs):
    return self.base.init_cache(*args, **kwargs)

  def apply_cached(self, params, tokens, cache, index):
    return self.base.apply_cached(merge_params(params, self.scale), tokens,
                                  cache, index)


def lora(model: Any, rank: int = 8, alpha: float = 16.0,
         targets: tuple | list = ('q_proj', 'v_proj')) -> Lora:
  """Adapters of ``rank`` on ``model``'s dense layers matching ``targets``
  (regular expressions on paths), scaled by ``alpha / rank``."""
  validation.check_int('lora.rank', rank, 1)
  if isinstance(targets, str):
    targets = (targets,)
  validation.check_regex_list('lora.targets', targets)
  if not callable(getattr(model, 'apply', None)) and callable(model):
    model = model()
  return Lora(model, rank, float(alpha), tuple(targets))
