"""Parallel runs: memory per device, the agreed stop signal, the watchdog's
GIL-free backstop (issue 26, item 3).

* ``Sharded.describe``'s bytes per device equal the bytes of the shard
  jax places on a device, for arrays split over one axis, over two axes in
  one dimension (``('data', 'model')``) and over two dimensions.
* ``preemption.stop_signal`` on 2 real processes (jax.distributed on
  127.0.0.1) where the processes received different signals: a SIGTERM (or
  SIGUSR1) anywhere wins over a SIGINT elsewhere (exit 75, requeue), SIGINT
  only where nothing else arrived (exit 130).
* A watchdog whose beat came, in a process whose main thread then holds the
  GIL in C code (so no Python thread runs), still ends the process: the
  ``faulthandler`` backstop armed by ``beat`` dumps the stacks and exits.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                'cluster'))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

from gintrain.runner.parallel import partitioners  # pylint: disable=g-import-not-at-top,wrong-import-position


# --- the watchdog's backstop -----------------------------------------------------

_HOLD_GIL = textwrap.dedent('''
    import re, sys, time
    from gintrain.runner.parallel import watchdog
    dog = watchdog.Watchdog(float(sys.argv[1]))
    dog.beat(1)
    print('beat', flush=True)
    # Exponential backtracking inside the C regex engine, which never
    # releases the GIL: no Python thread (the watchdog's) runs again.
    re.match(r'(a|aa)*c', 'a' * 64)
    print('not reached', flush=True)
''')


def test_backstop_ends_a_process_that_holds_the_gil(tmp_path):
  timeout_s = 0.5
  start = time.monotonic()
  # Expected to end 2 * 0.5 + 5 = 6 s after the beat.
  proc = subprocess.run(
      [sys.executable, '-c', _HOLD_GIL, str(timeout_s)],
      env=harness.env(), capture_output=True, text=True, timeout=18,
      check=False)
  elapsed = time.monotonic() - start
  assert proc.stdout.splitlines() == ['beat'], proc.stdout + proc.stderr
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  # faulthandler's dump: the stuck main thread, inside the regex.
  assert 'Timeout (0:00:' in proc.stderr, proc.stderr[-2000:]
  assert 'Thread' in proc.stderr and 're' in proc.stderr
  # Armed for twice the timeout (+5 s): it fires then, not at once.
  assert 2 * timeout_s < elapsed < 18
  del tmp_path


# --- bytes per device ------------------------------------------------------------


def test_bytes_per_device_match_the_placed_shards():
  assert jax.device_count() == 8
  p = partitioners.Sharded({'data': 4, 'model': 2}, rules=[
      ('both', (('data', 'model'), None)),
      ('two_dims', ('data', 'model')),
      ('model_only', (None, 'model')),
      ('data_only', ('data',)),
  ])
  tree = {'both': jnp.zeros((16, 3), jnp.float32),
          'two_dims': jnp.zeros((8, 6), jnp.float32),
          'model_only': jnp.zeros((5, 4), jnp.bfloat16),
          'data_only': jnp.zeros((12,), jnp.int32),
          'whole': jnp.zeros((3, 3), jnp.float32)}
  described = p.describe(jax.eval_shape(lambda: tree))
  rows = {r['path']: r for r in described['arrays']}
  shardings = p.shardings(tree)
  want = {}
  for name, x in tree.items():
    placed = jax.device_put(x, shardings[name])
    want[name] = placed.addressable_shards[0].data.nbytes
  assert want == {'both': 16 * 3 * 4 // 8, 'two_dims': 8 * 6 * 4 // 8,
                  'model_only': 5 * 4 * 2 // 2, 'data_only': 12 * 4 // 4,
                  'whole': 9 * 4}
  got = {path.split('/')[-1]: r['bytes_per_device'] for path, r in rows.items()}
  assert got == want
  assert described['state_bytes_per_device'] == sum(want.values())
  assert described['mesh'] == {'data': 4, 'model': 2}


# --- the agreed stop signal ---------------------------------------------------------

_SIGNALS_WORKER = textwrap.dedent('''
    import os, signal, sys
    from gintrain.runner.parallel import distributed, preemption, signals
    address, index, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    distributed.initialize('on', address, 2, index)
    signals.install()
    for spec in rounds:
      mine = spec.split(',')[index]
      signals.reset()
      if mine != '-':
        os.kill(os.getpid(), getattr(signal, mine))
      got = preemption.stop_signal()
      print('ROUND', spec, 'SIGNAL', None if got is None else
            signal.Signals(got).name, 'EXIT', preemption.exit_code(got),
            flush=True)
    signals.uninstall()
''')

# (signal on process 0, on process 1) -> the agreed signal.
_ROUNDS = {'SIGINT,SIGTERM': 'SIGTERM', 'SIGTERM,SIGINT': 'SIGTERM',
           'SIGINT,SIGUSR1': 'SIGUSR1', 'SIGINT,-': 'SIGINT',
           '-,SIGINT': 'SIGINT', 'SIGINT,SIGINT': 'SIGINT',
           '-,SIGTERM': 'SIGTERM'}


def test_two_processes_agree_sigterm_wins_over_sigint(tmp_path):
  port = harness.free_port()
  env = harness.env(devices=1)
  procs = []
  for index in range(2):
    log = open(tmp_path / f'p{index}.log', 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-c', _SIGNALS_WORKER, f'127.0.0.1:{port}',
         str(index), *_ROUNDS], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True), log))
  try:
    for proc, _ in procs:
      proc.wait(timeout=90)
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  for index in range(2):
    text = (tmp_path / f'p{index}.log').read_text()
    assert procs[index][0].returncode == 0, harness.tail(text)
    got = {}
    for line in text.splitlines():
      if line.startswith('ROUND '):
        _, spec, _, name, _, code = line.split()
        got[spec] = (name, int(code))
    assert got == {spec: (name, 130 if name == 'SIGINT' else 75)
                   for spec, name in _ROUNDS.items()}, (index, text)
