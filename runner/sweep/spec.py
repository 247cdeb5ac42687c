"""Sweep files: gin-style bindings whose values are the choices to try.

A sweep file holds one binding per statement, as in a gin file, but each
value is a list of the values to try, or a distribution to sample from::

    # lr x seed: 6 trials (the default mode is the product)
    optimizer.learning_rate = [1e-3, 3e-3, 1e-2]
    train.seed = [0, 1]

    sweep.mode = 'zip'       # 'product' (default), 'zip' or 'random'
    sweep.samples = 12       # random: how many trials
    sweep.seed = 0           # random: the sampler's seed
    optimizer.learning_rate = loguniform(1e-4, 1e-1)
    train.batch_size = choice([32, 64, 128])   # the same as [32, 64, 128]
    mlp.features = [(32,), (64, 64)]          # a list of lists/tuples

Values are gin values (numbers, strings in quotes, tuples, ``@refs()``,
``%MACROS``), read with gin's own parser. A binding whose value is itself
a list is swept over a list of lists. Distributions: ``uniform(lo, hi)``,
``loguniform(lo, hi)``, ``intuniform(lo, hi)`` (both ends included),
``choice([...])``; only ``random`` and the Optuna search sample them.
``sweep.*`` settings are not bindings. Fixed bindings belong to the base
(``--gin_file``, ``--gin.X=V``), not to the sweep file.

    >>> spec = parse_text("a.x = [1, 2]\\nb.y = ['p', 'q']\\n", 'demo.sweep')
    >>> [t.bindings for t in expand(spec)]  # doctest: +NORMALIZE_WHITESPACE
    [{'a.x': '1', 'b.y': "'p'"}, {'a.x': '1', 'b.y': "'q'"},
     {'a.x': '2', 'b.y': "'p'"}, {'a.x': '2', 'b.y': "'q'"}]
    >>> expand(parse_text("a.x = [1, 2]\\nb.y = [3, 4]\\nsweep.mode = 'zip'"))[1].label
    'x=2,y=4'
"""

import ast
import dataclasses
import itertools
import math
import random
import re
import tokenize

import gin.config_parser

from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['Axis', 'Distribution', 'SweepSpec', 'TrialSpec', 'MODES',
           'parse_file', 'parse_text', 'expand', 'merge', 'label_of',
           'format_value']

MODES = ('product', 'zip', 'random')
DISTRIBUTIONS = ('uniform', 'loguniform', 'intuniform', 'choice')
_SETTINGS = {'mode': str, 'samples': int, 'seed': int}
_DIST_RE = re.compile(r'^(\w+)\s*\((.*)\)\s*$', re.S)
_KEY_RE = re.compile(r'^%?[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*$')


class _Text:
  """A gin reference or macro, kept as its source text."""

  def __init__(self, text):
    self.text = text

  def __repr__(self):
    return self.text

  def __eq__(self, other):
    return isinstance(other, _Text) and other.text == self.text

  def __hash__(self):
    return hash(self.text)


class _AsText(gin.config_parser.ParserDelegate):

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _Text(f'@{scoped_configurable_name}{"()" if evaluate else ""}')

  def macro(self, macro_name):
    return _Text(f'%{macro_name}')


def format_value(value) -> str:
  """The gin text of a parsed value (``repr``; references as written)."""
  return repr(value)


@dataclasses.dataclass(frozen=True)
class Distribution:
  """``kind`` of :data:`DISTRIBUTIONS` with its arguments."""
  kind: str
  args: tuple

  def sample(self, rng: random.Random):
    if self.kind == 'choice':
      return rng.choice(self.args[0])
    lo, hi = self.args
    if self.kind == 'uniform':
      return rng.uniform(lo, hi)
    if self.kind == 'loguniform':
      return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(lo, hi)  # intuniform: both ends included


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept binding: ``key`` and its ``values`` (a list) or a
  ``Distribution``; ``where`` is ``file:line`` for errors."""
  key: str
  values: object
  where: str


@dataclasses.dataclass
class SweepSpec:
  """A parsed sweep file."""
  axes: list
  mode: str = 'product'
  samples: int | None = None
  seed: int = 0
  source: str = '<sweep>'


@dataclasses.dataclass(frozen=True)
class TrialSpec:
  """One trial: ``bindings`` ``{key: gin value text}``, a readable label,
  and where each key comes from (``{key: 'file:line'}``)."""
  bindings: dict
  label: str
  where: dict = dataclasses.field(default_factory=dict, compare=False)


def _statements(text: str):
  """``(line number, statement text)`` of ``text``: comments dropped,
  statements joined across lines while a bracket or string is open."""
  out, current, start, depth, quote = [], [], 0, 0, None
  for number, line in enumerate(text.split('\n'), 1):
    kept, escape = [], False
    for ch in line:
      if quote:
        kept.append(ch)
        if escape:
          escape = False
        elif ch == '\\':
          escape = True
        elif ch == quote:
          quote = None
        continue
      if ch == '#':
        break
      if ch in '\'"':
        quote = ch
      elif ch in '([{':
        depth += 1
      elif ch in ')]}':
        depth -= 1
      kept.append(ch)
    piece = ''.join(kept).strip()
    if piece:
      if not current:
        start = number
      current.append(piece)
    if current and depth <= 0 and not quote:
      out.append((start, ' '.join(current)))
      current, depth = [], 0
  if current:
    out.append((start, ' '.join(current)))
  return out


def _parse_gin_value(text: str, where: str):
  try:
    parser = gin.config_parser.ConfigParser(text, _AsText())
    value = parser.parse_value()
    token = parser.current_token
    if token.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
      raise SyntaxError(f'unexpected {token.string!r} after the value')
  except Exception as e:  # pylint: disable=broad-except
    what = getattr(e, 'msg', None) or str(e).strip().split('\n')[0]
    raise RunnerError(f'{where}: cannot parse the value {text!r}: {what}'
                      ' (strings need quotes).') from None
  return value


def _distribution(name: str, args_text: str, where: str) -> Distribution:
  if name == 'choice':
    values = _parse_gin_value(args_text, where)
    if not isinstance(values, (list, tuple)) or not values:
      raise RunnerError(f'{where}: choice() takes a non-empty list, e.g.'
                        ' choice([32, 64]).')
    return Distribution('choice', (list(values),))
  try:
    args = ast.literal_eval(f'({args_text},)')
  except (ValueError, SyntaxError):
    args = None
  if (not args or len(args) != 2 or
      not all(isinstance(a, (int, float)) and not isinstance(a, bool)
              for a in args)):
    raise RunnerError(f'{where}: {name}() takes two numbers (low, high), got'
                      f' ({args_text}).')
  lo, hi = args
  if not lo < hi:
    raise RunnerError(f'{where}: {name}({lo}, {hi}): low must be below high.')
  if name == 'loguniform' and lo <= 0:
    raise RunnerError(f'{where}: loguniform({lo}, {hi}): both ends must be'
                      ' > 0.')
  if name == 'intuniform' and not all(isinstance(a, int) for a in args):
    raise RunnerError(f'{where}: intuniform({lo}, {hi}) takes integers.')
  return Distribution(name, (lo, hi))


def parse_text(text: str, source: str = '<sweep>') -> SweepSpec:
  """Parses a sweep file's text (``source`` names it in errors).

  Raises:
    RunnerError: a malformed statement, value or ``sweep.*`` setting, a
      binding given twice, or a mode that does not fit the values.
  """
  spec = SweepSpec(axes=[], source=source)
  seen = {}
  for number, statement in _statements(text):
    where = f'{source}:{number}'
    if statement.startswith('import ') or statement.startswith('include '):
      raise RunnerError(f'{where}: {statement.split()[0]} belongs in a gin'
                        ' file given with --gin_file (a sweep file holds only'
                        ' swept bindings).')
    if '=' not in statement:
      raise RunnerError(f'{where}: expected KEY = [VALUES...], got'
                        f' {statement!r}.')
    key, value_text = (s.strip() for s in statement.split('=', 1))
    if not _KEY_RE.match(key):
      raise RunnerError(f'{where}: {key!r} is not a gin binding name.')
    if key.startswith('sweep.'):
      name = key[len('sweep.'):]
      if name not in _SETTINGS:
        from gintrain.runner.errors import did_you_mean  # pylint: disable=g-import-not-at-top
        raise RunnerError(f'{where}: unknown setting {key}'
                          f'{did_you_mean(name, _SETTINGS)} (settings:'
                          f' {", ".join("sweep." + s for s in _SETTINGS)}).')
      value = _parse_gin_value(value_text, where)
      if name == 'mode':
        value = validation.check_choice(f'{where}: {key}', value, MODES)
      else:  # samples, seed
        value = validation.check_int(f'{where}: {key}', value,
                                     1 if name == 'samples' else None)
      setattr(spec, name, value)
      continue
    if key in seen:
      raise RunnerError(f'{where}: {key} is swept twice (also at'
                        f' {seen[key]}).')
    seen[key] = where
    match = _DIST_RE.match(value_text)
    if match and match.group(1) in DISTRIBUTIONS:
      values = _distribution(match.group(1), match.group(2), where)
    else:
      values = _parse_gin_value(value_text, where)
      if not isinstance(values, list):
        raise RunnerError(
            f'{where}: {key} = {value_text}: a sweep value is a list of'
            f' values to try (e.g. {key} = [{value_text}]) or a distribution'
            f' ({", ".join(d + "()" for d in DISTRIBUTIONS)}); a fixed value'
            f' goes in the base: --gin.{key}={value_text}.')
    spec.axes.append(Axis(key, values, where))
  return spec


def parse_file(path: str) -> SweepSpec:
  """Reads and parses the sweep file ``path``.

  Raises:
    RunnerError: the file is unreadable or malformed.
  """
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise RunnerError(f'sweep file {path}: {e.strerror or e}.') from None
  return parse_text(text, path)


def label_of(bindings: dict) -> str:
  """``lr=0.001,seed=0``: each key's last part and its value, short.

    >>> label_of({'optimizer.learning_rate': '0.001', 'mlp.features': '(32,)'})
    'learning_rate=0.001,features=(32,)'
  """
  parts = []
  for key, value in bindings.items():
    name = key.rsplit('.', 1)[-1].lstrip('%')
    if isinstance(value, str) and re.fullmatch(r'-?[\d.]+(e-?\d+)?', value):
      number = float(value)
      value = f'{number:.4g}' if '.' in value or 'e' in value else value
    parts.append(f'{name}={value}')
  return ','.join(parts)


def _trial(pairs, source_where) -> TrialSpec:
  bindings = {key: format_value(value) for key, value in pairs}
  return TrialSpec(bindings, label_of(bindings),
                   {key: source_where[key] for key, _ in pairs})


def expand(spec: SweepSpec) -> list:
  """The trials of ``spec``, in a stable order.

  Raises:
    RunnerError: an empty product (a binding with no values), zip axes of
      different lengths, distributions outside ``random`` mode, or no
      ``sweep.samples`` in ``random`` mode.
  """
  where = {a.key: a.where for a in spec.axes}
  if not spec.axes:
    raise RunnerError(f'{spec.source}: no swept bindings (an empty product:'
                      ' write KEY = [VALUES...]).')
  if spec.mode == 'random':
    if spec.samples is None:
      raise RunnerError(f'{spec.source}: sweep.mode = \'random\' needs'
                        ' sweep.samples = N.')
    rng = random.Random(spec.seed)
    trials = []
    for _ in range(spec.samples):
      pairs = []
      for axis in spec.axes:
        dist = axis.values if isinstance(axis.values, Distribution) else (
            Distribution('choice', (axis.values,)))
        if dist.kind == 'choice' and not dist.args[0]:
          raise RunnerError(f'{axis.where}: {axis.key} = []: nothing to'
                            ' sample.')
        pairs.append((axis.key, dist.sample(rng)))
      trials.append(_trial(pairs, where))
    return trials
  for axis in spec.axes:
    if isinstance(axis.values, Distribution):
      raise RunnerError(f'{axis.where}: {axis.key} = {axis.values.kind}(...)'
                        f' is sampled only with sweep.mode = \'random\' or'
                        f' --search=optuna (the mode is {spec.mode!r}).')
    if not axis.values:
      raise RunnerError(f'{axis.where}: {axis.key} = [] has no values: the'
                        f' {spec.mode} is empty (no trials).')
  if spec.mode == 'zip':
    lengths = {a.key: len(a.values) for a in spec.axes}
    if len(set(lengths.values())) > 1:
      raise RunnerError(f'{spec.source}: sweep.mode = \'zip\' needs lists of'
                        ' one length, got ' + ', '.join(
                            f'{k}: {n}' for k, n in lengths.items()) + '.')
    rows = zip(*(a.values for a in spec.axes))
  else:
    rows = itertools.product(*(a.values for a in spec.axes))
  keys = [a.key for a in spec.axes]
  return [_trial(list(zip(keys, row)), where) for row in rows]


def merge(trial_lists) -> list:
  """The trials of several sweep files, duplicates (same bindings) once."""
  out, seen = [], set()
  for trials in trial_lists:
    for trial in trials:
      key = tuple(sorted(trial.bindings.items()))
      if key not in seen:
        seen.add(key)
        out.append(trial)
  return out
