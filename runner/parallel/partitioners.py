"""Where the steps run: one device, ``pmap``, or ``jit`` over a device mesh.

A :class:`Partitioner` owns the devices: it places the train state and each
batch, compiles the train and eval steps, and brings values back to the
host. Provided:

* ``single``: ``jax.jit`` on the default device.
* ``pmap``: data parallel over the local devices (``lib.common_utils.shard``
  splits each process's batch; the state is replicated with a leading device
  axis; the step functions reduce over ``axis_name``).
* ``sharded``: ``jax.jit`` over a ``jax.sharding.Mesh`` of all devices
  (all processes) with ``NamedSharding``: the batch is split along
  ``'data'``; each array of the state is placed by partition rules
  (:mod:`.rules`; default: replicated). ``pmap``'s successor in JAX.
  ``@partitioner()`` in gin chooses the mesh and the rules (FSDP, tensor
  parallel, your own).
* ``auto``: ``single`` on one device, else ``sharded``.

``train.parallelism`` takes one of these names or a :class:`Partitioner`
instance of your own::

    >>> import jax
    >>> make('auto').name in ('single', 'sharded')
    True
"""

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gintrain.lib import common_utils
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.parallel import rules as rules_lib

__all__ = ['MODES', 'resolve_mode', 'make', 'partitioner', 'Partitioner',
           'Single', 'Pmap', 'Sharded']

MODES = ('auto', 'single', 'pmap', 'sharded')
_AXIS = 'data'


def resolve_mode(mode: str) -> str:
  """The concrete mode for ``mode`` on this machine.

  Raises:
    RunnerError: an unknown mode, or ``single`` in a multi-process run.
  """
  validation.check_choice('train.parallelism', mode, MODES)
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
  def compile_train(self, step: Callable, donate: bool = True) -> Callable:
    """The compiled ``train_step``; with ``donate`` it donates the state
    (its input buffers are reused for the output)."""

  @abc.abstractmethod
  def compile_eval(self, step: Callable) -> Callable:
    """The compiled ``eval_step``."""

  def create_state(self, make: Callable[[], Any]) -> Any:
    """The placed train state that ``make()`` builds (traced, not run on
    the host). Default: computed, fetched to the host, :meth:`put_state`.
    Partitioners that split the state build it split (``jax.jit`` with
    ``out_shardings``), so no device or host ever holds all of it."""
    return self.put_state(jax.device_get(jax.jit(make)()))

  def shardings(self, tree: Any) -> Any:
    """Where each array of ``tree`` (arrays or shapes) is read to when a
    checkpoint stores it as sharded files (before :meth:`put_state`).
    Default: this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda _: device, tree)

  def result(self, tree: Any) -> Any:
    """The values a finished run returns (default: :meth:`get`)."""
    return self.get(tree)

  def describe(self, tree: Any) -> dict:
    """Per array of ``tree`` (shapes suffice): its shape, ``PartitionSpec``
    and bytes per device, and the total state bytes per device. Default:
    every array whole on every device."""
    rows, total = [], 0
    for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
      total += nbytes
      rows.append({'path': rules_lib.path_of(keys), 'shape': list(x.shape),
                   'spec': '()', 'bytes_per_device': nbytes})
    return {'mesh': {'devices': 1}, 'arrays': rows,
            'state_bytes_per_device': total}

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
    # np.asarray per array: on one device the same host arrays as
    # jax.device_get, at a tenth of its cost (a log step's fetch).
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)

  def compile_train(self, step, donate=True):
    return jax.jit(step, donate_argnums=0 if donate else ())

  def compile_eval(self, step):
    return jax.jit(step)

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

  def compile_train(self, step, donate=True):
    return jax.pmap(step, axis_name=_AXIS, donate_argnums=0 if donate else ())

  def compile_eval(self, step):
    return jax.pmap(step, axis_name=_AXIS)

  def describe(self, tree):
    out = super().describe(tree)  # every array whole on each local device
    out['mesh'] = {'devices': jax.local_device_count()}
    return out


def _numpy(x):
  return x if isinstance(x, np.ndarray) else np.asarray(x)


class Sharded(Partitioner):
  """``jax.jit`` over a named device mesh, with partition rules.

  The mesh (``mesh_shape``: ``{axis name: size}``, one size may be -1 for
  "the remaining devices") spans all processes' devices
  (``jax.make_mesh``); batches are split along its ``'data'`` axis (and
  replicated along the others); each array of the train state gets the
  ``PartitionSpec`` of the first rule of ``rules`` whose pattern matches
  its path (see :mod:`.rules`: presets ``'replicated'``, ``'fsdp'``,
  ``'tensor_parallel'``). The default, ``Sharded()``, is data parallel: a
  1-D ``data`` mesh of all devices, the state replicated (``'sharded'``).

  The mesh is built on first use (after ``jax.distributed`` started), so a
  gin binding ``train.parallelism = @partitioner()`` is safe.
  """
  name = 'sharded'

  def __init__(self, mesh_shape: dict | None = None,
               rules: str | Sequence = 'replicated'):
    mesh_shape = dict(mesh_shape or {rules_lib.DATA_AXIS: -1})
    if rules_lib.DATA_AXIS not in mesh_shape:
      raise RunnerError(f'partitioner.mesh_shape={mesh_shape} needs a'
                        f' {rules_lib.DATA_AXIS!r} axis (batches are split'
                        ' along it).')
    bad = [k for k, v in mesh_shape.items() if not isinstance(k, str) or
           not isinstance(v, int) or isinstance(v, bool) or
           (v < 1 and v != -1)]
    if bad or list(mesh_shape.values()).count(-1) > 1:
      raise RunnerError(f'partitioner.mesh_shape={mesh_shape} must map axis'
                        ' names to sizes >= 1, with at most one -1.')
    self.mesh_shape = mesh_shape
    self.rules = rules_lib.resolve(rules)
    self.rules_text = rules
    self._mesh = None

  # -- the mesh -----------------------------------------------------------

  @property
  def mesh(self) -> Mesh:
    if self._mesh is None:
      n = jax.device_count()
      known = math.prod(v for v in self.mesh_shape.values() if v != -1)
      sizes = {k: (n // known if v == -1 else v)
               for k, v in self.mesh_shape.items()}
      if math.prod(sizes.values()) != n or not all(sizes.values()):
        raise RunnerError(
            f'partitioner.mesh_shape={self.mesh_shape} does not fit the'
            f' {n} device(s) of this run ({jax.process_count()} process(es)'
            f' x {jax.local_device_count()}).')
      data = sizes[rules_lib.DATA_AXIS]
      if data % jax.process_count():
        raise RunnerError(
            f'partitioner.mesh_shape={self.mesh_shape}: the data axis'
            f' ({data}) must be a multiple of the process count'
            f' ({jax.process_count()}): each process loads its own share of'
            ' every batch.')
      # Auto axes: shardings are placement hints that XLA propagates
      # (GSPMD), so any model's code runs unchanged on any rule set.
      self._mesh = jax.make_mesh(
          tuple(sizes.values()), tuple(sizes),
          axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
    return self._mesh

  @property
  def axes(self) -> dict:
    """``{axis name: size}`` of the mesh."""
    return dict(self.mesh.shape)

  @property
  def replicated(self):
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def split(self):
    return NamedSharding(self.mesh, PartitionSpec(rules_lib.DATA_AXIS))

  @property
  def batch_divisor(self):
    return self.axes[rules_lib.DATA_AXIS]

  def specs(self, tree):
    """``tree`` (arrays or shapes) -> its ``PartitionSpec`` leaves.

    Raises:
      RunnerError: a rule that cannot split an array (naming both).
    """
    return rules_lib.tree_specs(tree, self.rules, self.axes)

  def shardings(self, tree):
    mesh = self.mesh
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), self.specs(tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec))

  # -- placing ------------------------------------------------------------

  def create_state(self, make):
    shardings = self.shardings(jax.eval_shape(make))
    return jax.jit(make, out_shardings=shardings)()

  def put_state(self, tree):
    def put(x, sharding):
      if isinstance(x, jax.Array):
        if x.sharding == sharding:
          return x
        if x.is_fully_addressable and jax.process_count() == 1:
          return jax.device_put(x, sharding)
        return jax.jit(lambda v: v, out_shardings=sharding)(x)
      x = _numpy(x)
      return jax.make_array_from_callback(x.shape, sharding,
                                          lambda index: x[index])
    return jax.tree_util.tree_map(put, tree, self.shardings(tree))

  def put_batch(self, batch):
    # Explicitly placed: with numpy batches split by jit's in_shardings,
    # jax 0.10 on CPU can deadlock in the gradient all-reduce (a collective
    # rendezvous times out) when devices outnumber cores.
    if jax.process_count() == 1:
      return jax.device_put(batch, self.split)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self.split, x), batch)

  def get(self, tree):
    def get(x):
      if not isinstance(x, jax.Array):
        return x
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      if x.is_fully_addressable:
        return np.asarray(x)
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree_util.tree_map(get, tree)

  def result(self, tree):
    """Final values for the caller: host arrays, except arrays split over
    several processes, which stay placed (gathering them would put a whole
    copy of the state on every host)."""
    return jax.tree_util.tree_map(
        lambda x: x if (isinstance(x, jax.Array) and
                        not x.is_fully_addressable and
                        not x.is_fully_replicated) else self.get(x), tree)

  def snapshot(self, tree):
    if jax.process_count() == 1:
      return tree  # whole here; the writer reads them in the background
    # Replicated arrays: this process's copy goes into process 0's file;
    # split ones stay placed: every process writes its own shards (_gda).
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0))
        if isinstance(x, jax.Array) and x.is_fully_replicated else x, tree)

  def compile_train(self, step, donate=True):
    """Jitted on first call, with the state's shardings (the state keeps
    them), the sums replicated and the batch split."""
    rep, split = self.replicated, self.split
    compiled = []

    def train(state, sums, batch):
      if not compiled:
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        out = jax.eval_shape(step, state, sums, batch)
        out_sh = (state_sh,) + tuple(
            jax.tree_util.tree_map(lambda _: rep, o) for o in out[1:])
        compiled.append(jax.jit(
            step, in_shardings=(state_sh, rep, split),
            out_shardings=out_sh, donate_argnums=0 if donate else ()))
      return compiled[0](state, sums, batch)
    return train

  def compile_eval(self, step):
    rep, split = self.replicated, self.split
    compiled = []

    def evaluate(state, batch):
      if not compiled:
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        compiled.append(jax.jit(step, in_shardings=(state_sh, split),
                                out_shardings=rep))
      return compiled[0](state, batch)
    return evaluate

  def describe(self, tree) -> dict:
    """Per array of ``tree`` (shapes suffice): its shape, ``PartitionSpec``
    and bytes per device; and the total state bytes per device."""
    axes = self.axes
    rows, total = [], 0
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for keys, x in flat:
      path = rules_lib.path_of(keys)
      spec = rules_lib.spec_for(path, x.shape, self.rules, axes)
      split_by = 1
      for entry in spec:
        names = (entry,) if isinstance(entry, str) else (entry or ())
        split_by *= math.prod(axes[a] for a in names)
      nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize // split_by
      total += nbytes
      rows.append({'path': path, 'shape': list(x.shape),
                   'spec': str(tuple(spec)), 'bytes_per_device': nbytes})
    return {'mesh': axes, 'arrays': rows, 'state_bytes_per_device': total}


def partitioner(mesh_shape: dict | None = None,
                rules: str | Sequence = 'replicated') -> Sharded:
  """gin's ``partitioner``: a :class:`Sharded` partitioner, e.g.::

      train.parallelism = @partitioner()
      partitioner.mesh_shape = {'data': -1, 'model': 2}
      partitioner.rules = ['tensor_parallel', 'fsdp']
  """
  return Sharded(mesh_shape, rules)


def make(mode: str | Partitioner) -> Partitioner:
  """The partitioner for ``mode`` (see :func:`resolve_mode`), or ``mode``
  itself when it is a :class:`Partitioner`."""
  if isinstance(mode, Partitioner):
    return mode
  return {'single': Single, 'pmap': Pmap,
          'sharded': Sharded}[resolve_mode(mode)]()
