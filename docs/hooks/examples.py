"""MkDocs hook: every example in the docs still matches the code.

Run by ``mkdocs build`` (mkdocs.yml's ``hooks``) before the site is built. It
reads the code of README.md and ``docs/**/*.md`` (not the generated pages)
without running anything: the commands of shell blocks (``console`` blocks:
the ``$`` lines; not ``text`` or Python blocks), gin blocks (``gin``, or a
first line ``# NAME.gin``) and inline code spans. It logs one
warning per stale piece, ``FILE:LINE: what is wrong``, which strict mode
turns into a failed build:

- ``gintrain SUBCOMMAND``: the subcommand exists (``main.TOOLS`` or
  ``eval``);
- ``--flag``: a flag of that command: the runner's absl flags for training
  and ``eval``, the argparse parser of a subcommand (and of its own
  subcommands), the runner's flags again for what ``gintrain sweep`` passes
  on; a span of flags alone may name a flag of any command (XLA's
  ``--xla_*`` and hyphenated ones, other tools', are left alone);
- ``--gin.X.y=V``, ``--gin_bindings``/``--gin_param`` and the bindings of a
  gin file shown on the page: ``X`` is a registered configurable (or one a
  Python block of the page defines with ``@gin.configurable``), ``y`` one of
  its parameters, and each ``@reference`` in ``V`` a configurable;
- ``--gin_file=F`` (and ``include 'F'``): ``F`` is a shipped config under
  ``gin/``, a file of the repository, or a file the page itself writes;
- ``bench/...`` and ``launch/...`` paths exist, and a ``python bench/X.py
  --flag`` names a flag the script mentions.

The parsers are the real ones: each subcommand's ``main`` is called with its
``--help`` and stopped at its first ``parse_args``/``parse_known_args``,
which hands over the parser it built.
"""

import argparse
import ast
import dataclasses
import functools
import glob
import importlib
import importlib.util
import inspect
import logging
import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
log = logging.getLogger('mkdocs.hooks.examples')

_FENCE = re.compile(r'^(\s*)(`{3,}|~{3,})\s*([\w+-]*)')
_SPAN = re.compile(r'(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)')
_SCRIPT_PATH = re.compile(r'(?<![\w./~$-])((?:bench|launch)/[\w./-]*)')
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_BINDING = re.compile(r'^\s*(?:[\w.]+/)?([A-Za-z_][\w.]*)\.(\w+)\s*=(.*)$',
                      re.S)
_GIN_LINE = re.compile(r'^(?:[\w.]+/)?([A-Za-z_][\w.]*)\.(\w+)\s*=(.*)$')
_INCLUDE = re.compile(r"""^include\s+['"]([^'"]+)['"]""")
_REFERENCE = re.compile(r'@(?:[\w.]+/)?([A-Za-z_][\w.]*)')
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_WRITES = re.compile(r"""(?:>>?|\btee\s+(?:-a\s+)?)\s*['"]?([^\s'"|;&)]+)"""
                     r"""|open\(\s*f?['"]([^'"]+)['"]\s*,\s*['"][wa]""")
_TRAIN_MODULES = ('gintrain.runner.train', 'gintrain.runner.cli.main')
# absl's own flags, defined only once an app parses its command line.
_ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'helpxml', 'flagfile',
               'undefok', 'only_check_args'}
_PLACEHOLDER = {'...', '..', '…'}


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str  # relative to the repository
  line: int
  what: str

  def __str__(self):
    return f'{self.path}:{self.line}: {self.what}'


# --- What the code defines -------------------------------------------------
# (imported when first needed: mkdocs imports hooks while reading its config)


def _cli():
  """``gintrain.runner.cli.main`` (its import defines every flag)."""
  from gintrain.runner.cli import main  # pylint: disable=g-import-not-at-top
  return main


def did_you_mean(word, choices) -> str:
  from gintrain.runner.errors import did_you_mean as closest  # pylint: disable=g-import-not-at-top
  return closest(word, choices)



class _Captured(BaseException):
  """Raised instead of parsing: carries the parser a ``main`` built."""

  def __init__(self, parser, known_only):
    super().__init__()
    self.parser, self.known_only = parser, known_only


@functools.lru_cache(maxsize=None)
def _tool_parser(tool: str, prefix: tuple):
  """``(parser, passes unknown flags on)`` that ``gintrain TOOL PREFIX``
  parses with, or None when its ``main`` builds no argparse parser."""
  cli = _cli()

  def strict(self, *args, **kwargs):
    raise _Captured(self, False)

  def known(self, *args, **kwargs):
    raise _Captured(self, True)

  saved = (argparse.ArgumentParser.parse_args,
           argparse.ArgumentParser.parse_known_args)
  argparse.ArgumentParser.parse_args = strict
  argparse.ArgumentParser.parse_known_args = known
  try:
    cli.TOOLS[tool](list(prefix) + ['--help'])
  except _Captured as captured:
    return captured.parser, captured.known_only
  except (Exception, SystemExit):  # pylint: disable=broad-except
    return None
  finally:
    (argparse.ArgumentParser.parse_args,
     argparse.ArgumentParser.parse_known_args) = saved
  return None


def _runner_flag(name: str):
  """The absl flag ``--name`` of the runner (``--noname`` for a boolean)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  _cli()  # defines the runner's flags
  if name in flags.FLAGS:
    return flags.FLAGS[name]
  if name.startswith('no') and name[2:] in flags.FLAGS and (
      flags.FLAGS[name[2:]].boolean):
    return flags.FLAGS[name[2:]]
  return None


def _runner_flag_names() -> list:
  from absl import flags  # pylint: disable=g-import-not-at-top
  return sorted(set(flags.FLAGS) | _ABSL_FLAGS)


def _options(parser) -> dict:
  """``{'--opt': action}`` of one argparse parser."""
  return {o: a for a in parser._actions for o in a.option_strings}  # pylint: disable=protected-access


def _subparsers(parser):
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      return action
  return None


@functools.lru_cache(maxsize=None)
def _every_flag() -> frozenset:
  """Every flag any command takes (for a span that names flags alone)."""
  cli = _cli()
  names = set(_runner_flag_names())
  parsers = []
  for tool, tool_main in cli.TOOLS.items():
    module = importlib.import_module(tool_main.__module__)
    for prefix in [()] + [(c,) for c in getattr(module, 'COMMANDS', {})]:
      found = _tool_parser(tool, prefix)
      if found:
        parsers.append(found[0])
  while parsers:
    parser = parsers.pop()
    names |= {o.lstrip('-') for o in _options(parser)}
    sub = _subparsers(parser)
    if sub:
      parsers += list(sub.choices.values())
  return frozenset(names)


def _configurable(name: str, plugins: dict):
  """``(parameters, or None for any; error or None)`` of ``name``."""
  import gin  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import configurables  # pylint: disable=g-import-not-at-top
  short = name.rsplit('.', 1)[-1]
  if name in plugins or short in plugins:
    return plugins.get(name, plugins.get(short)), None
  try:
    fn = gin.get_configurable(name)
  except (ValueError, KeyError) as e:
    known = set(configurables.REGISTERED) | {
        n.split('.', 1)[1] for n in configurables.REGISTERED}
    if 'mbiguous' in str(e):
      return None, f"'{name}' matches several configurables: {e}"
    return None, (f"no configurable '{name}'"
                  + did_you_mean(name, known | set(plugins)))
  fn = inspect.unwrap(fn)
  if inspect.isclass(fn):
    fn = fn.__init__
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None, None
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return None, None
  denied = set()
  try:
    from gin import config as gin_config  # pylint: disable=g-import-not-at-top
    denied = set(gin_config._REGISTRY.get_match(name).denylist or ())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    pass
  return [p.name for p in params
          if p.name != 'self' and p.name not in denied and
          p.kind != p.VAR_POSITIONAL], None


def _plugins(python_blocks) -> dict:
  """``{name: parameters or None}`` of what the page's Python blocks
  decorate with ``@gin.configurable``/``@gin.register``."""
  out = {}
  for body in python_blocks:
    try:
      tree = ast.parse(body)
    except SyntaxError:
      continue
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        continue
      for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if ast.unparse(target).split('.')[-1] not in ('configurable',
                                                      'register'):
          continue
        name = node.name
        if isinstance(deco, ast.Call) and deco.args and isinstance(
            deco.args[0], ast.Constant):
          name = deco.args[0].value
        params = None
        fn = node
        if isinstance(node, ast.ClassDef):
          fn = next((n for n in node.body if isinstance(n, ast.FunctionDef)
                     and n.name == '__init__'), None)
        if fn is not None and fn.args.kwarg is None:
          args = fn.args
          params = [a.arg for a in args.posonlyargs + args.args +
                    args.kwonlyargs if a.arg != 'self']
        out[name] = params
  return out


# --- Reading the pages -----------------------------------------------------


@dataclasses.dataclass
class _Page:
  path: str
  lines: list
  blocks: list  # [(language, first body line, [body lines])]
  spans: list  # [(line, text)]

  def line_of(self, start: int, end: int, needle: str) -> int:
    """The first line in [start, end] holding ``needle`` (else ``start``)."""
    for number in range(start, min(end, len(self.lines)) + 1):
      if needle and needle in self.lines[number - 1]:
        return number
    return start


def _read(path: str) -> _Page:
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    lines = f.read().split('\n')
  blocks, prose = [], list(lines)
  i = 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    fence, start = match.group(2), i
    body = []
    i += 1
    while i < len(lines) and not lines[i].strip().startswith(fence):
      body.append(lines[i])
      i += 1
    blocks.append((match.group(3).lower(), start + 2, body))
    for j in range(start, min(i + 1, len(lines))):
      prose[j] = ''
    i += 1
  text = '\n'.join(prose)
  spans = [(text.count('\n', 0, m.start()) + 1, m.group(1))
           for m in _SPAN.finditer(text)]
  return _Page(path, lines, blocks, spans)


def _logical_lines(body: list, first: int):
  """``(first line, last line, text)`` of each shell command line: joined
  at a trailing backslash, heredoc bodies left out."""
  i = 0
  while i < len(body):
    start, text = i, body[i]
    while text.endswith('\\') and i + 1 < len(body):
      i += 1
      text = text[:-1] + ' ' + body[i].strip()
    heredoc = _HEREDOC.search(text)
    if heredoc:
      text = text[:heredoc.start()]
      while i + 1 < len(body) and body[i + 1].strip() != heredoc.group(2):
        i += 1
      i += 1  # the terminator
    yield first + start, first + min(i, len(body) - 1), text
    i += 1


def _commands(text: str):
  """The simple commands of one shell line, each a list of words."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=';&|<>()')
  lexer.whitespace_split = True
  lexer.commenters = '#'
  try:
    words = list(lexer)
  except ValueError:  # an unclosed quote: not shell
    return []
  out, current = [], []
  for word in words:
    if word and set(word) <= set(';&|<>()'):
      if current:
        out.append(current)
      current = []
      if '>' in word or '<' in word:
        current = [None]  # the redirection target is no command
    elif current == [None]:
      current = []
    else:
      current.append(word)
  if current and current != [None]:
    out.append(current)
  return out


# --- The checks ------------------------------------------------------------


class _Checker:
  """Collects the problems of one page."""

  def __init__(self, page: _Page):
    self.page = page
    self.problems = []
    self.plugins = _plugins([b for lang, _, lines in page.blocks
                             if lang in ('python', 'py')
                             for b in ['\n'.join(lines)]])
    self.written = set()
    for _, _, body in page.blocks:
      if body and re.fullmatch(r'#\s*\S+\.\w+\s*', body[0]):
        self.written.add(os.path.basename(body[0].lstrip('#').strip()))
      for line in body:
        for match in _WRITES.finditer(line):
          self.written.add(os.path.basename(match.group(1) or match.group(2)))
    self.span = (0, 0)

  def report(self, what: str, needle: str = ''):
    start, end = self.span
    self.problems.append(Problem(self.page.path,
                                 self.page.line_of(start, end, needle), what))

  # Pieces that need no command.
  def binding(self, text: str, where: str):
    for statement in text.split('\n'):
      match = _BINDING.match(statement)
      if not match or statement.strip().startswith(('import ', 'include ')):
        continue
      name, param, value = match.groups()
      params, error = _configurable(name, self.plugins)
      if error:
        self.report(f'{where}: {error}', name)
      elif params is not None and param not in params:
        self.report(f"{where}: configurable '{name}' has no parameter"
                    f" '{param}'" + did_you_mean(param, params), param)
      for ref in _REFERENCE.findall(_QUOTED.sub('', value)):
        _, error = _configurable(ref, self.plugins)
        if error:
          self.report(f'{where}: @{ref}: {error}', ref)

  def gin_file(self, name: str, where: str):
    if '://' in name or not name or any(c in name for c in '<>*$'):
      return
    candidates = [os.path.join(REPO, 'gin', name), os.path.join(REPO, name),
                  name]
    if any(os.path.isfile(c) for c in candidates):
      return
    if os.path.basename(name) in self.written:
      return
    self.report(f'{where}: no such gin file (not under gin/, not in the'
                ' repository, not written by this page)', name)

  def script_paths(self, text: str):
    for path in _SCRIPT_PATH.findall(text):
      path = path.rstrip('.,:')
      if not os.path.exists(os.path.join(REPO, path)):
        self.report(f'{path}: no such file in the repository', path)

  # Commands.
  def command(self, words: list):
    i = 0
    while i < len(words):
      word = words[i]
      if word == 'gintrain' or word.endswith('/gintrain'):
        self.gintrain(words[i + 1:], 'gintrain')
        return
      if re.fullmatch(r'python(3(\.\d+)?)?', os.path.basename(word)):
        rest = words[i + 1:]
        if rest[:1] == ['-m'] and len(rest) > 1:
          self.module(rest[1], rest[2:])
        elif rest and re.match(r'(bench|launch)/', rest[0]):
          self.bench(rest[0], rest[1:])
        return
      i += 1

  def module(self, module: str, argv: list):
    if not module.startswith('gintrain'):
      return
    try:
      found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
      found = None
    if found is None:
      self.report(f'python -m {module}: no such module', module)
      return
    cli = _cli()
    if module in _TRAIN_MODULES:
      self.absl(argv, f'python -m {module}')
      return
    for tool, tool_main in cli.TOOLS.items():
      if tool_main.__module__ == module:
        self.tool(tool, argv, f'python -m {module}')

  def bench(self, script: str, argv: list):
    path = os.path.join(REPO, script)
    if not os.path.isfile(path):
      return  # script_paths reports it
    with open(path, encoding='utf-8') as f:
      source = f.read()
    for word in argv:
      if word.startswith('--'):
        name = word[2:].split('=', 1)[0]
        if not re.search(rf"""['"](--)?{re.escape(name)}['"=]""", source):
          self.report(f'python {script}: {script} defines no flag --{name}',
                      word)

  def gintrain(self, argv: list, what: str):
    cli = _cli()
    first = argv[0] if argv else ''
    if first in cli.TOOLS:
      self.tool(first, argv[1:], f'{what} {first}')
    elif first == cli.EVAL:
      self.absl(argv[1:], f'{what} eval')
    elif first and not first.startswith('-') and first not in _PLACEHOLDER:
      commands = sorted([*cli.TOOLS, cli.EVAL])
      self.report(f'`{what} {first}`: no such subcommand'
                  + did_you_mean(first, commands)
                  + f" (subcommands: {', '.join(commands)})", first)
    else:
      self.absl(argv, what)

  def gin_flag(self, word: str, next_word, what: str) -> bool:
    """Checks a gin flag; True if ``next_word`` was its value."""
    if word.startswith('--gin.'):
      self.binding(word[len('--gin.'):], f'{what}: {word}' if what else word)
      return False
    name, eq, value = word[2:].partition('=')
    taken = False
    if not eq:
      value, taken = next_word or '', next_word is not None
    where = f'{what}: --{name}={value}' if what else f'--{name}={value}'
    if name in ('gin_bindings', 'gin_param'):
      self.binding(value, where)
    elif name == 'gin_file':
      self.gin_file(value, where)
    else:
      return False
    return taken

  def absl(self, argv: list, what: str):
    skip = False
    for i, word in enumerate(argv):
      if skip:
        skip = False
        continue
      word = word.strip('[]')
      if word == '--':
        return
      if not word.startswith('--') or word in _PLACEHOLDER:
        continue
      following = argv[i + 1] if i + 1 < len(argv) else None
      if word.startswith('--gin'):
        name = word[2:].split('=', 1)[0]
        if word.startswith('--gin.') or _runner_flag(name) is not None:
          skip = self.gin_flag(word, following, what)
          continue
      name = word[2:].split('=', 1)[0]
      flag = _runner_flag(name)
      if flag is None and name not in _ABSL_FLAGS:
        self.report(f'--{name} is not a flag of `{what}`'
                    + did_you_mean(f'--{name}', [f'--{n}' for n in
                                                 _runner_flag_names()]), word)
      elif flag is not None and '=' not in word and not flag.boolean:
        skip = True

  def tool(self, tool: str, argv: list, what: str):
    words = [w for w in argv if w not in _PLACEHOLDER]
    prefix = tuple(w for w in words[:2] if not w.startswith('-'))
    found = None
    while prefix and not found:  # the words main dispatches on, if any
      found = _tool_parser(tool, prefix)
      prefix = prefix[:-1]
    found = found or _tool_parser(tool, ())
    if not found:
      return
    parser, passes_on = found
    if what.startswith('gintrain ') and parser.prog.startswith('gintrain'):
      what = parser.prog  # `gintrain sweep status`, say
    options = dict(_options(parser))
    sub, descended = _subparsers(parser), set()
    skip = 0
    for i, word in enumerate(words):
      if skip:
        skip -= 1
        continue
      word = word.strip('[]')
      if word == '--':
        return
      if not word.startswith('-'):
        if sub is not None and id(sub) not in descended:
          descended.add(id(sub))
          if word in sub.choices:
            what = (sub.choices[word].prog if what.startswith('gintrain ')
                    else f'{what} {word}')
            options.update(_options(sub.choices[word]))
            sub = _subparsers(sub.choices[word])
          elif i == 0 or not words[i - 1].startswith('-'):
            self.report(f'`{what} {word}`: no such subcommand'
                        + did_you_mean(word, sub.choices)
                        + f" (subcommands: {', '.join(sub.choices)})", word)
            return
        continue
      name = word.split('=', 1)[0]
      following = words[i + 1] if i + 1 < len(words) else None
      if name in options:
        if '=' not in word and options[name].nargs != 0:
          skip = 1
        continue
      if passes_on and (word.startswith('--gin') or
                        _runner_flag(name[2:]) is not None):
        if word.startswith('--gin') and self.gin_flag(word, following, what):
          skip = 1
        continue
      known = list(options) + (
          [f'--{n}' for n in _runner_flag_names()] if passes_on else [])
      self.report(f'{name} is not a flag of `{what}`'
                  + did_you_mean(name, known), name)

  def flags_alone(self, text: str):
    for word in re.split(r'\s+|/(?=--)', text):
      if not word.startswith('--') or '*' in word or word == '--':
        continue
      if word.startswith('--gin'):
        self.gin_flag(word, None, '')
        continue
      name = word[2:].split('=', 1)[0].split('|')[0].rstrip('\\')
      if '-' in name or name.startswith('xla_'):
        continue  # XLA's, pip's, pytest's: ours are snake_case
      if name and name not in _every_flag():
        self.report(f'--{name}: no command defines this flag'
                    + did_you_mean(f'--{name}',
                                   [f'--{n}' for n in _every_flag()]), word)

  # One page.
  def run(self):
    page = self.page
    for lang, first, body in page.blocks:
      last = first + len(body) - 1
      self.span = (first, last)
      self.script_paths('\n'.join(body))
      if lang in ('python', 'py', 'json', 'yaml', 'toml', 'text'):
        continue
      if lang == 'console':  # `$ command` lines (and their continuations)
        body, going_on = list(body), False
        for j, line in enumerate(body):
          command = going_on or line.startswith('$ ')
          body[j] = line[2:] if line.startswith('$ ') else (
              line if command else '')
          going_on = command and line.endswith('\\')
      if lang == 'gin' or (body and re.fullmatch(r'#\s*\S+\.gin\s*',
                                                 body[0])):
        for number, line in enumerate(body, first):
          self.span = (number, number)
          include = _INCLUDE.match(line)
          if include:
            self.gin_file(include.group(1), f'include {include.group(1)!r}')
          elif _GIN_LINE.match(line):
            self.binding(line, line.split('=', 1)[0].strip())
        continue
      for start, end, text in _logical_lines(body, first):
        self.span = (start, end)
        for words in _commands(text):
          self.command(words)
    for number, text in page.spans:
      self.span = (number, number + text.count('\n'))
      self.script_paths(text)
      words = _commands(text.replace('\n', ' '))
      if text.startswith('--'):
        self.flags_alone(text.replace('\n', ' '))
      elif words:
        self.command(words[0])
    return self.problems


def pages(repo: str = REPO) -> list:
  """README.md and the docs' own pages (not the generated ones)."""
  out = ['README.md']
  for path in sorted(glob.glob(os.path.join(repo, 'docs', '**', '*.md'),
                               recursive=True)):
    rel = os.path.relpath(path, repo)
    if rel == os.path.join('docs', 'index.md') or (
        os.sep + 'generated' + os.sep in rel):
      continue
    out.append(rel)
  return out


def check(paths=None) -> list:
  """The problems of ``paths`` (default: :func:`pages`), as ``Problem``s."""
  problems = []
  for path in paths or pages():
    problems += sorted(_Checker(_read(path)).run(),
                       key=lambda p: p.line)
  return problems


def on_pre_build(config, **kwargs):  # pylint: disable=unused-argument
  """MkDocs event: one warning per stale example (strict: a failed build)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  for problem in check():
    log.warning('stale example: %s', problem)
