"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) in plain JAX.

Pre-norm blocks of RMSNorm, grouped-query attention with rotary positions
(``rope_theta``, optionally the Llama-3 frequency scaling) and a SwiGLU MLP;
tied or separate output embedding; optional q/k/v (Qwen2) and output biases;
a computation ``dtype`` and a parameter ``dtype`` (``param_dtype``)::

    >>> import jax, jax.numpy as jnp
    >>> lm = llama(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...            num_layers=2, num_heads=4, num_kv_heads=2)
    >>> variables = lm.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    >>> lm.apply(variables, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 64)
    >>> sorted(variables['params']['layers_0']['self_attn'])
    ['k_proj', 'o_proj', 'q_proj', 'v_proj']

Parameter names follow the Hugging Face modules (``embed_tokens``,
``layers_i/self_attn/q_proj``, ``mlp/gate_proj``, ``input_layernorm``, ...)
with flax's leaf names and layouts: ``kernel`` ``(in, out)`` (the transpose
of torch's ``weight``), ``bias``, ``scale`` for the norms and ``embedding``
for the token table, so :mod:`.hf` maps them one to one. With
``scan_layers=True`` the blocks are one ``layers`` subtree whose leaves have
a leading ``num_layers`` axis, run by ``lax.scan`` (one block compiled).

Attention goes through ``jax.nn.dot_product_attention`` with an explicit
mask: causal, restricted to equal ``segment_ids`` when given (packed
sequences; positions then restart per segment when ``positions`` is
given), and to a ``sliding_window`` (Mistral) when set.

:meth:`Llama.apply_cached` runs tokens against a preallocated key/value
cache (:meth:`Llama.init_cache`) for sampling (:mod:`.sampling`).
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gintrain.runner import validation

__all__ = ['Llama', 'llama', 'REMAT_POLICIES']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}

# gin name -> jax.checkpoint policy; 'none' runs without remat, 'full'
# saves nothing (every activation of a block is recomputed).
REMAT_POLICIES = ('none', 'full', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable', 'nothing_saveable',
                  'everything_saveable', 'checkpoint_dots',
                  'checkpoint_dots_with_no_batch_dims')

_LLAMA3_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor',
                'original_max_position_embeddings')


def rope_frequencies(head_dim: int, theta: float,
                     scaling: tuple | None = None) -> jax.Array:
  """The ``head_dim // 2`` inverse frequencies of rotary positions, with the
  Llama-3 scaling when ``scaling`` (pairs of ``rope_scaling`` entries) has
  ``rope_type='llama3'``."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                         / head_dim))
  if not scaling:
    return inv
  s = dict(scaling)
  if s.get('rope_type', 'default') == 'default':
    return inv
  factor = float(s['factor'])
  low, high = float(s['low_freq_factor']), float(s['high_freq_factor'])
  old = float(s['original_max_position_embeddings'])
  low_wavelen, high_wavelen = old / low, old / high
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def _rotate(x, cos, sin):
  """Rotary embedding of ``x`` ``(B, T, heads, D)`` (the half-split
  convention of the Hugging Face Llama); cos/sin ``(B, T, 1, D)``."""
  d = x.shape[-1] // 2
  x1, x2 = x[..., :d], x[..., d:]
  rotated = jnp.concatenate([-x2, x1], -1)
  return x * cos + rotated * sin


def _rms_norm(p, x, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
  return p['scale'].astype(x.dtype) * y.astype(x.dtype)


def _dense(p, x):
  y = x @ p['kernel'].astype(x.dtype)
  if 'bias' in p:
    y = y + p['bias'].astype(x.dtype)
  return y


@dataclasses.dataclass(frozen=True)
class Llama:
  """The model; build it with :func:`llama` (see there for the fields)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rope_scaling: tuple | None
  rms_norm_eps: float
  tied: bool
  qkv_bias: bool
  out_bias: bool
  mlp_bias: bool
  sliding_window: int | None
  max_len: int
  dtype: str
  param_dtype: str
  remat: str
  scan_layers: bool
  init_std: float

  @property
  def name(self) -> str:
    return (f'llama(hidden_size={self.hidden_size},'
            f' num_layers={self.num_layers}, num_heads={self.num_heads},'
            f' num_kv_heads={self.num_kv_heads}, dtype={self.dtype!r})')

  # -- parameters ---------------------------------------------------------

  def _layer_init(self, key) -> dict:
    h, n, k, d, i = (self.hidden_size, self.num_heads, self.num_kv_heads,
                     self.head_dim, self.intermediate_size)
    keys = iter(jax.random.split(key, 7))
    std = self.init_std
    out_std = std / math.sqrt(2 * self.num_layers)

    def dense(shape, s, bias):
      p = {'kernel': jax.random.normal(next(keys), shape, jnp.float32) * s}
      if bias:
        p['bias'] = jnp.zeros(shape[-1:], jnp.float32)
      return p
    return {
        'input_layernorm': {'scale': jnp.ones((h,), jnp.float32)},
        'self_attn': {
            'q_proj': dense((h, n * d), std, self.qkv_bias),
            'k_proj': dense((h, k * d), std, self.qkv_bias),
            'v_proj': dense((h, k * d), std, self.qkv_bias),
            'o_proj': dense((n * d, h), out_std, self.out_bias)},
        'post_attention_layernorm': {'scale': jnp.ones((h,), jnp.float32)},
        'mlp': {'gate_proj': dense((h, i), std, self.mlp_bias),
                'up_proj': dense((h, i), std, self.mlp_bias),
                'down_proj': dense((i, h), out_std, self.mlp_bias)}}

  def init(self, rng, x=None) -> dict:
    """Fresh ``{'params': ...}`` (normal ``init_std`` kernels and
    embedding, residual projections scaled by ``1/sqrt(2 num_layers)``,
    unit norms, zero biases); ``x`` is not used. Compiled once per model
    (eager, the many small random draws are slow)."""
    del x
    return _jit_init(self, rng)

  def _init(self, rng) -> dict:
    k_embed, k_head, k_layers = jax.random.split(rng, 3)
    layer_keys = jax.random.split(k_layers, self.num_layers)
    params = {'embed_tokens': {'embedding': jax.random.normal(
        k_embed, (self.vocab_size, self.hidden_size), jnp.float32)
                               * self.init_std}}
    layers = [self._layer_init(k) for k in layer_keys]
    if self.scan_layers:
      params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
      for i, layer in enumerate(layers):
        params[f'layers_{i}'] = layer
    params['norm'] = {'scale': jnp.ones((self.hidden_size,), jnp.float32)}
    if not self.tied:
      params['lm_head'] = {'kernel': jax.random.normal(
          k_head, (self.hidden_size, self.vocab_size), jnp.float32)
                           * self.init_std}
    pdt = _DTYPES[self.param_dtype]
    return {'params': jax.tree.map(lambda a: a.astype(pdt), params)}

  def layer_params(self, params) -> list:
    """The per-block parameter dicts (unstacked when scanned)."""
    if self.scan_layers:
      return [jax.tree.map(lambda a, i=i: a[i], params['layers'])
              for i in range(self.num_layers)]
    return [params[f'layers_{i}'] for i in range(self.num_layers)]

  def with_layers(self, params, layers: list) -> dict:
    """``params`` with its blocks replaced by ``layers`` (per-block dicts),
    stacked when scanned."""
    out = {k: v for k, v in params.items()
           if k != 'layers' and not k.startswith('layers_')}
    if self.scan_layers:
      out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
      for i, layer in enumerate(layers):
        out[f'layers_{i}'] = layer
    return out

  # -- forward --------------------------------------------------------------

  def _rope(self, positions, dt):
    inv = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    angle = positions.astype(jnp.float32)[..., None] * inv  # (B, T, D/2)
    angle = jnp.concatenate([angle, angle], -1)[:, :, None, :]
    return jnp.cos(angle).astype(dt), jnp.sin(angle).astype(dt)

  def _attention(self, p, x, rope, mask, cache, index):
    b, t, _ = x.shape
    n, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    q = _dense(p['q_proj'], x).reshape(b, t, n, d)
    key = _dense(p['k_proj'], x).reshape(b, t, k, d)
    value = _dense(p['v_proj'], x).reshape(b, t, k, d)
    cos, sin = rope
    q, key = _rotate(q, cos, sin), _rotate(key, cos, sin)
    new_cache = None
    if cache is not None:
      ck, cv = cache
      key = lax.dynamic_update_slice(ck, key.astype(ck.dtype),
                                     (0, index, 0, 0))
      value = lax.dynamic_update_slice(cv, value.astype(cv.dtype),
                                       (0, index, 0, 0))
      new_cache = (key, value)
      key, value = key.astype(x.dtype), value.astype(x.dtype)
    out = jax.nn.dot_product_attention(q, key, value, mask=mask,
                                       scale=1.0 / math.sqrt(d))
    return _dense(p['o_proj'], out.reshape(b, t, n * d)), new_cache

  def _block(self, p, x, rope, mask, cache=None, index=None):
    eps = self.rms_norm_eps
    attn, new_cache = self._attention(
        p['self_attn'], _rms_norm(p['input_layernorm'], x, eps), rope, mask,
        cache, index)
    x = x + attn
    y = _rms_norm(p['post_attention_layernorm'], x, eps)
    m = p['mlp']
    y = jax.nn.silu(_dense(m['gate_proj'], y)) * _dense(m['up_proj'], y)
    return x + _dense(m['down_proj'], y), new_cache

  def _block_fn(self):
    if self.remat == 'none':
      return self._block
    policy = (None if self.remat == 'full'
              else getattr(jax.checkpoint_policies, self.remat))
    return jax.checkpoint(self._block, policy=policy)

  def _mask(self, q_index, k_index, segment_ids=None):
    """``(B or 1, 1, T, S)`` booleans: causal (by index), within a window,
    within a segment."""
    mask = q_index[..., :, None] >= k_index[..., None, :]
    if self.sliding_window:
      mask &= q_index[..., :, None] - k_index[..., None, :] < (
          self.sliding_window)
    if mask.ndim == 2:
      mask = mask[None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask[:, None]

  def _run(self, params, tokens, positions, mask, cache=None, index=None):
    dt = _DTYPES[self.dtype]
    x = jnp.take(params['embed_tokens']['embedding'], tokens,
                 axis=0).astype(dt)
    rope = self._rope(positions, dt)
    block = self._block_fn()
    new_cache = None
    if self.scan_layers:
      if cache is None:
        def body(h, p):
          return block(p, h, rope, mask)[0], None
        x, _ = lax.scan(body, x, params['layers'])
      else:
        def body_c(h, xs):
          p, ck, cv = xs
          h, (ck, cv) = block(p, h, rope, mask, (ck, cv), index)
          return h, (ck, cv)
        x, (ks, vs) = lax.scan(body_c, x, (params['layers'], cache['k'],
                                           cache['v']))
        new_cache = {'k': ks, 'v': vs}
    else:
      ks, vs = [], []
      for i in range(self.num_layers):
        layer_cache = None if cache is None else (cache['k'][i],
                                                  cache['v'][i])
        x, c = block(params[f'layers_{i}'], x, rope, mask, layer_cache,
                     index)
        if c is not None:
          ks.append(c[0])
          vs.append(c[1])
      if cache is not None:
        new_cache = {'k': jnp.stack(ks), 'v': jnp.stack(vs)}
    x = _rms_norm(params['norm'], x, self.rms_norm_eps)
    if self.tied:
      logits = x @ params['embed_tokens']['embedding'].astype(dt).T
    else:
      logits = x @ params['lm_head']['kernel'].astype(dt)
    return logits, new_cache

  def apply(self, variables, tokens, segment_ids=None,
            positions=None) -> jax.Array:
    """Logits ``(batch, time, vocab)`` for int ``tokens`` ``(batch,
    time)``. ``segment_ids`` (same shape) keeps attention within a packed
    sequence; ``positions`` (same shape) are the rotary positions (default
    ``0 .. time-1``)."""
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    index = jnp.arange(t)
    mask = self._mask(index, index, segment_ids)
    return self._run(variables['params'], tokens, positions, mask)[0]

  # -- cached decoding ------------------------------------------------------

  def init_cache(self, batch: int, length: int, dtype=None) -> dict:
    """A zero key/value cache ``{'k','v'}`` of ``(num_layers, batch,
    length, num_kv_heads, head_dim)`` in the computation dtype."""
    shape = (self.num_layers, batch, length, self.num_kv_heads,
             self.head_dim)
    dt = dtype or _DTYPES[self.dtype]
    return {'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt)}

  def apply_cached(self, params, tokens, cache: dict,
                   index) -> tuple[jax.Array, dict]:
    """``(logits, new cache)`` of ``tokens`` ``(batch, time)`` placed at
    positions ``index .. index+time-1`` (a scalar) of ``cache``; each
    attends to the cache's entries before it and to itself."""
    b, t = tokens.shape
    s = cache['k'].shape[2]
    q_index = index + jnp.arange(t)
    positions = jnp.broadcast_to(q_index, (b, t))
    mask = self._mask(q_index, jnp.arange(s))
    return self._run(params, tokens, positions, mask, cache, index)

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token at sequence length ``seq_len``: ``2`` per
    multiply-add of every matmul (q/k/v/o, gate/up/down, the output
    layer; the embedding lookup is free), plus attention's ``QK^T`` and
    ``AV``, ``2 * 2 * seq_len * heads * head_dim`` per layer, halved for
    the causal mask; times 3 for training (backward = 2 forwards).
    Remat recomputation is not counted (model FLOPs, not hardware)."""
    h, i = self.hidden_size, self.intermediate_size
    nd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    matmul = self.num_layers * (2 * h * nd + 2 * h * kd + 3 * h * i)
    matmul += h * self.vocab_size
    attention = self.num_layers * 2 * seq_len * nd  # 4 T nd / 2 (causal)
    forward = 2 * matmul + attention
    return float(3 * forward if training else forward)

  def num_params(self) -> int:
    """Parameter count."""
    h, i = self.hidden_size, self.intermediate_size
    nd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    layer = (2 * h + h * nd + 2 * h * kd + nd * h + 3 * h * i
             + (nd + 2 * kd if self.qkv_bias else 0)
             + (h if self.out_bias else 0)
             + (2 * i + h if self.mlp_bias else 0))
    head = 0 if self.tied else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * layer + h + head


_jit_init = jax.jit(Llama._init, static_argnums=0)  # pylint: disable=protected-access


def _heads(hidden_size, num_heads, num_kv_heads, head_dim) -> tuple:
  """``(num_kv_heads, head_dim)``, checked, with their defaults."""
  num_kv_heads = validation.check_int(
      'llama.num_kv_heads', num_heads if num_kv_heads is None else
      num_kv_heads, 1)
  validation.check_multiple('llama.num_heads', num_heads, num_kv_heads,
                            f'num_kv_heads={num_kv_heads}')
  if head_dim is None:
    validation.check_multiple('llama.hidden_size', hidden_size, num_heads,
                              f'num_heads={num_heads} (or set head_dim)')
    head_dim = hidden_size // num_heads
  head_dim = validation.check_int('llama.head_dim', head_dim, 2)
  if head_dim % 2:
    raise ValueError(f'llama.head_dim={head_dim} must be even (rotary).')
  return num_kv_heads, head_dim


def _rope_scaling(rope_scaling: dict | None) -> tuple | None:
  """The ``rope_scaling`` dict as the model keeps it (a sorted tuple of
  pairs, None for the default frequencies), checked."""
  if not rope_scaling:
    return None
  rope_scaling = dict(rope_scaling)
  kind = rope_scaling.get('rope_type', rope_scaling.get('type', 'default'))
  if kind == 'default':
    return None
  if kind != 'llama3':
    raise ValueError(f"llama.rope_scaling: rope_type {kind!r} is not"
                     " supported ('default' or 'llama3').")
  missing = [k for k in _LLAMA3_KEYS if k not in rope_scaling]
  if missing:
    raise ValueError(f'llama.rope_scaling of rope_type llama3 needs'
                     f' {", ".join(missing)}.')
  return (('rope_type', 'llama3'),) + tuple(
      (k, float(rope_scaling[k])) for k in _LLAMA3_KEYS)


def llama(vocab_size: int = 256, hidden_size: int = 128,
          intermediate_size: int = 352, num_layers: int = 4,
          num_heads: int = 4, num_kv_heads: int | None = None,
          head_dim: int | None = None, rope_theta: float = 10000.0,
          rope_scaling: dict | None = None, rms_norm_eps: float = 1e-5,
          tied: bool = False, qkv_bias: bool = False, out_bias: bool = False,
          mlp_bias: bool = False, sliding_window: int | None = None,
          max_len: int = 4096, dtype: str = 'float32',
          param_dtype: str = 'float32', remat: str = 'none',
          scan_layers: bool = False, init_std: float = 0.02) -> Llama:
  """A Llama-family decoder (checked arguments).

  Args:
    vocab_size: tokens are ``0 .. vocab_size - 1``.
    hidden_size: the residual stream width.
    intermediate_size: the SwiGLU MLP's hidden width.
    num_layers: the number of blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (a divisor of ``num_heads``; 1 is
      multi-query; default ``num_heads``).
    head_dim: per-head width (default ``hidden_size // num_heads``).
    rope_theta: the rotary base.
    rope_scaling: ``None`` or the Hugging Face ``rope_scaling`` dict;
      ``{'rope_type': 'llama3', 'factor', 'low_freq_factor',
      'high_freq_factor', 'original_max_position_embeddings'}`` is the
      Llama-3 frequency scaling.
    rms_norm_eps: the RMSNorm epsilon.
    tied: the output layer reuses the token embedding.
    qkv_bias: biases on q/k/v (Qwen2); out_bias on the output projection;
      mlp_bias on the MLP's three projections.
    sliding_window: attend to at most this many latest tokens (Mistral).
    max_len: the longest sequence (recorded in exported configs).
    dtype: the computation dtype name; param_dtype the parameters'.
    remat: one of :data:`REMAT_POLICIES` (``jax.checkpoint`` around each
      block with that ``jax.checkpoint_policies`` policy).
    scan_layers: one stacked ``layers`` subtree run by ``lax.scan``.
    init_std: the normal init's standard deviation.
  """
  vocab_size, hidden_size, intermediate_size, num_layers, num_heads, \
      max_len = (validation.check_int(f'llama.{name}', value, low)
                 for name, value, low in (
                     ('vocab_size', vocab_size, 2),
                     ('hidden_size', hidden_size, 1),
                     ('intermediate_size', intermediate_size, 1),
                     ('num_layers', num_layers, 1),
                     ('num_heads', num_heads, 1),
                     ('max_len', max_len, 1)))
  num_kv_heads, head_dim = _heads(hidden_size, num_heads, num_kv_heads,
                                  head_dim)
  scaling = _rope_scaling(rope_scaling)
  sliding_window = validation.check_int('llama.sliding_window',
                                        sliding_window, 1, allow_none=True)
  for name, value in (('dtype', dtype), ('param_dtype', param_dtype)):
    validation.check_choice(f'llama.{name}', value, sorted(_DTYPES))
  validation.check_choice('llama.remat', remat, REMAT_POLICIES)
  return Llama(vocab_size, hidden_size, intermediate_size, num_layers,
               num_heads, num_kv_heads, head_dim, float(rope_theta), scaling,
               float(rms_norm_eps), bool(tied), bool(qkv_bias),
               bool(out_bias), bool(mlp_bias), sliding_window, max_len, dtype,
               param_dtype, remat, bool(scan_layers), float(init_std))


def config_of(model: Llama) -> dict[str, Any]:
  """The :func:`llama` arguments that rebuild ``model``."""
  out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
  out['rope_scaling'] = dict(model.rope_scaling) if model.rope_scaling else None
  return out
