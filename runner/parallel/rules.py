"""Partition rules: which mesh axes each array of the train state is split over.

A rule set is an ordered list of ``(pattern, spec)`` pairs; the first pair
whose regular expression ``re.search``-es an array's path wins. Paths are the
keys of the train state joined with ``/``, so one rule covers a parameter and
its optimizer slots alike::

    params/Block_0/Attention_0/query/kernel
    opt_state/0/mu/Block_0/Attention_0/query/kernel

``spec`` is one of

* a tuple with one entry per leading dimension: a mesh axis name, a tuple of
  names, or None (that dimension is not split), as in
  ``jax.sharding.PartitionSpec``; ``()`` replicates;
* ``'fsdp'``: the largest dimension divisible by the ``data`` axis is split
  over it; arrays smaller than :data:`FSDP_MIN_SIZE` elements, or with no
  such dimension, are replicated.

An entry of the list may also be the name of a preset (expanded in place):

* ``'replicated'``: every array whole on every device (data parallel);
* ``'fsdp'``: every array as ``'fsdp'`` above;
* ``'tensor_parallel'``: the transformer's and the Llama's attention heads
  and MLP hidden units over ``model`` (Megatron-style); other arrays are
  left to the rules after it (replicated when none matches).

Arrays no rule matches, and scalars, are replicated::

    >>> rules = resolve(['tensor_parallel', 'fsdp'])
    >>> axes = {'data': 2, 'model': 2}
    >>> spec_for('params/Block_0/Dense_0/kernel', (64, 256), rules, axes)
    PartitionSpec(None, 'model')
    >>> spec_for('params/Embed_0/embedding', (256, 64), rules, axes)
    PartitionSpec('data',)
    >>> spec_for('step', (), rules, axes)
    PartitionSpec()

A rule that cannot split an array (an unknown axis, a dimension the axes do
not divide, more entries than dimensions) raises :class:`RunnerError` naming
the array, its shape, the rule and the mesh.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['PRESETS', 'FSDP', 'FSDP_MIN_SIZE', 'DATA_AXIS', 'resolve',
           'spec_for', 'tree_specs', 'path_of', 'describe_rule']

DATA_AXIS = 'data'
FSDP = 'fsdp'
# Arrays with fewer elements stay replicated under 'fsdp' (biases, norms:
# splitting them saves little and costs a gather per use).
FSDP_MIN_SIZE = 1024

_HEADS = (r'Attention_\d+/(query|key|value)/kernel$',
          (None, 'model', None))
PRESETS = {
    'replicated': [('.*', ())],
    'fsdp': [('.*', FSDP)],
    # Megatron: column-parallel q/k/v and MLP in, row-parallel out.
    'tensor_parallel': [
        _HEADS,
        (r'Attention_\d+/(query|key|value)/bias$', ('model', None)),
        (r'Attention_\d+/out/kernel$', ('model', None, None)),
        (r'Block_\d+/Dense_0/kernel$', (None, 'model')),
        (r'Block_\d+/Dense_0/bias$', ('model',)),
        (r'Block_\d+/Dense_1/kernel$', ('model', None)),
        # models.llama: per-block (layers_i/...) and scanned (layers/...,
        # a leading layer axis).
        (r'layers_\d+/self_attn/[qkv]_proj/kernel$', (None, 'model')),
        (r'layers_\d+/self_attn/[qkv]_proj/bias$', ('model',)),
        (r'layers_\d+/self_attn/o_proj/kernel$', ('model', None)),
        (r'layers_\d+/mlp/(gate|up)_proj/kernel$', (None, 'model')),
        (r'layers_\d+/mlp/(gate|up)_proj/bias$', ('model',)),
        (r'layers_\d+/mlp/down_proj/kernel$', ('model', None)),
        (r'layers/self_attn/[qkv]_proj/kernel$', (None, None, 'model')),
        (r'layers/self_attn/[qkv]_proj/bias$', (None, 'model')),
        (r'layers/self_attn/o_proj/kernel$', (None, 'model', None)),
        (r'layers/mlp/(gate|up)_proj/kernel$', (None, None, 'model')),
        (r'layers/mlp/(gate|up)_proj/bias$', (None, 'model')),
        (r'layers/mlp/down_proj/kernel$', (None, 'model', None)),
    ],
}


def describe_rule(rule) -> str:
  """``'pattern' -> spec`` of a resolved rule, for messages."""
  pattern, spec = rule
  return f'({pattern.pattern!r}, {spec!r})'


def _check_spec(spec, where):
  if spec == FSDP:
    return spec
  if spec is None:
    return ()
  if isinstance(spec, PartitionSpec):
    spec = tuple(spec)
  if not isinstance(spec, (tuple, list)):
    raise RunnerError(f'{where}: a spec must be a tuple of mesh axis names'
                      f' / None, or {FSDP!r}; got {spec!r}.')
  out = []
  for entry in spec:
    if entry is None or isinstance(entry, str):
      out.append(entry)
    elif isinstance(entry, (tuple, list)) and all(
        isinstance(a, str) for a in entry):
      out.append(tuple(entry))
    else:
      raise RunnerError(f'{where}: {entry!r} in {spec!r} is not a mesh axis'
                        ' name, a tuple of names, or None.')
  return tuple(out)


def resolve(rules: str | Sequence) -> list:
  """The ``[(compiled pattern, spec)]`` of ``rules``: a preset name, or a
  list of ``(pattern, spec)`` pairs and preset names.

  Raises:
    RunnerError: an unknown preset, a bad pattern or spec.
  """
  if isinstance(rules, str):
    rules = [rules]
  out = []
  for i, rule in enumerate(rules):
    if isinstance(rule, str):
      if rule not in PRESETS:
        raise RunnerError(f'partitioner.rules: unknown preset {rule!r}; the'
                          f' presets are {", ".join(PRESETS)}.')
      out += resolve(PRESETS[rule])
      continue
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and
            isinstance(rule[0], str)):
      validation.fail(f'partitioner.rules[{i}]', 'a (pattern, spec) pair or'
                      ' a preset name', rule)
    pattern = validation.check_regex(f'partitioner.rules[{i}]', rule[0])
    out.append((pattern, _check_spec(rule[1], f'partitioner.rules[{i}]')))
  return out


def _fsdp(shape, axes):
  n = axes.get(DATA_AXIS, 1)
  if n <= 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return PartitionSpec()
  dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in dims:
    if shape[d] % n == 0:
      return PartitionSpec(*([None] * d), DATA_AXIS)
  return PartitionSpec()


def _mesh_text(axes):
  return '{' + ', '.join(f'{k!r}: {v}' for k, v in axes.items()) + '}'


def spec_for(path: str, shape: Sequence[int], rules: list,
             axes: Mapping[str, int]) -> PartitionSpec:
  """The ``PartitionSpec`` of the array at ``path`` with ``shape`` on a mesh
  of ``axes`` (``{name: size}``), under resolved ``rules``.

  Raises:
    RunnerError: the matching rule cannot split this array.
  """
  shape = tuple(shape)
  if not shape:
    return PartitionSpec()
  for rule in rules:
    pattern, spec = rule
    if not pattern.search(path):
      continue
    if spec == FSDP:
      return _fsdp(shape, axes)
    problem = None
    if len(spec) > len(shape):
      problem = f'the rule has {len(spec)} entries for {len(shape)} dimensions'
    else:
      for dim, entry in enumerate(spec):
        names = (entry,) if isinstance(entry, str) else (entry or ())
        unknown = [a for a in names if a not in axes]
        if unknown:
          problem = f'axis {unknown[0]!r} is not in the mesh'
          break
        size = math.prod(axes[a] for a in names)
        if shape[dim] % size:
          problem = (f'dimension {dim} ({shape[dim]}) is not divisible by'
                     f' {"x".join(names)} ({size})')
          break
    if problem:
      raise RunnerError(
          f'partition rule {describe_rule(rule)} cannot split {path} of'
          f' shape {shape} on the mesh {_mesh_text(axes)}: {problem}.')
    return PartitionSpec(*spec)
  return PartitionSpec()


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_of(keys) -> str:
  """``'a/b/0'`` of a ``jax.tree_util`` key path."""
  return '/'.join(_key_name(k) for k in keys)


def tree_specs(tree: Any, rules: list, axes: Mapping[str, int]) -> Any:
  """``tree`` with every array leaf replaced by its ``PartitionSpec``
  (leaves need ``.shape``: arrays or ``jax.ShapeDtypeStruct``)."""
  return jax.tree_util.tree_map_with_path(
      lambda keys, x: spec_for(path_of(keys), getattr(x, 'shape', ()),
                               rules, axes), tree)
