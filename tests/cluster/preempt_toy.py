"""A toy multi-process loop for tests of runner.preemption/runner.distributed.

Each step runs a cross-process collective (a jitted sum over a global array),
then asks ``preemption.should_stop(step)``. Prints ``step N`` lines and, when
stopping, ``STOP <step>`` and exits with ``PREEMPTED_EXIT_CODE``; at the end
``DONE <steps> <sum>``. First it prints ``GATHER p0,p1`` (``all_gather``)
and, with ``--resume_steps``, ``AGREED <step>`` or ``DISAGREE <error>``
(then exit status 3).

  python preempt_toy.py --steps=30 --self_signal_at=7 --self_signal_process=1 \
      [--coordinator_address=... --process_count=... --process_index=...]
"""

import os
import signal
import sys
import time

from absl import app
from absl import flags

from gintrain.runner.parallel import distributed
from gintrain.runner.parallel import preemption

_STEPS = flags.DEFINE_integer('steps', 30, 'Steps to run.')
_SLEEP = flags.DEFINE_float('step_sleep', 0.0, 'Seconds to sleep per step.')
_SIGNAL_AT = flags.DEFINE_integer(
    'self_signal_at', -1, 'Step during which one process signals itself.')
_SIGNAL_PROCESS = flags.DEFINE_integer(
    'self_signal_process', 1, 'Which process signals itself.')
_SIGNAL = flags.DEFINE_enum('self_signal', 'USR1', ['USR1', 'TERM'],
                            'Signal sent.')
_AT_STARTUP = flags.DEFINE_bool(
    'signal_at_startup', False, 'The signalling process sends its signal'
    ' right after distributed.initialize(), before the loop installs the'
    ' handler (it must not be lost).')
_RESUME_STEPS = flags.DEFINE_list(
    'resume_steps', [], 'Per process: the step passed to agree_on_step'
    ' ("none" for None); empty: skip.')


def main(argv):
  del argv
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  if _AT_STARTUP.value and jax.process_index() == _SIGNAL_PROCESS.value:
    os.kill(os.getpid(), getattr(signal, 'SIG' + _SIGNAL.value))
    time.sleep(0.5)  # let the handler run before anything else
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  preemption.install()
  pid = jax.process_index()
  print('GATHER ' + ','.join(distributed.all_gather('hello', f'p{pid}')),
        flush=True)
  if _RESUME_STEPS.value:
    mine = _RESUME_STEPS.value[pid]
    try:
      agreed = distributed.agree_on_step(
          'resume_step', None if mine == 'none' else int(mine))
    except distributed.DistributedConfigError as e:
      print(f'DISAGREE {e}', flush=True)
      sys.exit(3)
    print(f'AGREED {agreed}', flush=True)
  mesh = Mesh(np.array(jax.devices()), ('d',))
  sharding = NamedSharding(mesh, P('d'))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
  acc = 0.0
  for step in range(_STEPS.value):
    if preemption.should_stop(step):
      print(f'STOP {step} local={preemption.requested()}', flush=True)
      sys.exit(preemption.PREEMPTED_EXIT_CODE)
    local = np.full((jax.local_device_count(),), step + pid, np.float32)
    x = jax.make_array_from_process_local_data(sharding, local,
                                               (jax.device_count(),))
    acc += float(total(x))
    print(f'step {step}', flush=True)
    if step == _SIGNAL_AT.value and pid == _SIGNAL_PROCESS.value:
      os.kill(os.getpid(), getattr(signal, 'SIG' + _SIGNAL.value))
    time.sleep(_SLEEP.value)
  print(f'DONE {_STEPS.value} {acc}', flush=True)


if __name__ == '__main__':
  app.run(main)
