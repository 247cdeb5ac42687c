"""Frozen parameters (``train.trainable``): small checkpoints of what trains.

With ``train.trainable`` (regular expressions, ``re.search`` on '/'-joined
parameter paths such as ``layers_0/self_attn/q_proj/lora_a``) only the
matching parameters train. The others (the frozen base):

* get no optimizer state (``optax.multi_transform`` with ``set_to_zero``:
  ``--dry_run``'s state bytes shrink by the optimizer's slots of the base);
* stay out of the checkpoints: the train state is a :class:`FrozenTrainState`
  whose state dict holds the trainable parameters, the optimizer state and
  ``base_hash``, a 64-bit fingerprint of the frozen parameters computed on
  the devices (:func:`fingerprint`). So a LoRA checkpoint holds the adapters
  and a reference to the base: the base itself is what the run started from
  (``--init_from``, recorded in the run's ``settings.json``, or the seed's
  initialisation), rebuilt on resume and by ``gintrain sample`` / ``ckpt
  convert --to=hf``, and checked against the hash: a base that is missing
  or differs is one ``gintrain: error:`` line.

LoRA (``runner.models.lora``) in gin::

    train.model = @models.lora()
    lora.model = @models.llama()
    lora.rank = 8
    lora.alpha = 16.0
    lora.targets = ['q_proj', 'v_proj']
    train.trainable = ['lora_']

    >>> check_patterns(['lora_', '('])
    Traceback (most recent call last):
    ...
    gintrain.runner.validation.ArgumentError: train.trainable: '(' is not a regular expression (missing ), unterminated subpattern at position 0).
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gintrain.lib import serialization
from gintrain.lib import struct
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.training import state as state_lib

__all__ = ['FrozenTrainState', 'check_patterns', 'is_trainable',
           'mask_optimizer', 'freeze', 'fingerprint', 'rehash', 'has_frozen',
           'merge_params', 'check_base', 'hash_hex']


def check_patterns(patterns) -> tuple[str, ...]:
  """``train.trainable`` as a tuple of compiled-checked expressions.

  Raises:
    ArgumentError: not a list of strings, or a bad regular expression.
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  if not isinstance(patterns, (list, tuple)) or not patterns or not all(
      isinstance(p, str) for p in patterns):
    validation.fail('train.trainable', 'a non-empty list of regular'
                    " expressions on parameter paths (e.g. ['lora_'])",
                    patterns)
  validation.check_regex_list('train.trainable', patterns)
  return tuple(patterns)


def _path(keys) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k)))
                  for k in keys)


def is_trainable(patterns) -> Any:
  """``path -> bool`` for '/'-joined parameter paths."""
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(r.search(path) for r in compiled)


def _labels(patterns):
  test = is_trainable(patterns)
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda keys, _: 'train' if test(_path(keys)) else 'freeze', params)


def mask_optimizer(tx: optax.GradientTransformation, patterns
                   ) -> optax.GradientTransformation:
  """``tx`` on the trainable parameters; the frozen ones get zero updates
  and no state."""
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()},
                               _labels(patterns))


def _bits(x) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).ravel()
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _mix(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def fingerprint(leaves) -> jax.Array:
  """A 64-bit fingerprint (``uint32[2]``) of the bits of ``leaves`` (a
  list of arrays), each element mixed with its position and its leaf's
  index, summed; jittable, so sharded arrays are hashed where they are."""
  out = jnp.zeros((2,), jnp.uint32)
  for i, leaf in enumerate(leaves):
    b = _bits(leaf)
    idx = jnp.arange(b.size, dtype=jnp.uint32)
    seed = jnp.uint32((i * 0x9E3779B1 + 1) & 0xFFFFFFFF)
    one = _mix(b ^ _mix(idx + seed))
    two = _mix(b + _mix(idx * jnp.uint32(0x27D4EB2F) ^ ~seed))
    size = jnp.uint32(b.size & 0xFFFFFFFF)
    out = out + jnp.stack([jnp.sum(one, dtype=jnp.uint32) ^ size,
                           jnp.sum(two, dtype=jnp.uint32)])
  return out


def hash_hex(value) -> str:
  """``base_hash`` as 16 hex digits."""
  a, b = (int(v) for v in np.asarray(jax.device_get(value)).ravel())
  return f'{a:08x}{b:08x}'


def _frozen_leaves(params, patterns) -> list:
  test = is_trainable(patterns)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [x for keys, x in flat if not test(_path(keys))]


class FrozenTrainState(state_lib.TrainState):
  """A train state with frozen parameters (see the module doc).

  Attributes:
    trainable: the ``train.trainable`` expressions (static).
    base_hash: :func:`fingerprint` of the frozen parameters.
  """
  trainable: tuple = struct.field(pytree_node=False, default=())
  base_hash: Any = None


def has_frozen(state) -> bool:
  return isinstance(state, FrozenTrainState)


def freeze(state: state_lib.TrainState, patterns) -> FrozenTrainState:
  """``state`` (the default factory's, optimizer state from ``mask_
  optimizer``'s ``tx``) as a :class:`FrozenTrainState` with its hash.

  Raises:
    RunnerError: the patterns match no parameter, or all of them, or the
      state is not the default factory's.
  """
  if type(state) is not state_lib.TrainState:  # pylint: disable=unidiomatic-typecheck
    raise RunnerError('train.trainable needs the default train.state_factory'
                      f' (runner.create_train_state); got a'
                      f' {type(state).__name__}.')
  test = is_trainable(patterns)
  paths = [_path(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(state.params)[0]]
  chosen = sum(map(test, paths))
  if not chosen or chosen == len(paths):
    raise RunnerError(f'train.trainable {list(patterns)} matches'
                      f' {"no" if not chosen else "every"} parameter of the'
                      f' model (paths such as {paths[0]!r}).')
  return FrozenTrainState(
      step=state.step, apply_fn=state.apply_fn, params=state.params,
      tx=state.tx, opt_state=state.opt_state, model_state=state.model_state,
      trainable=tuple(patterns),
      base_hash=fingerprint(_frozen_leaves(state.params, patterns)))


def rehash(state):
  """``state`` with ``base_hash`` of its current frozen parameters (after
  ``--init_from`` replaced them); other states as they are."""
  if not has_frozen(state):
    return state
  return state.replace(base_hash=jax.jit(fingerprint)(
      _frozen_leaves(state.params, state.trainable)))


def _filter(tree, test, prefix=''):
  """The state dict ``tree`` with only the leaves whose path passes."""
  if not isinstance(tree, dict):
    return tree if test(prefix) else None
  out = {}
  for k, v in tree.items():
    sub = _filter(v, test, f'{prefix}/{k}' if prefix else str(k))
    if sub is not None and not (isinstance(sub, dict) and not sub):
      out[k] = sub
  return out


def merge_params(full: dict, part: dict) -> dict:
  """State dict ``full`` with the leaves of ``part`` (a subtree) put in."""
  out = dict(full)
  for k, v in part.items():
    out[k] = merge_params(full[k], v) if isinstance(v, dict) and isinstance(
        full.get(k), dict) else v
  return out


def _to_state_dict(x: FrozenTrainState) -> dict:
  params = serialization.to_state_dict(x.params)
  return {'step': serialization.to_state_dict(x.step),
          'params': _filter(params, is_trainable(x.trainable)),
          'opt_state': serialization.to_state_dict(x.opt_state),
          'model_state': serialization.to_state_dict(x.model_state),
          'base_hash': serialization.to_state_dict(x.base_hash)}


def check_base(want, have, what: str = 'this checkpoint') -> None:
  """Raises when the checkpoint's base hash ``want`` is not ``have``."""
  if hash_hex(want) != hash_hex(have):
    raise RunnerError(
        f'{what} holds only the trainable parameters (train.trainable) of a'
        f' base whose hash is {hash_hex(want)}, but the base here hashes to'
        f' {hash_hex(have)}: give the --init_from (and train.seed) the run'
        ' started from.')


def _from_state_dict(target: FrozenTrainState, state) -> FrozenTrainState:
  serialization.expect_state_dict(state, target)
  state = dict(state)
  have = target.base_hash
  if 'base_hash' in state and isinstance(have, (jax.Array, np.ndarray)):
    check_base(state['base_hash'], have)
  full = serialization.to_state_dict(target.params)
  if isinstance(state.get('params'), dict):
    state['params'] = merge_params(full, state['params'])
  plain = {k: getattr(target, k) for k in
           ('step', 'params', 'opt_state', 'model_state', 'base_hash')}
  updates = {}
  for name, value in plain.items():
    if name not in state:
      raise ValueError(f'Missing field {name} in state dict while restoring'
                       ' a FrozenTrainState at path'
                       f' {serialization.current_path()}')
    updates[name] = serialization.from_state_dict(value, state.pop(name),
                                                  name=name)
  if state:
    raise ValueError(f'Unknown field(s) "{",".join(state)}" in state dict'
                     ' while restoring a FrozenTrainState at path'
                     f' {serialization.current_path()}')
  return target.replace(**updates)


serialization.register_serialization_state(
    FrozenTrainState, _to_state_dict, _from_state_dict, override=True)

