"""A decoder-only transformer language model in plain JAX (flax names).

Pre-norm blocks of causal multi-head self-attention and an MLP, learned or
rotary positions, tied or separate output embedding, and a computation
``dtype`` (parameters stay float32; e.g. ``'bfloat16'`` computes in bf16 and
the task takes the loss in float32)::

    >>> import jax, jax.numpy as jnp
    >>> lm = transformer(vocab_size=256, width=32, depth=2, heads=4,
    ...                  max_len=16)
    >>> variables = lm.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))
    >>> lm.apply(variables, jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
    >>> sorted(variables['params']['Block_0'])
    ['Attention_0', 'Dense_0', 'Dense_1', 'LayerNorm_0', 'LayerNorm_1']

Parameter names and layouts follow flax.linen (``Embed_0/embedding``,
``LayerNorm_i/{scale,bias}``, ``Dense_i/{kernel,bias}``; attention as
``nn.MultiHeadDotProductAttention``'s ``query/key/value`` kernels
``(width, heads, head_dim)`` and ``out`` ``(heads, head_dim, width)``), so
sharding rules written for flax models apply by path.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from gintrain.runner import validation

__all__ = ['Transformer', 'transformer']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}


def _normal(key, shape, std):
  return jax.random.normal(key, shape, jnp.float32) * std


def _layer_norm(p, x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * p['scale'] + p['bias']).astype(x.dtype)


def _rotary(x, positions):
  """Rotary position embedding on the last axis of ``x`` (B, T, H, D), at
  ``positions`` (T,) or (B, T)."""
  d = x.shape[-1] // 2
  freq = 1.0 / (10000 ** (jnp.arange(d, dtype=jnp.float32) / d))
  angle = positions[..., None].astype(jnp.float32) * freq  # (..., T, d)
  sin = jnp.sin(angle)[..., None, :].astype(x.dtype)
  cos = jnp.cos(angle)[..., None, :].astype(x.dtype)
  x1, x2 = x[..., :d], x[..., d:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


@dataclasses.dataclass(frozen=True)
class Transformer:
  """The model; build it with :func:`transformer`.

  Attributes:
    vocab_size: tokens are ``0 .. vocab_size - 1``.
    width: the residual stream width.
    depth: the number of blocks.
    heads: attention heads (``width`` must be a multiple).
    mlp_ratio: the MLP's hidden width is ``mlp_ratio * width``.
    max_len: the longest sequence (learned positions are that long).
    positions: ``'learned'`` or ``'rotary'``.
    tied: the output layer reuses the token embedding.
    dtype: the computation dtype name (``'float32'``, ``'bfloat16'``).
  """
  vocab_size: int
  width: int
  depth: int
  heads: int
  mlp_ratio: int
  max_len: int
  positions: str
  tied: bool
  dtype: str

  @property
  def name(self) -> str:
    return (f'transformer(width={self.width}, depth={self.depth},'
            f' heads={self.heads}, positions={self.positions!r},'
            f' dtype={self.dtype!r})')

  def init(self, rng, x) -> dict:
    """Fresh ``{'params': ...}`` (GPT-2 style init: normal 0.02, residual
    projections scaled by ``1/sqrt(2 depth)``); only ``x``'s shape is used."""
    del x
    w, h = self.width, self.heads
    hd, hidden = w // h, self.mlp_ratio * w
    keys = iter(jax.random.split(rng, 4 + 6 * self.depth))
    std, out_std = 0.02, 0.02 / math.sqrt(2 * self.depth)
    zeros = lambda *s: jnp.zeros(s, jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
    norm = lambda: {'scale': jnp.ones((w,), jnp.float32), 'bias': zeros(w)}  # pylint: disable=unnecessary-lambda-assignment
    params = {'Embed_0': {'embedding': _normal(next(keys),
                                               (self.vocab_size, w), std)}}
    if self.positions == 'learned':
      params['Embed_1'] = {'embedding': _normal(next(keys),
                                                (self.max_len, w), std)}
    for i in range(self.depth):
      attention = {
          name: {'kernel': _normal(next(keys), (w, h, hd), std),
                 'bias': zeros(h, hd)}
          for name in ('query', 'key', 'value')}
      attention['out'] = {'kernel': _normal(next(keys), (h, hd, w), out_std),
                          'bias': zeros(w)}
      params[f'Block_{i}'] = {
          'LayerNorm_0': norm(), 'Attention_0': attention,
          'LayerNorm_1': norm(),
          'Dense_0': {'kernel': _normal(next(keys), (w, hidden), std),
                      'bias': zeros(hidden)},
          'Dense_1': {'kernel': _normal(next(keys), (hidden, w), out_std),
                      'bias': zeros(w)}}
    params['LayerNorm_0'] = norm()
    if not self.tied:
      params['Dense_0'] = {'kernel': _normal(next(keys),
                                             (w, self.vocab_size), std),
                           'bias': zeros(self.vocab_size)}
    return {'params': params}

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token, counted as ``llama.Llama.flops_per_token``
    does: 2 per multiply-add of q/k/v/out, the MLP and the output layer,
    attention ``2 * seq_len * width`` per block (causal: half); x3 to
    train."""
    w = self.width
    matmul = self.depth * (4 * w * w + 2 * w * self.mlp_ratio * w)
    matmul += w * self.vocab_size
    forward = 2 * matmul + self.depth * 2 * seq_len * w
    return float(3 * forward if training else forward)

  def _attention(self, p, x, positions, segment_ids=None):
    dt = x.dtype
    q, k, v = (jnp.einsum('btw,whd->bthd', x, p[n]['kernel'].astype(dt))
               + p[n]['bias'].astype(dt) for n in ('query', 'key', 'value'))
    if self.positions == 'rotary':
      q, k = _rotary(q, positions), _rotary(k, positions)
    t = x.shape[1]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if segment_ids is not None:  # packed rows: attend within a document
      same = segment_ids[:, :, None] == segment_ids[:, None, :]
      allowed = allowed & same[:, None]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return (jnp.einsum('bqhd,hdw->bqw', out, p['out']['kernel'].astype(dt))
            + p['out']['bias'].astype(dt))

  def apply(self, variables, tokens, segment_ids=None,
            positions=None) -> jax.Array:
    """Logits ``(batch, time, vocab)`` for int tokens ``(batch, time)``.

    ``segment_ids`` (batch, time): a token attends only to earlier tokens
    of its own segment (packed documents); ``positions`` (batch, time):
    each token's position in its document (default ``0 .. time - 1``).
    """
    params = variables['params']
    dt = _DTYPES[self.dtype]
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f'{self.name}: sequences of {t} tokens exceed max_len'
                       f' {self.max_len}.')
    x = jnp.take(params['Embed_0']['embedding'], tokens, axis=0).astype(dt)
    if positions is None:
      positions = jnp.arange(t)
    if self.positions == 'learned':
      table = params['Embed_1']['embedding']
      x = x + (table[:t] if positions.ndim == 1 else
               jnp.take(table, positions, axis=0)).astype(dt)
    for i in range(self.depth):
      p = params[f'Block_{i}']
      x = x + self._attention(p['Attention_0'],
                              _layer_norm(p['LayerNorm_0'], x), positions,
                              segment_ids)
      y = _layer_norm(p['LayerNorm_1'], x)
      y = jax.nn.gelu(y @ p['Dense_0']['kernel'].astype(dt)
                      + p['Dense_0']['bias'].astype(dt))
      x = x + (y @ p['Dense_1']['kernel'].astype(dt)
               + p['Dense_1']['bias'].astype(dt))
    x = _layer_norm(params['LayerNorm_0'], x)
    if self.tied:
      return x @ params['Embed_0']['embedding'].astype(dt).T
    return (x @ params['Dense_0']['kernel'].astype(dt)
            + params['Dense_0']['bias'].astype(dt))


def transformer(vocab_size: int = 256, width: int = 128, depth: int = 4,
                heads: int = 4, mlp_ratio: int = 4, max_len: int = 256,
                positions: str = 'rotary', tied: bool = True,
                dtype: str = 'float32') -> Transformer:
  """A decoder-only :class:`Transformer` (checked arguments)."""
  vocab_size, width, depth, heads, mlp_ratio, max_len = (
      validation.check_int(f'transformer.{name}', value, low)
      for name, value, low in (('vocab_size', vocab_size, 2),
                               ('width', width, 1), ('depth', depth, 1),
                               ('heads', heads, 1), ('mlp_ratio', mlp_ratio, 1),
                               ('max_len', max_len, 1)))
  validation.check_multiple('transformer.width', width, heads,
                            f'heads={heads}')
  validation.check_choice('transformer.positions', positions,
                          ('learned', 'rotary'))
  if positions == 'rotary' and (width // heads) % 2:
    raise ValueError('rotary positions need an even head width; got'
                     f' width/heads = {width // heads}.')
  validation.check_choice('transformer.dtype', dtype, sorted(_DTYPES))
  return Transformer(vocab_size, width, depth, heads, mlp_ratio, max_len,
                     positions, bool(tied), dtype)
