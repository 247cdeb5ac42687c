"""Where the steps run: one device, ``pmap``, or ``jit`` over a device mesh.

A :class:`Partitioner` owns the devices: it places the train state and each
batch, compiles the train and eval steps, and brings values back to the
host. Provided:

* ``single``: ``jax.jit`` on the default device.
* ``pmap``: data parallel over the local devices (``lib.common_utils.shard``
  splits each process's batch; the state is replicated with a leading device
  axis; the step functions reduce over ``axis_name``).
* ``sharded``: ``jax.jit`` over a 1-D ``jax.sharding.Mesh`` of all devices
  with ``NamedSharding``: the batch is split along ``'data'``, the state is
  replicated. ``pmap``'s successor in JAX; works across processes.
* ``auto``: ``single`` on one device, else ``sharded``.

``train.parallelism`` takes one of these names or a :class:`Partitioner`
instance of your own::

    >>> import jax
    >>> make('auto').name in ('single', 'sharded')
    True
"""

import abc
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gintrain.lib import common_utils
from gintrain.runner.errors import RunnerError

__all__ = ['MODES', 'resolve_mode', 'make', 'Partitioner', 'Single', 'Pmap',
           'DataParallel']

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


class Partitioner(abc.ABC):
  """Places values and compiles steps for one layout of the devices.

  Step functions are built by the trainer as
  ``train_step(state, sums, batch) -> (state, sums)`` and
  ``eval_step(state, batch) -> sums``; inside them, ``axis_name`` (when not
  None) names the device axis to reduce over (``pmap``).

  Attributes:
    name: for logs and records.
    axis_name: the collective axis the step functions reduce over, or None.
    batch_divisor: the global batch size must be a multiple of this.
  """
  name: str = 'partitioner'
  axis_name: str | None = None

  @property
  def batch_divisor(self) -> int:
    return 1

  @abc.abstractmethod
  def put_state(self, tree: Any) -> Any:
    """Host values (the same on every process) -> placed values."""

  @abc.abstractmethod
  def put_batch(self, batch: dict) -> Any:
    """This process's share of a global batch -> placed values."""

  @abc.abstractmethod
  def get(self, tree: Any) -> Any:
    """Placed values -> host numpy values (one copy of replicated ones)."""

  @abc.abstractmethod
  def compile(self, train_step: Callable, eval_step: Callable,
              donate: bool = True) -> tuple[Callable, Callable]:
    """The compiled steps; with ``donate`` the train step donates the state
    (its input buffers are reused for the output)."""

  def snapshot(self, tree: Any) -> Any:
    """Values of ``tree`` a checkpoint writer may read in the background:
    by default host copies (:meth:`get`); a partitioner whose placed arrays
    are whole on this process returns them as they are (then the next step
    must not donate them)."""
    return self.get(tree)


class Single(Partitioner):
  """``jax.jit`` on one device."""
  name = 'single'

  def __init__(self):
    self.device = jax.local_devices()[0]

  def put_state(self, tree):
    return jax.device_put(tree, self.device)

  def put_batch(self, batch):
    # Host batches go to jit as numpy: its C++ dispatch path copies them far
    # faster than an explicit jax.device_put.
    return batch

  def get(self, tree):
    return jax.device_get(tree)

  def compile(self, train_step, eval_step, donate=True):
    return (jax.jit(train_step, donate_argnums=0 if donate else ()),
            jax.jit(eval_step))

  def snapshot(self, tree):
    return tree


class Pmap(Partitioner):
  """Data parallel over the local devices with ``jax.pmap``."""
  name = 'pmap'
  axis_name = _AXIS

  def __init__(self):
    self._n = jax.local_device_count()
    self._replicate = jax.pmap(lambda tree: tree, axis_name=_AXIS)

  @property
  def batch_divisor(self):
    return jax.device_count()

  def put_state(self, tree):
    n = self._n
    return self._replicate(jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))

  def put_batch(self, batch):
    return common_utils.shard(batch)

  def get(self, tree):
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

  def compile(self, train_step, eval_step, donate=True):
    return (jax.pmap(train_step, axis_name=_AXIS,
                     donate_argnums=0 if donate else ()),
            jax.pmap(eval_step, axis_name=_AXIS))


class DataParallel(Partitioner):
  """``jax.jit`` over a 1-D mesh of all devices: batch split, state
  replicated (``'sharded'``)."""
  name = 'sharded'

  def __init__(self):
    self.mesh = Mesh(np.asarray(jax.devices()), (_AXIS,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.split = NamedSharding(self.mesh, PartitionSpec(_AXIS))

  @property
  def batch_divisor(self):
    return jax.device_count()

  def put_state(self, tree):
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated,
                                          lambda index: x[index])
    return jax.tree_util.tree_map(put, tree)


  def put_batch(self, batch):
    # Explicitly placed: with numpy batches split by jit's in_shardings,
    # jax 0.10 on CPU can deadlock in the gradient all-reduce (a collective
    # rendezvous times out) when devices outnumber cores.
    if jax.process_count() == 1:
      return jax.device_put(batch, self.split)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self.split, x), batch)

  def get(self, tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)),
                                  tree)

  def snapshot(self, tree):
    if jax.process_count() > 1:  # replicated, but not whole on one process
      return self.get(tree)
    return tree

  def compile(self, train_step, eval_step, donate=True):
    rep, split = self.replicated, self.split
    return (jax.jit(train_step, in_shardings=(rep, rep, split),
                    out_shardings=rep,
                    donate_argnums=0 if donate else ()),
            jax.jit(eval_step, in_shardings=(rep, split), out_shardings=rep))


def make(mode: str | Partitioner) -> Partitioner:
  """The partitioner for ``mode`` (see :func:`resolve_mode`), or ``mode``
  itself when it is a :class:`Partitioner`."""
  if isinstance(mode, Partitioner):
    return mode
  return {'single': Single, 'pmap': Pmap,
          'sharded': DataParallel}[resolve_mode(mode)]()
