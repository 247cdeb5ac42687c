"""An adapter that gives a flax ``nnx`` module the runner's model convention.

nnx modules hold their state as attributes; the runner's loop is functional
(``init`` returns variables, ``apply`` takes them). :class:`NnxModel` splits
a module into ``{'params': ..., 'batch_stats': ...}`` (plain nested dicts of
arrays, checkpointed like any other) and merges them back for each call::

    # my_models.py (a user's module: it imports gin, and nnx from flax)

    @gin.configurable
    class Net(nnx.Module):
      def __init__(self, rngs, width=64):
        self.hidden = nnx.Linear(64, width, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(width, 10, rngs=rngs)
      def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.hidden(x))))

    # gin
    train.model = @models.nnx_model()
    nnx_model.module = @my_models.Net

The module class (or any factory) is called with ``rngs=nnx.Rngs(params=...,
dropout=...)`` from the run's seed. In training the module is switched with
``module.train()`` and its random streams are reseeded from the key the task
derives from ``(seed, step)``, so a resumed run draws the same numbers; in
evaluation ``module.eval()``. Collections: ``nnx.Param`` -> ``params``,
``nnx.BatchStat`` -> ``batch_stats``; other state (RNG counters) is rebuilt
for every call, never trained or saved.

flax is not imported by the runner: the adapter uses the ``flax.nnx`` module
the user's own code has already imported.
"""

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ['NnxModel', 'nnx_model']

# The random streams every module is built with (and reseeded in training).
_STREAMS = ('params', 'dropout', 'default')


def _nnx():
  nnx = sys.modules.get('flax.nnx')
  if nnx is None:
    raise RuntimeError('NnxModel needs flax.nnx, which is not imported: the'
                       ' module class given to nnx_model should come from a'
                       ' module that imports flax.nnx.')
  return nnx


class NnxModel:
  """``init``/``apply`` for an nnx module built by ``factory(rngs=...)``.

  Args:
    factory: called as ``factory(rngs=nnx.Rngs(...))``; returns an
      ``nnx.Module`` whose ``__call__(x)`` gives the output.
    name: for logs.
  """

  def __init__(self, factory: Callable[..., Any], name: str | None = None):
    if not callable(factory):
      raise TypeError(f'nnx_model.module must be a module class or factory,'
                      f' got {factory!r}.')
    self.factory = factory
    self.name = name or getattr(factory, '__name__', 'nnx_module')

  def _build(self, rngs: Mapping[str, jax.Array]):
    nnx = _nnx()
    # Always the same streams, so the module's graph is the same in init
    # and in every apply.
    key = rngs.get('params', jax.random.key(0))
    streams = {name: rngs.get(name, key) for name in _STREAMS}
    module = self.factory(rngs=nnx.Rngs(**streams))
    graphdef, params, stats, rest = nnx.split(module, nnx.Param,
                                              nnx.BatchStat, ...)
    return nnx, graphdef, params, stats, rest

  def init(self, rngs, x, train: bool = False) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` (the latter if any)."""
    del x, train  # nnx modules are built eagerly, without a sample input
    if not isinstance(rngs, Mapping):
      rngs = {'params': rngs}
    nnx, _, params, stats, _ = self._build(rngs)
    variables = {'params': nnx.to_pure_dict(params)}
    stats = nnx.to_pure_dict(stats)
    if stats:
      variables['batch_stats'] = stats
    return variables

  def _merge(self, variables):
    # A fresh module gives the graph and the non-variable state; its
    # parameter values (traced, unused) are replaced by ``variables``.
    nnx, graphdef, params, stats, rest = self._build({})
    nnx.replace_by_pure_dict(params, variables['params'])
    if 'batch_stats' in variables:
      nnx.replace_by_pure_dict(stats, variables['batch_stats'])
    return nnx, nnx.merge(graphdef, params, stats, rest)

  def apply(self, variables, x, train: bool = False, rngs=None,
            mutable=False):
    """The output; with ``mutable``, ``(output, {'batch_stats': ...})``."""
    nnx, module = self._merge(variables)
    if train:
      module.train()
      if rngs:
        nnx.reseed(module, **{k: v for k, v in rngs.items()
                              if k in _STREAMS and k != 'params'})
    else:
      module.eval()
    out = module(x)
    if not mutable:
      return out
    stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    return out, ({'batch_stats': stats} if stats else {})


def nnx_model(module: Callable[..., Any], **kwargs) -> NnxModel:
  """An :class:`NnxModel` of ``module(rngs=..., **kwargs)`` (for gin)."""
  if kwargs:
    factory = lambda rngs: module(rngs=rngs, **kwargs)  # pylint: disable=unnecessary-lambda-assignment
    factory.__name__ = getattr(module, '__name__', 'nnx_module')
  else:
    factory = module
  return NnxModel(factory)
