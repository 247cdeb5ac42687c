"""One process of tests/test_hf.py's 2-process FSDP load.

    python hf_mp_worker.py PORT PROCESS_ID HF_FOLDER OUT.npz

Joins a 2-process ``jax.distributed`` job (2 CPU devices each), loads the
Hugging Face folder with ``hf.load`` into FSDP shardings over the 4 devices
(each process reads only its slices), and saves its addressable shards
(``path|index`` -> array) and the slices its callbacks were asked for.
"""

import sys

import jax
import numpy as np


def main():
  port, pid, folder, out = sys.argv[1:5]
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                             process_id=int(pid))
  from gintrain.runner.models import hf  # pylint: disable=g-import-not-at-top
  from gintrain.runner.parallel import rules  # pylint: disable=g-import-not-at-top
  cfg_model = hf.model_from_config(hf._read_config(folder))  # pylint: disable=protected-access
  shapes = jax.eval_shape(lambda: cfg_model.init(jax.random.key(0)))['params']
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  specs = rules.tree_specs(shapes, rules.resolve('fsdp'), {'data': 4})
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                           specs)
  model, params = hf.load(folder, shardings=shardings)
  del model
  saved = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = rules.path_of(keys)
    for shard in leaf.addressable_shards:
      index = ','.join(f'{s.start}:{s.stop}' for s in shard.index)
      saved[f'{path}|{index}'] = np.asarray(shard.data)
  np.savez(out, **saved)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
