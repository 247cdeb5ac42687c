"""Where the steps run: one device, ``pmap``, or ``jit`` over a device mesh.

* ``single``: ``jax.jit`` on the default device.
* ``pmap``: data parallel over the local devices (``lib.common_utils.shard``
  splits each process's batch; the state is replicated with a leading device
  axis; gradients are ``pmean``-ed).
* ``sharded``: ``jax.jit`` over a 1-D ``jax.sharding.Mesh`` of all devices
  with ``NamedSharding``: the batch is split along ``'data'``, the state is
  replicated. ``pmap``'s successor in JAX; works across processes.
* ``auto``: ``single`` on one device, else ``sharded``.

Every backend takes host values in (:meth:`Backend.put_state`, each
process's share of a batch in :meth:`Backend.put_batch`) and gives host
values back (:meth:`Backend.get`), so the loop does not care which one runs::

    >>> import jax
    >>> backend = make('auto')
    >>> backend.mode in ('single', 'sharded')
    True
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gintrain.lib import common_utils
from gintrain.runner import steps
from gintrain.runner.errors import RunnerError

__all__ = ['MODES', 'resolve_mode', 'make', 'Backend']

MODES = ('auto', 'single', 'pmap', 'sharded')
_AXIS = 'data'


def resolve_mode(mode: str) -> str:
  """The concrete mode for ``mode`` on this machine.

  Raises:
    RunnerError: an unknown mode, or ``single`` in a multi-process run.
  """
  if mode not in MODES:
    raise RunnerError(f'train.parallelism must be one of {", ".join(MODES)},'
                      f' got {mode!r}.')
  if mode == 'auto':
    return 'single' if jax.device_count() == 1 else 'sharded'
  if mode == 'single' and jax.process_count() > 1:
    raise RunnerError("train.parallelism='single' cannot run on"
                      f' {jax.process_count()} processes; use sharded or pmap.')
  return mode


def _first_replica(x):
  return np.asarray(x.addressable_shards[0].data)[0]


def _first_local(x):
  return np.asarray(x.addressable_data(0))


@dataclasses.dataclass
class Backend:
  """Compiled steps plus the host <-> device moves of one mode.

  Attributes:
    mode: ``'single'``, ``'pmap'`` or ``'sharded'``.
    batch_divisor: the global batch size must be a multiple of this.
    train_step: ``(state, metric_sums, batch) -> (state, metric_sums)`` on
      placed values (see ``runner.steps``); the state is donated, the sums
      are not (a placed zero can be passed again and again).
    eval_step: ``(state, batch) -> sums`` on placed values.
    in_shardings: the shardings of the steps' (state, batch) inputs and
    out_sharding: of their outputs (``sharded`` only).
  """
  mode: str
  batch_divisor: int
  put_state: Callable[[Any], Any]
  put_batch: Callable[[dict], Any]
  get: Callable[[Any], Any]
  in_shardings: Any = None
  out_sharding: Any = None
  train_step: Callable = None
  eval_step: Callable = None

  def compile(self, loss_fn, metric_fns):
    """Sets ``train_step``/``eval_step`` for this loss and metrics."""
    axis = _AXIS if self.mode == 'pmap' else None
    train = steps.make_train_step(loss_fn, metric_fns, axis)
    evaluate = steps.make_eval_step(loss_fn, metric_fns, axis)
    if self.mode == 'single':
      self.train_step = jax.jit(train, donate_argnums=0)
      self.eval_step = jax.jit(evaluate)
    elif self.mode == 'pmap':
      self.train_step = jax.pmap(train, axis_name=_AXIS, donate_argnums=0)
      self.eval_step = jax.pmap(evaluate, axis_name=_AXIS)
    else:
      state_in, batch_in = self.in_shardings
      self.train_step = jax.jit(
          train, in_shardings=(state_in, state_in, batch_in),
          out_shardings=self.out_sharding, donate_argnums=0)
      self.eval_step = jax.jit(evaluate, in_shardings=self.in_shardings,
                               out_shardings=self.out_sharding)
    return self


def _single() -> Backend:
  device = jax.local_devices()[0]
  # Host batches go to jit as numpy: its C++ dispatch path copies them far
  # faster than an explicit jax.device_put.
  return Backend('single', 1,
                 put_state=lambda tree: jax.device_put(tree, device),
                 put_batch=lambda batch: batch,
                 get=jax.device_get)


def _pmap() -> Backend:
  n = jax.local_device_count()
  replicate = jax.pmap(lambda tree: tree, axis_name=_AXIS)

  def put_state(tree):
    return replicate(jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))

  def put_batch(batch):
    return common_utils.shard(batch)

  def get(tree):
    return jax.tree_util.tree_map(_first_replica, tree)

  return Backend('pmap', jax.device_count(), put_state, put_batch, get)


def _sharded() -> Backend:
  mesh = Mesh(np.asarray(jax.devices()), (_AXIS,))
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(_AXIS))

  def put_state(tree):
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, replicated,
                                          lambda index: x[index])
    return jax.tree_util.tree_map(put, tree)

  def put_batch(batch):
    # Explicitly placed: with numpy batches split by jit's in_shardings,
    # jax 0.10 on CPU can deadlock in the gradient all-reduce (a collective
    # rendezvous times out) when devices outnumber cores.
    if jax.process_count() == 1:
      return jax.device_put(batch, split)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(split, x), batch)

  def get(tree):
    return jax.tree_util.tree_map(_first_local, tree)

  return Backend('sharded', jax.device_count(), put_state, put_batch, get,
                 in_shardings=(replicated, split), out_sharding=replicated)


def make(mode: str) -> Backend:
  """The backend for ``mode`` (see :func:`resolve_mode`), not yet compiled."""
  return {'single': _single, 'pmap': _pmap,
          'sharded': _sharded}[resolve_mode(mode)]()
