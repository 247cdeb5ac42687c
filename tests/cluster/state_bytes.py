"""Bytes of the train state on each device, as the runner creates it.

  python state_bytes.py GIN_FILE     # with 4 virtual CPU devices

Builds the run of GIN_FILE twice (``partitioner.rules`` 'fsdp' and
'replicated'), creates the train state with the partitioner
(``jax.jit(init, out_shardings=...)``), and prints one JSON line:
``{"fsdp": [bytes on device 0, 1, ...], "replicated": [...]}`` summed over
the live buffers of the state's arrays (tests/test_sharding.py).
"""

import json
import sys

import jax

from gintrain.runner.cli import config
from gintrain.runner.cli import configurables
from gintrain.runner.training import assembly


def per_device_bytes(rules):
  config.parse([sys.argv[1]], [f'partitioner.rules = {rules!r}'])
  config.finalize()
  run = assembly.build(configurables.train())
  state = run.partitioner.create_state(assembly.state_maker(run))
  totals = {d: 0 for d in jax.devices()}
  for leaf in jax.tree_util.tree_leaves(state):
    for shard in leaf.addressable_shards:
      totals[shard.device] += shard.data.nbytes
  return [totals[d] for d in jax.devices()]


if __name__ == '__main__':
  print(json.dumps({'fsdp': per_device_bytes('fsdp'),
                    'replicated': per_device_bytes('replicated')}))
