"""How the runner calls a model, in training and in evaluation mode.

A model is anything with flax's convention: ``init(rng, x, ...)`` returning
a variables dict ``{'params': ..., <other collections>: ...}`` and
``apply(variables, x, ...)``. A :class:`ModelCaller` looks once at what the
model accepts and passes only that:

* ``train=True`` in training and ``train=False`` in evaluation (or
  ``deterministic=`` with the opposite value) when the module's
  ``__call__`` or ``apply`` has that parameter;
* ``rngs={'dropout': key, ...}`` (the streams the task asks for) when
  ``apply`` takes ``rngs``; ``init`` gets ``{'params': key, ...}`` when its
  first parameter is ``rngs`` (flax linen), else the key;
* ``mutable=[...]`` in training for the collections besides ``params``
  present in the variables (``batch_stats``, ...), when ``apply`` takes
  ``mutable``; their new values come back from :meth:`apply_train`.

A flax ``linen.Module`` therefore works unchanged (flax is never imported
here), and so does the runner's own :class:`~.plain.Model`::

    >>> import jax, numpy as np
    >>> from gintrain.runner.models import plain
    >>> caller = ModelCaller(plain.mlp(features=(4,), num_classes=3))
    >>> variables = caller.init(jax.random.key(0), np.zeros((2, 5)))
    >>> sorted(variables)
    ['params']
    >>> out, new = caller.apply_train(variables, np.zeros((2, 5)), {})
    >>> out.shape, new
    ((2, 3), {})
"""

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax

__all__ = ['ModelCaller', 'to_dict']

_TRAIN_FLAGS = ('train', 'training', 'is_training')


def to_dict(tree: Any) -> Any:
  """Nested mappings (e.g. flax ``FrozenDict``) as plain nested dicts."""
  if isinstance(tree, Mapping):
    return {k: to_dict(v) for k, v in tree.items()}
  return tree


def _parameters(fn) -> dict:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


def _named(params: dict, name: str) -> bool:
  p = params.get(name)
  return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


class ModelCaller:
  """Calls ``model`` with the arguments it accepts (see the module doc).

  Args:
    model: has ``init`` and ``apply`` (flax convention).
  """

  def __init__(self, model: Any):
    for attr in ('init', 'apply'):
      if not callable(getattr(model, attr, None)):
        raise TypeError(f'model {model!r} has no {attr}(); a model needs'
                        ' init(rng, x) and apply(variables, x).')
    self.model = model
    init = _parameters(model.init)
    apply = _parameters(model.apply)
    # A linen module's apply forwards **kwargs to __call__: look there.
    call = _parameters(getattr(type(model), '__call__', None)) if hasattr(
        type(model), '__call__') else {}
    accepted = {**call, **apply}
    self._mode_kwarg = None
    for name in _TRAIN_FLAGS:
      if _named(accepted, name):
        self._mode_kwarg = (name, True)
        break
    else:
      if _named(accepted, 'deterministic'):
        self._mode_kwarg = ('deterministic', False)
    self._init_takes_dict = bool(init) and next(iter(init)) == 'rngs'
    self._apply_rngs = 'rngs' in apply
    self._apply_mutable = 'mutable' in apply

  @property
  def name(self) -> str:
    return getattr(self.model, 'name', None) or type(self.model).__name__

  def _mode(self, train: bool) -> dict:
    if self._mode_kwarg is None:
      return {}
    name, same = self._mode_kwarg
    return {name: train if same else not train}

  def init(self, rng: jax.Array, x: Any,
           streams: Sequence[str] = ('dropout',)) -> dict:
    """Fresh variables (plain dicts) for inputs like ``x``, in eval mode."""
    if self._init_takes_dict:
      keys = jax.random.split(rng, len(streams) + 1)
      rngs = {'params': keys[0], **dict(zip(streams, keys[1:]))}
      variables = self.model.init(rngs, x, **self._mode(False))
    else:
      variables = self.model.init(rng, x, **self._mode(False))
    if not isinstance(variables, Mapping) or 'params' not in variables:
      raise TypeError(f'{self.name}.init must return a mapping with a'
                      f" 'params' entry, got {type(variables).__name__}.")
    return to_dict(variables)

  def apply_train(self, variables: dict, x: Any,
                  rngs: Mapping[str, jax.Array]) -> tuple[Any, dict]:
    """``(output, new values of the non-params collections)``, train mode."""
    kwargs = self._mode(True)
    if self._apply_rngs and rngs:
      kwargs['rngs'] = dict(rngs)
    mutable = [k for k in variables if k != 'params']
    if mutable and self._apply_mutable:
      out, updates = self.model.apply(variables, x, mutable=mutable,
                                      **kwargs)
      updates = to_dict(updates)
      return out, {k: updates.get(k, variables[k]) for k in mutable}
    out = self.model.apply(variables, x, **kwargs)
    return out, {k: variables[k] for k in mutable}

  def apply_eval(self, variables: dict, x: Any) -> Any:
    """The output in evaluation mode (no rngs, nothing mutable)."""
    return self.model.apply(variables, x, **self._mode(False))
