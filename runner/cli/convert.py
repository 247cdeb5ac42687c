"""``gintrain ckpt convert SRC DST``: flax msgpack <-> Orbax, both ways.

A msgpack checkpoint file becomes an Orbax checkpoint directory (written with
``orbax.checkpoint.PyTreeCheckpointer``; ``pip install gintrain[orbax]``),
and an Orbax directory a msgpack file (flax's format, written by
``lib.serialization``). Orbax stores dict keys sorted, while msgpack keeps
them in the order they were written (a flax ``TrainState`` writes ``step,
params, opt_state``); the converter records the msgpack key order in
``<DST>/gintrain_key_order.json`` and uses it on the way back, so msgpack ->
Orbax -> msgpack gives back the very same bytes. Without that file (an
Orbax checkpoint from elsewhere) the keys come out sorted.
"""

import json
import os

from gintrain.lib import checkpoints
from gintrain.lib import orbax_delegation
from gintrain.lib import serialization
from gintrain.runner.errors import RunnerError

__all__ = ['convert', 'KEY_ORDER_FILE']

KEY_ORDER_FILE = 'gintrain_key_order.json'


def _key_order(tree):
  """``[[key, subtree order], ...]`` for nested dicts; None for leaves."""
  if not isinstance(tree, dict):
    return None
  return [[k, _key_order(v)] for k, v in tree.items()]


def _reorder(tree, order):
  if order is None or not isinstance(tree, dict):
    return tree
  out = {}
  for key, sub in order:
    if key in tree:
      out[key] = _reorder(tree[key], sub)
  for key in tree:  # anything the record does not know, at the end
    if key not in out:
      out[key] = tree[key]
  return out


def convert(src: str, dst: str) -> str:
  """Converts ``src`` (msgpack file or Orbax directory) into ``dst`` in the
  other format; returns ``'orbax'`` or ``'msgpack'`` (what was written).

  Raises:
    RunnerError: ``src`` is missing or unreadable, or ``dst`` exists.
  """
  if not os.path.exists(src):
    raise RunnerError(f'convert: {src}: no such file or directory.')
  if os.path.exists(dst):
    raise RunnerError(f'convert: {dst} exists; choose a new destination.')
  try:
    if orbax_delegation.is_orbax_checkpoint(src):
      tree = orbax_delegation.restore_with_orbax(src, None)
      order_file = os.path.join(src, KEY_ORDER_FILE)
      if os.path.isfile(order_file):
        with open(order_file, encoding='utf-8') as f:
          tree = _reorder(tree, json.load(f))
      data = serialization.msgpack_serialize(tree, in_place=True)
      with open(dst + '.tmp', 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(dst + '.tmp', dst)
      return 'msgpack'
    tree = checkpoints.restore_checkpoint(src, target=None)
    ocp = orbax_delegation.import_orbax()
    orbax_delegation.save_with_orbax(dst, tree, ocp.PyTreeCheckpointer())
    with open(os.path.join(dst, KEY_ORDER_FILE), 'w', encoding='utf-8') as f:
      json.dump(_key_order(tree), f)
    return 'orbax'
  except (OSError, ValueError, ImportError) as e:
    raise RunnerError(f'convert {src} -> {dst}: {e}') from e
