"""Memory and FLOPs before launch: the train and eval steps compiled ahead
of time for the run's real layout.

:func:`estimate` lowers and compiles (``jax.jit(...).lower(...).compile()``,
nothing runs, nothing is allocated) the run's train step (with the norms
of a log step, donating the state) and eval step on shapes placed as the
partitioner places them, and reads XLA's ``memory_analysis()`` (per device:
argument, output, aliased and temporary bytes) and ``cost_analysis()``
(FLOPs). The train step's peak per device is arguments + outputs - aliased
(donated) + temporaries; ``resident_bytes`` (arguments + outputs - aliased)
is what stays allocated between steps.

``--dry_run`` prints it; a real run checks it before any checkpoint I/O
(:func:`check`) against ``--memory_budget`` or the device's memory where
JAX reports it (GPU, TPU; not the CPU: there, without the flag, nothing is
compiled twice), and fails with one line naming the budget, the estimate,
the largest arrays and the knobs that shrink them.

    >>> parse_bytes('1.5GiB'), parse_bytes('500MB'), parse_bytes('4096')
    (1610612736, 500000000, 4096)
"""

import re
from typing import Any

import jax
import numpy as np
from absl import logging

from gintrain.runner.errors import RunnerError
from gintrain.runner.training import steps

__all__ = ['parse_bytes', 'format_bytes', 'estimate', 'device_budget',
           'check', 'format_estimate', 'KNOBS']

KNOBS = ('train.batch_size, train.microbatches (gradient accumulation),'
         ' remat (e.g. transformer.remat=True), or'
         " train.parallelism='sharded' with FSDP partition rules")
_UNITS = {'': 1, 'b': 1, 'k': 10**3, 'kb': 10**3, 'm': 10**6, 'mb': 10**6,
          'g': 10**9, 'gb': 10**9, 't': 10**12, 'tb': 10**12,
          'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}


def parse_bytes(text: str, flag: str = '--memory_budget') -> int:
  """``'2GiB'``, ``'500MB'``, ``'123'`` -> bytes.

  Raises:
    RunnerError: not a size, naming ``flag``.
  """
  match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*', str(text))
  unit = match and match.group(2).lower()
  if not match or unit not in _UNITS or float(match.group(1)) <= 0:
    raise RunnerError(f'{flag}={text!r} is not a size; give bytes such as'
                      ' 2GiB, 500MB or 1073741824.')
  return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return str(n)


def _struct(x, sharding=None, lead=()):
  return jax.ShapeDtypeStruct(tuple(lead) + tuple(np.shape(x)),
                              np.asarray(x).dtype if not hasattr(x, 'dtype')
                              else x.dtype, sharding=sharding)


def _batch(sample: dict, rows: int, lead=(), sharding=None) -> dict:
  return {k: jax.ShapeDtypeStruct(tuple(lead) + (rows,) + np.shape(v)[1:],
                                  np.asarray(v).dtype, sharding=sharding)
          for k, v in sample.items()}


def _analysis(compiled) -> dict:
  mem = compiled.memory_analysis()
  out = {}
  for name in ('argument', 'output', 'alias', 'temp', 'generated_code'):
    out[f'{name}_bytes'] = int(getattr(mem, f'{name}_size_in_bytes', 0) or 0)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  out['flops'] = float((cost or {}).get('flops', float('nan')))
  out['resident_bytes'] = (out['argument_bytes'] + out['output_bytes'] -
                           out['alias_bytes'])
  out['peak_bytes'] = out['resident_bytes'] + out['temp_bytes']
  return out


def estimate(run: Any, make: Any) -> dict:
  """Compiles ``run``'s train and eval steps ahead of time on shapes.

  Args:
    run: the built run (``runner.training.trainer.Run``).
    make: its fresh-state maker (``trainer.state_maker(run)``).

  Returns:
    ``{'train': {...bytes, flops}, 'eval': {...}, 'peak_bytes',
    'largest': [(path, bytes per device)], 'state_bytes'}``, per device.
  """
  p, cfg = run.partitioner, run.config
  shapes = jax.eval_shape(make)
  sample = run.source.sample()
  zero = {k: jax.ShapeDtypeStruct((), np.float32) for k in run.train_metrics}
  train_step = steps.make_train_step(run.task, cfg.seed, p.axis_name,
                                     norms=True,
                                     microbatches=cfg.microbatches)
  eval_step = steps.make_eval_step(run.task, p.axis_name)
  spec = getattr(run.source, 'spec', None)
  eval_rows = getattr(spec, 'eval_batch_size', None) or cfg.eval_batch_size
  batch_rows = cfg.batch_size
  eval_sample = {**sample, 'mask': np.zeros((1,), np.float32)}
  if p.name == 'pmap':
    n = jax.local_device_count()
    lead = (n,)
    per = batch_rows // jax.device_count()
    state = jax.tree_util.tree_map(lambda x: _struct(x, lead=lead), shapes)
    sums = jax.tree_util.tree_map(lambda x: _struct(x, lead=lead), zero)
    train = jax.pmap(train_step, axis_name=p.axis_name, donate_argnums=0)
    ev = jax.pmap(eval_step, axis_name=p.axis_name)
    train_args = (state, sums, _batch(sample, per, lead))
    eval_args = (state, _batch(eval_sample, max(eval_rows //
                                                jax.device_count(), 1), lead))
  elif p.name == 'sharded':
    shardings = p.shardings(shapes)
    state = jax.tree_util.tree_map(lambda x, s: _struct(x, s), shapes,
                                   shardings)
    sums = jax.tree_util.tree_map(lambda x: _struct(x, p.replicated), zero)
    train = jax.jit(train_step, donate_argnums=0,
                    out_shardings=(shardings, p.replicated, p.replicated))
    ev = jax.jit(eval_step, out_shardings=p.replicated)
    train_args = (state, sums, _batch(sample, batch_rows, sharding=p.split))
    eval_args = (state, _batch(eval_sample, eval_rows, sharding=p.split))
  else:
    state, sums = shapes, zero
    train = jax.jit(train_step, donate_argnums=0)
    ev = jax.jit(eval_step)
    train_args = (state, sums, _batch(sample, batch_rows))
    eval_args = (state, _batch(eval_sample, eval_rows))
  out = {'train': _analysis(train.lower(*train_args).compile()),
         'eval': _analysis(ev.lower(*eval_args).compile())}
  layout = p.describe(shapes)
  rows = sorted(layout['arrays'], key=lambda r: -r['bytes_per_device'])
  out['largest'] = [(r['path'], r['bytes_per_device']) for r in rows[:3]]
  out['state_bytes'] = layout['state_bytes_per_device']
  out['peak_bytes'] = max(out['train']['peak_bytes'],
                          out['eval']['peak_bytes'])
  return out


def device_budget() -> int | None:
  """The memory of this process's first device, where JAX reports it."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  limit = (stats or {}).get('bytes_limit')
  return int(limit) if limit else None


def format_estimate(est: dict) -> str:
  """The ``--dry_run`` lines."""
  lines = ['# Memory per device (XLA memory_analysis of the compiled steps):']
  for name in ('train', 'eval'):
    e = est[name]
    lines.append(
        f'#   {name} step: arguments {format_bytes(e["argument_bytes"])},'
        f' outputs {format_bytes(e["output_bytes"])} (aliased'
        f' {format_bytes(e["alias_bytes"])}), temporaries'
        f' {format_bytes(e["temp_bytes"])}, peak'
        f' {format_bytes(e["peak_bytes"])}; {e["flops"]:.3g} FLOPs per step'
        ' (cost_analysis)')
  lines.append('#   largest arrays: ' + ', '.join(
      f'{path} {format_bytes(n)}' for path, n in est['largest']))
  return '\n'.join(lines)


def check(run: Any, make: Any, budget: str | int | None = None,
          flag: str = '--memory_budget', est: dict | None = None
          ) -> dict | None:
  """Fails when the run's estimated peak exceeds the budget per device.

  Args:
    run, make: as :func:`estimate`.
    budget: ``--memory_budget`` (a size; None: the device's memory, and
      no check where JAX does not report it, e.g. on the CPU).
    est: an :func:`estimate` already made (not compiled again).

  Returns:
    The estimate, or None when there was no budget to check.

  Raises:
    RunnerError: over the budget: one line with the budget, the estimate,
      the largest arrays and the knobs.
  """
  if budget is None or budget == '':
    limit, source = device_budget(), 'the device memory'
  else:
    limit = budget if isinstance(budget, int) else parse_bytes(budget, flag)
    source = f'{flag}={budget}'
  if not limit:
    return None
  est = est or estimate(run, make)
  peak = est['peak_bytes']
  logging.info('Estimated peak memory per device: %s of %s (%s).',
               format_bytes(peak), format_bytes(limit), source)
  global LAST
  LAST = est
  if peak > limit:
    which = ('train' if est['train']['peak_bytes'] >= est['eval']['peak_bytes']
             else 'eval')
    t = est[which]
    biggest = ', '.join(f'{path} {format_bytes(n)}'
                        for path, n in est['largest'])
    knobs = KNOBS if which == 'train' else 'train.eval_batch_size, ' + KNOBS
    raise RunnerError(
        f'the {which} step needs about {format_bytes(peak)} per device, over'
        f' the budget of {format_bytes(limit)} ({source}): state'
        f' {format_bytes(est["state_bytes"])}, arguments'
        f' {format_bytes(t["argument_bytes"])}, temporaries'
        f' {format_bytes(t["temp_bytes"])}; largest arrays: {biggest}.'
        f' Shrink it with {knobs}.')
  return est


LAST = None  # the last estimate check() made (for tests and tools)
