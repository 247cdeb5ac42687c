"""Issue 17's size limits, checked on the source (no imports): no function
in runner/ over 60 lines of code (its docstring not counted: a long
argument list documented in place is fine), and the trainer holds the loop
only (under 300 lines)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60
MAX_TRAINER_LINES = 300


def _functions():
  """``(path:line name, lines of code)`` of every function under runner/."""
  for folder, _, names in os.walk(os.path.join(ROOT, 'runner')):
    for name in sorted(names):
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          lines = node.end_lineno - node.lineno + 1
          first = node.body[0]
          if (isinstance(first, ast.Expr) and
              isinstance(first.value, ast.Constant) and
              isinstance(first.value.value, str)):
            lines -= first.end_lineno - first.lineno + 1
          where = f'{os.path.relpath(path, ROOT)}:{node.lineno}'
          yield f'{where} {node.name}', lines


def test_no_runner_function_over_60_lines_of_code():
  functions = list(_functions())
  assert len(functions) > 500  # the walk found the runner
  long = [(where, n) for where, n in functions if n > MAX_FUNCTION_LINES]
  assert not long, long


def test_the_trainer_is_under_300_lines():
  with open(os.path.join(ROOT, 'runner', 'training', 'trainer.py'),
            encoding='utf-8') as f:
    assert len(f.read().splitlines()) < MAX_TRAINER_LINES
