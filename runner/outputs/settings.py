"""The resolved settings of a run, as an ``ml_collections.FrozenConfigDict``.

Four sections: ``gin`` (every parsed binding, nested by its dotted name),
``flags`` (the runner's flags), ``versions`` (Python and the main
packages) and ``devices`` (the topology). They are saved as
``<workdir>/settings.json``, written as hyperparameters next to the metrics,
and compared on resume, where a difference is logged as a warning naming the
changed settings. The workdir may be an object-store URL (``s3://...``;
``lib.storage``)::

    >>> cfg = build({'train.batch_size': 32, '%LR': 0.1}, {'workdir': '/w'},
    ...             versions={'jax': '0.10.2'}, devices={'count': 1})
    >>> cfg.gin.train.batch_size, cfg.gin['%LR']
    (32, 0.1)
    >>> flatten(cfg)['gin.train.batch_size']
    32
    >>> changes(flatten(cfg), {**flatten(cfg), 'gin.train.batch_size': 64})
    ['gin.train.batch_size: 32 -> 64']
"""

import importlib.metadata
import json
import os
import platform
from typing import Any, Mapping

import ml_collections

from gintrain.lib import storage
from gintrain.runner.outputs import workdir as workdir_lib

__all__ = ['SETTINGS_FILE', 'build', 'flatten', 'changes', 'load', 'save',
           'package_versions', 'device_topology', 'IGNORED_ON_RESUME']

SETTINGS_FILE = workdir_lib.SETTINGS_FILE
# Flags that legitimately differ between a run and its resumption. The gin
# input flags are left out too: their effect is compared binding by binding
# in the 'gin' section.
IGNORED_ON_RESUME = frozenset({
    'flags.resume', 'flags.dry_run', 'flags.init_from',
    'flags.allow_config_change',
    'flags.coordinator_address', 'flags.gin_file', 'flags.gin_bindings',
    'flags.gin_search_paths'})
_PACKAGES = ('jax', 'jaxlib', 'optax', 'numpy', 'gin-config', 'ml-collections',
             'msgpack', 'gintrain')


def package_versions() -> dict[str, str]:
  """Python's version and those of the packages the run depends on."""
  out = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name.replace('-', '_')] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name.replace('-', '_')] = 'not installed'
  return out


def device_topology() -> dict[str, Any]:
  """The device topology this process sees."""
  import jax  # pylint: disable=g-import-not-at-top
  return {'platform': jax.default_backend(),
          'kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count(),
          'local_device_count': jax.local_device_count(),
          'process_count': jax.process_count()}


def _nest(flat: Mapping[str, Any]) -> dict:
  """``{'a.b.c': v}`` -> ``{'a': {'b': {'c': v}}}``; macros (``%X``) and
  keys that would clash with a deeper one stay flat."""
  out: dict = {}
  for key, value in flat.items():
    parts = [key] if key.startswith('%') else key.split('.')
    node = out
    for part in parts[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        node = None
        break
      node = child
    if node is None or isinstance(node.get(parts[-1]), dict):
      out[key] = value
    else:
      node[parts[-1]] = value
  return out


def _plain(value):
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return str(value)


def build(gin_bindings: Mapping[str, Any], flag_values: Mapping[str, Any],
          versions: Mapping[str, str] | None = None,
          devices: Mapping[str, Any] | None = None
          ) -> ml_collections.FrozenConfigDict:
  """The run's settings (``versions``/``devices`` default to this process's)."""
  return ml_collections.FrozenConfigDict({
      'gin': _nest(gin_bindings),
      'flags': {k: _plain(v) for k, v in flag_values.items()},
      'versions': dict(package_versions() if versions is None else versions),
      'devices': dict(device_topology() if devices is None else devices),
  })


def _to_dict(cfg) -> dict:
  if isinstance(cfg, (ml_collections.ConfigDict,
                      ml_collections.FrozenConfigDict)):
    return cfg.to_dict()
  return dict(cfg)


def flatten(cfg) -> dict[str, Any]:
  """``{'section.key...': value}`` with JSON-comparable values (lists)."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f'{prefix}{key}.')
      else:
        out[f'{prefix}{key}'] = (list(value) if isinstance(value, tuple)
                                 else value)

  walk(_to_dict(cfg), '')
  return json.loads(json.dumps(out))


def changes(old: Mapping[str, Any], new: Mapping[str, Any],
            ignore=IGNORED_ON_RESUME) -> list[str]:
  """``'key: old -> new'`` for each flattened setting that differs."""
  out = []
  for key in sorted(set(old) | set(new)):
    if key in ignore:
      continue
    before, after = old.get(key, '<unset>'), new.get(key, '<unset>')
    if before != after:
      out.append(f'{key}: {before} -> {after}')
  return out


def load(workdir: str) -> dict | None:
  """The flattened settings saved in ``workdir``, or None if there are none
  (or the file is unreadable, which is logged by the caller)."""
  try:
    return flatten(json.loads(storage.read_text(
        workdir_lib.path(workdir, SETTINGS_FILE))))
  except FileNotFoundError:
    return None


def save(workdir: str, cfg) -> str:
  """Writes ``cfg`` as ``<workdir>/settings.json`` (atomically)."""
  text = json.dumps(_to_dict(cfg), indent=2, sort_keys=True,
                    default=str) + '\n'
  return workdir_lib.write_text(workdir, SETTINGS_FILE, text,
                                activity='saving the settings')
