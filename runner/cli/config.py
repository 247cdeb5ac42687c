"""Gin for the runner: search paths, parsing, one-line errors, config dumps.

Files given with ``--gin_file`` are looked up as given (relative to the
working directory), then in each ``--gin_search_paths`` entry, then in the
repository's ``gin/`` folder, which is always searched (so
``--gin_file=models/cnn.gin`` works from anywhere). ``include`` statements
inside gin files search ``--gin_search_paths``, then ``gin/``, then the
working directory.

Every gin fault becomes a :class:`runner.errors.RunnerError` whose one-line
message names the place (``file:line`` or the ``--gin_bindings`` entry) and,
for unknown names, the closest known one.
"""

import importlib.resources
import importlib.util
import inspect
import os
import re
import tokenize

import gin

from gintrain.runner.errors import RunnerError, did_you_mean

__all__ = ['REPO_GIN_DIR', 'DEFAULT_GIN_FILE', 'parse', 'unset_required',
           'check_required', 'finalize', 'bound_parameters', 'config_str',
           'operative_config_str', 'add_search_paths', 'format_gin_error']



def _gin_dir() -> str:
  """The folder of the shipped configs: package data of ``gintrain.gin``.

  A regular install holds them in ``site-packages/gintrain/gin``; an editable
  one maps the package to the repository's ``gin/``. ``gintrain.gin`` is a
  namespace package (``gin/`` has no ``__init__.py``, so running from the
  repository never shadows gin-config's ``gin``), which
  ``importlib.resources`` reads unless setuptools' editable finder put a
  non-directory entry on its path; then the directories on that path are
  taken directly.
  """
  try:
    default = importlib.resources.files('gintrain.gin') / DEFAULT_GIN_FILE
    if isinstance(default, os.PathLike) and os.path.isfile(default):
      return os.path.dirname(os.fspath(default))
  except (NotADirectoryError, TypeError, ModuleNotFoundError):
    pass
  spec = importlib.util.find_spec('gintrain.gin')
  for folder in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isfile(os.path.join(folder, DEFAULT_GIN_FILE)):
      return folder
  # Not installed (run from a source tree on PYTHONPATH): the sibling gin/.
  return os.path.abspath(
      os.path.join(os.path.dirname(__file__), os.pardir, 'gin'))


DEFAULT_GIN_FILE = 'default.gin'
REPO_GIN_DIR = _gin_dir()
_REQUIRED = '%gin.REQUIRED'

_FILE_LOCATION_RE = re.compile(r'In file "([^"]*)", line (\d+)')
_BINDING_LOCATION_RE = re.compile(r'In bindings string line (\d+)')
_UNKNOWN_CONFIGURABLE_RE = re.compile(
    r"No configurable matching (?:reference )?'@?([^'()]+)(?:\(\))?'")
_BAD_TOKEN_RE = re.compile(r"Failed to parse token '([^']*)'")
_UNKNOWN_PARAMETER_RE = re.compile(
    r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")


def add_search_paths(paths) -> None:
  """Makes gin's ``include`` look in ``paths``, then ``gin/``, then ``.``.

  Idempotent. The working directory comes last (gin's default puts it
  first): a name not found there is also tried as a Python package resource,
  which imports the package named by its directory and logs an error, so the
  known directories go first.
  """
  # gin keeps its search path in a module list; adding is public, but to
  # keep this order across repeated runs in one process the list is
  # rewritten here.
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  wanted = [os.path.abspath(p) for p in paths] + [REPO_GIN_DIR]
  prefixes[:] = wanted + [p for p in prefixes if p not in wanted]


def _registered_selectors() -> list[str]:
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  names = set()
  for selector, _ in registry.items():
    if selector.startswith('gin.'):
      continue
    names.add(selector)
    names.add(registry.minimal_selector(selector))
  return sorted(names)


def _parameter_names(selector: str) -> list[str]:
  try:
    fn = gin.get_configurable(selector)
  except (ValueError, KeyError):
    return []
  fn = inspect.unwrap(fn)
  if inspect.isclass(fn):
    fn = fn.__init__
  try:
    return [p for p in inspect.signature(fn).parameters if p != 'self']
  except (TypeError, ValueError):
    return []


def _first_line(message: str) -> str:
  return message.strip().split('\n')[0].strip()


def format_gin_error(error: BaseException, source: str) -> str:
  """One line for a gin parsing error raised while reading ``source``.

  Args:
    error: the exception gin raised.
    source: the file being parsed, or ``--gin_bindings '<binding>'``.
  """
  message = str(error)
  place = source
  match = _FILE_LOCATION_RE.search(message)
  if match:
    place = f'{match.group(1)}:{match.group(2)}'
  elif _BINDING_LOCATION_RE.search(message):
    code = message.strip().split('\n')
    text = code[2].strip() if len(code) > 2 else ''
    place = f'--gin_bindings {text!r}' if text else source
  if isinstance(error, SyntaxError) and error.lineno is not None:
    filename = error.filename
    if filename and os.path.exists(filename):
      place = f'{filename}:{error.lineno}'
    what = error.msg or 'invalid syntax'
    token = _BAD_TOKEN_RE.search(what)
    if token:
      what = (f'cannot parse the value {token.group(1)!r} (a string needs'
              f' quotes: "{token.group(1)}")')
    elif error.text and place != source:
      what = f'{what.rstrip(".")} in {error.text.strip()!r}'
    return f'{place}: gin syntax error: {what}'
  if isinstance(error, tokenize.TokenError):
    what, (line, _) = error.args[0], error.args[1]
    return (f'{source}:{line}: gin syntax error: {what} (an unclosed'
            ' bracket or quote?)')
  first = _first_line(message)
  match = _UNKNOWN_PARAMETER_RE.search(first)
  if match:
    selector, param = match.groups()
    first += did_you_mean(param, _parameter_names(selector))
  else:
    match = _UNKNOWN_CONFIGURABLE_RE.search(first)
    if match:
      name = match.group(1)
      first += did_you_mean(name, _registered_selectors())
  if isinstance(error, ImportError):
    first = f'cannot import: {first}'
  return f'{place}: {first}'


def parse(gin_files, gin_bindings, search_paths=()) -> list[str]:
  """Clears gin and parses ``gin_files`` then ``gin_bindings``, in order.

  Later files and bindings override earlier ones. The config is not
  finalized (so unset ``%gin.REQUIRED`` can still be listed); call
  :func:`finalize` next.

  Returns:
    The files parsed, as found on the search path.

  Raises:
    RunnerError: a missing file, a syntax error (``file:line``), an unknown
      configurable, parameter or module (with a suggestion).
  """
  gin.clear_config()
  add_search_paths(search_paths)
  found = []
  for name in gin_files:
    path = _find(name, search_paths)
    try:
      gin.parse_config_file(os.path.abspath(path))
    except Exception as e:  # pylint: disable=broad-except
      raise RunnerError(format_gin_error(e, path)) from e
    found.append(path)
  for binding in gin_bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:  # pylint: disable=broad-except
      raise RunnerError(
          format_gin_error(e, f'--gin_bindings {binding!r}')) from e
  return found


def _find(name: str, search_paths) -> str:
  candidates = [name] if os.path.isabs(name) else [name] + [
      os.path.join(p, name) for p in (*search_paths, REPO_GIN_DIR)]
  for path in candidates:
    if os.path.isfile(path):
      return path
  searched = ', '.join(dict.fromkeys(
      os.path.dirname(os.path.abspath(c)) or '.' for c in candidates))
  raise RunnerError(f'--gin_file={name}: no such file (searched {searched}).')


def _bindings():
  """``[(binding key, value)]`` of the parsed config, macros included."""
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  out = []
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector == 'gin.macro':
      out.append((f'%{scope}', params.get('value')))
      continue
    name = registry.minimal_selector(selector)
    prefix = f'{scope}/' if scope else ''
    for param, value in params.items():
      out.append((f'{prefix}{name}.{param}', value))
  return out


def unset_required() -> list[str]:
  """Binding keys still set to ``%gin.REQUIRED``, sorted."""
  return sorted(key for key, value in _bindings() if str(value) == _REQUIRED)


def check_required() -> None:
  """Raises a RunnerError listing every binding left at ``%gin.REQUIRED``."""
  missing = unset_required()
  if missing:
    raise RunnerError(
        'unset %gin.REQUIRED: ' + ', '.join(missing) + '; bind them in a'
        ' --gin_file or with --gin.NAME=VALUE (e.g. --gin.' + missing[0]
        + '=...).')


def finalize() -> None:
  """Checks REQUIRED bindings and references, then locks the config."""
  check_required()
  try:
    gin.finalize()
  except Exception as e:  # pylint: disable=broad-except
    raise RunnerError(format_gin_error(e, 'gin config')) from e


def _plain(value):
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return gin.config._format_value(value)  # pylint: disable=protected-access


def bound_parameters() -> dict:
  """``{binding key: value}`` of the parsed config; values that are not
  plain scalars are given as gin source text (``'@models.mlp()'``)."""
  return {key: _plain(value) for key, value in _bindings()}


def config_str() -> str:
  """The parsed config, as gin text."""
  return gin.config_str()


def operative_config_str() -> str:
  """The parameters actually used so far (defaults included), as gin text."""
  return gin.operative_config_str()
