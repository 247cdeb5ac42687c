"""Sampling from a :class:`~.llama.Llama` with a key/value cache.

:func:`generate` compiles one function per (model, shapes, settings): a
prefill of the whole prompt into a preallocated cache of ``prompt +
max_new_tokens`` positions, then a ``lax.scan`` of decode steps, each
running one token against the cache. :func:`generate_uncached` is the
reference it is tested against: every new token reruns the full forward
pass over the sequence so far (padded to the final length; causal, so the
padding after the current position changes nothing)::

    >>> import jax, numpy as np
    >>> from gintrain.runner.models import llama
    >>> lm = llama.llama(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                  num_layers=1, num_heads=2)
    >>> params = lm.init(jax.random.key(0))['params']
    >>> prompt = np.array([[1, 2, 3]])
    >>> cached = generate(lm, params, prompt, 5)
    >>> bool((cached == generate_uncached(lm, params, prompt, 5)).all())
    True

``temperature=0`` is greedy (argmax); otherwise logits are divided by the
temperature, cut to the ``top_k`` largest (0: all) and to the smallest set
whose probability reaches ``top_p`` (1.0: all), and sampled with
``jax.random.categorical`` from ``seed``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from gintrain.runner import validation

__all__ = ['generate', 'generate_uncached', 'sample_logits']


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Token ids ``(batch,)`` drawn from ``logits`` ``(batch, vocab)``."""
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.sort(logits, -1)[..., ::-1]
    probs = jax.nn.softmax(order, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass of the larger ones
    # The smallest logit still needed to reach top_p (the first always is).
    kept = jnp.where(before < top_p, order, jnp.inf)
    cutoff = jnp.min(kept, -1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _generate(model, params, prompt, max_new, temperature, top_k, top_p,
              key):
  b, p = prompt.shape
  cache = model.init_cache(b, p + max_new)
  logits, cache = model.apply_cached(params, prompt, cache, 0)
  keys = jax.random.split(key, max_new)
  first = sample_logits(logits[:, -1], keys[0], temperature, top_k, top_p)

  def step(carry, xs):
    token, cache = carry
    i, k = xs
    logits, cache = model.apply_cached(params, token[:, None], cache, p + i)
    nxt = sample_logits(logits[:, 0], k, temperature, top_k, top_p)
    return (nxt, cache), nxt
  _, rest = lax.scan(step, (first, cache),
                     (jnp.arange(max_new - 1), keys[1:]))
  return jnp.concatenate([first[:, None], rest.T], 1)


def generate(model, params, prompt, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> jax.Array:
  """``max_new_tokens`` new tokens ``(batch, max_new_tokens)`` after the
  int ``prompt`` ``(batch, length)`` (equal lengths), with the KV cache."""
  prompt = jnp.asarray(prompt, jnp.int32)
  validation.check_int('max_new_tokens', max_new_tokens, 1)
  return _generate(model, params, prompt, int(max_new_tokens),
                   float(temperature), int(top_k), float(top_p),
                   jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _generate_uncached(model, params, prompt, max_new, temperature, top_k,
                       top_p, key):
  b, p = prompt.shape
  tokens = jnp.concatenate(
      [prompt, jnp.zeros((b, max_new), jnp.int32)], 1)
  keys = jax.random.split(key, max_new)

  def step(i, tokens):
    logits = model.apply({'params': params}, tokens)
    last = lax.dynamic_index_in_dim(logits, p + i - 1, 1, keepdims=False)
    nxt = sample_logits(last, keys[i], temperature, top_k, top_p)
    return lax.dynamic_update_slice(tokens, nxt[:, None], (0, p + i))
  return lax.fori_loop(0, max_new, step, tokens)[:, p:]


def generate_uncached(model, params, prompt, max_new_tokens: int,
                      temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0) -> jax.Array:
  """As :func:`generate`, by a full forward pass per new token."""
  prompt = jnp.asarray(prompt, jnp.int32)
  return _generate_uncached(model, params, prompt, int(max_new_tokens),
                            float(temperature), int(top_k), float(top_p),
                            jax.random.key(seed))
