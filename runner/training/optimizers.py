"""Optax optimizers by name, with optional gradient clipping and weight decay.

:func:`optimizer` checks its arguments at once (so a typo fails before any
training) and returns an :class:`OptimizerSpec`; the loop calls
``spec.build(steps_per_epoch)`` once the epoch length is known (epoch-based
schedules need it)::

    >>> spec = optimizer('sgd', learning_rate=0.1, momentum=0.9,
    ...                  clip_grad_norm=1.0, weight_decay=1e-4)
    >>> tx = spec.build(steps_per_epoch=10)
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones(3)}
    >>> updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
    >>> updates['w'].shape
    (3,)

Weight decay: optimizers with their own ``weight_decay`` argument (adamw,
lamb, lion, lars, novograd, adadelta) get it there (decoupled decay); for the
others it is added to the gradient before the optimizer (L2 regularisation,
like ``torch.optim.SGD(weight_decay=...)``). Clipping by global norm comes
first of all.
"""

import dataclasses
import functools
import inspect
import warnings

import optax

from gintrain.runner import validation
from gintrain.runner.training import schedules
from gintrain.runner.errors import RunnerError, did_you_mean

__all__ = ['OptimizerSpec', 'optimizer', 'optax_optimizer_names']


@functools.cache
def optax_optimizer_names() -> tuple[str, ...]:
  """Names of the optax functions whose first argument is ``learning_rate``."""
  names = []
  for name in getattr(optax, '__all__', dir(optax)):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      fn = getattr(optax, name, None)
    if caught or not inspect.isfunction(fn):  # deprecated aliases warn
      continue
    params = list(inspect.signature(fn).parameters)
    if params and params[0] == 'learning_rate':
      names.append(name)
  return tuple(sorted(names))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A checked optax optimizer choice; :meth:`build` makes the transformation.

  Attributes:
    name: the optax function, e.g. ``'adam'``.
    learning_rate: a number, an optax schedule or a
      :class:`runner.schedules.EpochSchedule`.
    weight_decay: decay coefficient (0: none).
    clip_grad_norm: clip gradients to this global norm first (None: no clip).
    kwargs: other arguments of the optax function.
  """
  name: str
  learning_rate: object
  weight_decay: float = 0.0
  clip_grad_norm: float | None = None
  kwargs: dict = dataclasses.field(default_factory=dict)

  def build(self, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation, with epoch-based schedules resolved."""
    fn = getattr(optax, self.name)
    kwargs = dict(self.kwargs)
    learning_rate = schedules.resolve(self.learning_rate, steps_per_epoch)
    parts = []
    if self.clip_grad_norm is not None:
      parts.append(optax.clip_by_global_norm(self.clip_grad_norm))
    if self.weight_decay:
      if 'weight_decay' in inspect.signature(fn).parameters:
        kwargs['weight_decay'] = self.weight_decay
      else:
        parts.append(optax.add_decayed_weights(self.weight_decay))
    parts.append(fn(learning_rate=learning_rate, **kwargs))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def optimizer(name: str = 'adam', learning_rate=1e-3, *,
              weight_decay: float = 0.0, clip_grad_norm: float | None = None,
              **kwargs) -> OptimizerSpec:
  """Chooses ``optax.<name>`` with the given arguments.

  Args:
    name: an optax optimizer: ``'sgd'``, ``'adam'``, ``'adamw'``, ...
    learning_rate: a number, an optax schedule, or one of
      ``runner.schedules`` (epoch-based).
    weight_decay: weight decay coefficient (see the module doc).
    clip_grad_norm: clip the gradient's global norm to this (None: off).
    **kwargs: further arguments of ``optax.<name>`` (``momentum``, ``b1``,
      ...).

  Raises:
    RunnerError: an unknown optimizer or argument (with a suggestion), or a
      bad number.
  """
  names = optax_optimizer_names()
  if name not in names:
    raise RunnerError(f'Unknown optax optimizer {name!r}'
                      f'{did_you_mean(str(name), names)}; choose one of'
                      f' {", ".join(names)}.')
  params = inspect.signature(getattr(optax, name)).parameters
  for key in kwargs:
    if key not in params or key == 'learning_rate':
      raise RunnerError(
          f'optax.{name} has no argument {key!r}'
          f'{did_you_mean(key, params)}; its arguments are'
          f' {", ".join(p for p in params if p != "learning_rate")}.')
  if not isinstance(learning_rate, schedules.EpochSchedule) and not callable(
      learning_rate):
    schedules.resolve(learning_rate, steps_per_epoch=1)  # checks the number
  validation.check_number('optimizer.weight_decay', weight_decay, 0)
  validation.check_number('optimizer.clip_grad_norm', clip_grad_norm, 0,
                          allow_none=True)
  return OptimizerSpec(name, learning_rate, weight_decay, clip_grad_norm,
                       dict(kwargs))
