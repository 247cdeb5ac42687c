"""Gin for the runner: search paths, parsing, one-line errors, config dumps.

Files given with ``--gin_file`` are looked up as given (relative to the
working directory), then in each ``--gin_search_paths`` entry, then in the
shipped ``gin/`` folder (package data of ``gintrain.gin``), which is always
searched (so ``--gin_file=models/cnn.gin`` works from anywhere).
``include`` statements inside gin files look in the working directory (gin's
own rule), then ``--gin_search_paths``, then ``gin/``. While a
``--gin_file`` is parsed, its own folder is first on ``sys.path``, so its
``import`` lines find modules that sit next to it. Only gin's public API
is used: a registered file reader for the search paths, and gin's own
parser to read the bindings back from ``gin.config_str()``.

Every gin fault becomes a :class:`runner.errors.RunnerError` whose one-line
message names the place (``file:line`` or the ``--gin_bindings`` entry) and,
for unknown names, the closest known one.
"""

import contextlib
import importlib.resources
import importlib.util
import inspect
import logging
import os
import re
import sys
import tokenize

import gin
import gin.config_parser

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


# The directories searched for gin files, in order (see add_search_paths).
_SEARCH: list[str] = []


def _in_search_paths(path: str) -> str | None:
  if os.path.isabs(path):
    return None
  for folder in _SEARCH:
    candidate = os.path.join(folder, path)
    if os.path.isfile(candidate):
      return candidate
  return None


def _open_in_search_paths(path: str):
  return open(_in_search_paths(path), encoding='utf-8')


class _QuietGinProbe(logging.Filter):
  """Drops gin's resource-reader probe lines ("Path not found: run.gin"),
  which it logs for every include it tries as a Python package first."""

  def filter(self, record):
    return not record.pathname.endswith(
        os.path.join('gin', 'resource_reader.py'))


# gin's public hooks: a file reader that looks in _SEARCH (tried after the
# working directory), and a filter for the probe noise.
gin.config.register_file_reader(_open_in_search_paths,
                                lambda p: _in_search_paths(p) is not None)
logging.getLogger().addFilter(_QuietGinProbe())


def add_search_paths(paths) -> None:
  """Makes gin's ``include`` look in the working directory, then ``paths``,
  then the shipped ``gin/`` folder (replacing earlier search paths)."""
  _SEARCH[:] = list(dict.fromkeys(
      [os.path.abspath(p) for p in paths] + [REPO_GIN_DIR]))


def _registered_selectors() -> list[str]:
  """The runner's configurable names, full and without the module."""
  from gintrain.runner.cli import configurables  # pylint: disable=g-import-not-at-top
  names = set(configurables.REGISTERED)
  names |= {n.split('.', 1)[1] for n in configurables.REGISTERED}
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
      with _importable_folder(path):
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


@contextlib.contextmanager
def _importable_folder(path: str):
  """While parsing ``path``, its folder comes first on ``sys.path``, so its
  ``import`` lines find modules next to it (a shipped gin/ file's folder is
  left alone: it holds no modules). Imported modules stay imported."""
  folder = os.path.dirname(os.path.abspath(path))
  if folder == REPO_GIN_DIR or folder.startswith(REPO_GIN_DIR + os.sep):
    yield
    return
  sys.path.insert(0, folder)
  try:
    yield
  finally:
    try:
      sys.path.remove(folder)  # the first occurrence: the one added here
    except ValueError:
      pass


def _find(name: str, search_paths) -> str:
  candidates = [name] if os.path.isabs(name) else [name] + [
      os.path.join(p, name) for p in (*search_paths, REPO_GIN_DIR)]
  for path in candidates:
    if os.path.isfile(path):
      return path
  searched = ', '.join(dict.fromkeys(
      os.path.dirname(os.path.abspath(c)) or '.' for c in candidates))
  raise RunnerError(f'--gin_file={name}: no such file (searched {searched}).')


class _Ref:
  """A configurable reference or macro, kept as its gin source text."""

  def __init__(self, text):
    self.text = text

  def __repr__(self):
    return self.text


class _AsText(gin.config_parser.ParserDelegate):
  """Parses references and macros into their source text (no lookups)."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _Ref(f'@{scoped_configurable_name}{"()" if evaluate else ""}')

  def macro(self, macro_name):
    return _Ref(f'%{macro_name}')


def _bindings():
  """``[(binding key, value)]`` of the parsed config, macros included,
  read back from ``gin.config_str()`` with gin's own parser."""
  out = []
  parser = gin.config_parser.ConfigParser(gin.config_str(), _AsText())
  for statement in parser:
    if not isinstance(statement, gin.config_parser.BindingStatement):
      continue
    prefix = f'{statement.scope}/' if statement.scope else ''
    if not statement.arg_name:  # a macro: NAME = value
      out.append((f'%{prefix}{statement.selector}', statement.value))
      continue
    out.append((f'{prefix}{statement.selector}.{statement.arg_name}',
                statement.value))
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
  return repr(value)


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
