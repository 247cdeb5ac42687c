"""The runner's import graph has no cycle, between modules or between its
role folders, and lib/ never imports the runner."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {'lib': 'gintrain.lib', 'runner': 'gintrain.runner'}


def _modules():
  """``{module name: path}`` of every .py file under lib/ and runner/."""
  out = {}
  for folder, package in FOLDERS.items():
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        if name.endswith('.py'):
          rel = os.path.relpath(os.path.join(root, name), REPO)
          parts = rel[:-3].split(os.sep)[1:]
          if parts[-1] == '__init__':
            parts = parts[:-1]
          out['.'.join([package, *parts])] = os.path.join(root, name)
  return out


def _graph():
  """``{module: {imported project modules}}``, lazy imports included."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(open(path, encoding='utf-8').read())
    deps = set()
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        targets = [node.module] + [f'{node.module}.{a.name}'
                                   for a in node.names]
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def _cycle(graph):
  """One cycle as a list of nodes, or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return path[path.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, path + [dep])
        if found:
          return found
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_graph_is_walked():
  graph = _graph()
  assert 'gintrain.runner.training.trainer' in graph
  assert 'gintrain.runner.tasks.base' in graph[
      'gintrain.runner.tasks.classification']


def test_no_module_cycle():
  assert _cycle(_graph()) is None, ' -> '.join(_cycle(_graph()))


def test_no_cycle_between_role_folders():
  """runner/<folder> -> runner/<folder> edges (cli, training, actions, ...)."""
  def folder(module):
    parts = module.split('.')
    return '.'.join(parts[:3])

  graph = {}
  for module, deps in _graph().items():
    graph.setdefault(folder(module), set()).update(
        folder(d) for d in deps if folder(d) != folder(module))
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_cycle_detector_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_lib_never_imports_the_runner():
  for module, deps in _graph().items():
    if module.startswith('gintrain.lib'):
      assert not [d for d in deps if d.startswith('gintrain.runner')], module


def test_only_storage_tells_paths_from_urls():
  """Callers take local paths and URLs alike (``lib.storage``); code with a
  faster local route asks ``storage.local_file``, never ``is_url``."""
  offenders = []
  for module, path in _modules().items():
    if module == 'gintrain.lib.storage':
      continue
    tree = ast.parse(open(path, encoding='utf-8').read())
    for node in ast.walk(tree):
      name = (node.attr if isinstance(node, ast.Attribute) else
              node.id if isinstance(node, ast.Name) else
              node.name if isinstance(node, ast.alias) else None)
      if name is not None and name.rsplit('.', 1)[-1] == 'is_url':
        offenders.append(f'{os.path.relpath(path, REPO)}:{node.lineno}'
                         if hasattr(node, 'lineno') else path)
  assert not offenders, offenders
