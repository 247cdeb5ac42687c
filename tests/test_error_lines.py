"""The one-line message of a file that fails under the runner (issue 17):
``<activity>: cannot <operation> <path>: <reason> [Errno N].``

The activity is declared by the code doing the work
(``runner.errors.activity``), the operation named by ``lib.storage`` or
read from the error itself: neither depends on where the code lives nor on
its source text. The runner's own files are checked end to end in
test_reliability_errors.py (test_os_error_of_a_runner_file_is_one_line).
"""

import errno
import importlib.util
import os
import sys
import types

import gin
import pytest

from gintrain.lib import storage
from gintrain.runner import errors
from gintrain.runner.actions import base
from gintrain.runner.data import arrays
from gintrain.runner.data import datasets
from gintrain.runner.outputs import plots

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import run  # pylint: disable=g-import-not-at-top,wrong-import-position


def _raised(fn, *args):
  with pytest.raises(OSError) as info:
    fn(*args)
  return info.value


# --- errors.activity ----------------------------------------------------------


def test_the_innermost_activity_wins_and_the_error_passes_unchanged():
  outer, inner = errors.activity('outer'), errors.activity('inner')
  error = FileNotFoundError(2, 'No such file or directory', '/x')
  with pytest.raises(FileNotFoundError) as info:
    with outer:
      with inner:
        raise error
  assert info.value is error  # the same object: not wrapped, not replaced
  assert errors.activity_of(error) == 'inner'
  assert info.traceback[-1].name == (
      'test_the_innermost_activity_wins_and_the_error_passes_unchanged')
  with pytest.raises(FileNotFoundError):
    with inner:  # a reused declaration does not change what was recorded
      with outer:
        raise error
  assert errors.activity_of(error) == 'inner'
  assert errors.activity_of(ValueError()) is None


def test_an_activity_as_a_decorator_returns_and_raises_as_the_function():
  @errors.activity('decorated')
  def work(fail):
    """Docstring kept."""
    if fail:
      raise PermissionError(13, 'Permission denied', '/p')
    return 'done'

  assert work(False) == 'done' and work.__doc__ == 'Docstring kept.'
  error = _raised(work, True)
  assert type(error) is PermissionError  # pylint: disable=unidiomatic-typecheck
  assert errors.file_error_line(error) == (
      'decorated: cannot access /p: Permission denied [Errno 13].')


def test_the_operation_comes_from_storage_or_the_error(tmp_path):
  (tmp_path / 'file').write_text('')
  (tmp_path / 'dir').mkdir()
  lines = []
  for fn, args in (
      (storage.makedirs, (str(tmp_path / 'file'),)),  # EEXIST, named
      (storage.remove, (str(tmp_path / 'missing'),)),  # ENOENT, named
      (storage.read_bytes, (str(tmp_path / 'dir'),)),  # EISDIR, named
      (os.replace, (str(tmp_path / 'file'), str(tmp_path / 'dir'))),
      (open, (str(tmp_path / 'dir'), 'w')),  # EISDIR: opening
      (os.mkdir, (str(tmp_path / 'dir'),)),  # EEXIST: making a directory
      (os.listdir, (str(tmp_path / 'file'),)),  # nothing to go by
  ):
    try:
      with errors.activity('testing'):
        fn(*args)
    except OSError as e:
      lines.append(errors.file_error_line(e).replace(str(tmp_path), 'T'))
  assert lines == [
      'testing: cannot create the directory T/file: File exists [Errno 17].',
      'testing: cannot remove T/missing: No such file or directory'
      ' [Errno 2].',
      'testing: cannot read T/dir: Is a directory [Errno 21].',
      'testing: cannot rename T/file to T/dir: Is a directory [Errno 21].',
      'testing: cannot open T/dir: Is a directory [Errno 21].',
      'testing: cannot create the directory T/dir: File exists [Errno 17].',
      'testing: cannot access T/file: Not a directory [Errno 20].',
  ]
  error = _raised(open, str(tmp_path / 'missing' / 'x'))  # declared nowhere
  assert errors.file_error_line(error).startswith(
      f'a file operation: cannot access {tmp_path}/missing/x: ')


# --- The same code elsewhere gives the same line -------------------------------


def _copy_from_another_path(tmp_path):
  """runner/outputs/plots.py's code, loaded from a copy in ``tmp_path`` (a
  path outside the package)."""
  path = tmp_path / 'elsewhere' / 'copied_plots.py'
  path.parent.mkdir()
  with open(plots.__file__, encoding='utf-8') as f:
    path.write_text(f.read())
  spec = importlib.util.spec_from_file_location('copied_plots', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__file__ != plots.__file__
  return module


def _copy_without_source(unused_tmp_path):
  """The same code compiled from a string: its frames have no file and no
  source text."""
  with open(plots.__file__, encoding='utf-8') as f:
    code = compile(f.read(), '<no file>', 'exec')
  module = types.ModuleType('sourceless_plots')
  exec(code, module.__dict__)  # pylint: disable=exec-used
  return module


@pytest.mark.parametrize('load', [_copy_from_another_path,
                                  _copy_without_source])
def test_the_line_does_not_depend_on_file_paths_or_source(tmp_path, load):
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text('{"step": 1, "split": "train", "loss": 0.5}\n')
  out = tmp_path / 'metrics.png'
  out.mkdir()  # in the way
  copy = load(tmp_path)
  lines = [errors.file_error_line(_raised(module.plot_metrics, metrics, out))
           for module in (plots, copy)]
  assert lines == [f'writing the metrics plot: cannot open {out}: Is a'
                   ' directory [Errno 21].'] * 2


# --- A user's plug-in ---------------------------------------------------------


@gin.configurable(module='error_lines')
class WritesNowhere(base.Action):
  """A user's action whose file cannot be written."""

  def __init__(self, path=gin.REQUIRED, declares=None):
    self.path, self.declares = path, declares

  def __call__(self, step, state, metrics):
    if self.declares:
      with errors.activity(self.declares):
        open(self.path, 'w', encoding='utf-8').close()
    open(self.path, 'w', encoding='utf-8').close()


@pytest.mark.parametrize('declares', [None, 'writing my report'])
def test_a_user_action_failing_gets_the_declared_activity(tmp_path, capsys,
                                                          declares):
  target = tmp_path / 'missing' / 'report.txt'
  if declares:
    target = tmp_path / 'a_dir'
    target.mkdir()
  code = run(tmp_path / 'run',
             '--gin.train.actions=[@error_lines.WritesNowhere()]',
             f"--gin.WritesNowhere.path='{target}'",
             f'--gin.WritesNowhere.declares={declares!r}')
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  assert code == 1 and 'Traceback' not in err, err[-3000:]
  if declares:  # the action's own declaration is the innermost
    want = (f'writing my report: cannot open {target}: Is a directory'
            ' [Errno 21].')
  else:  # the trainer declares what it calls
    want = (f'running an action: cannot access {target}: No such file or'
            ' directory [Errno 2].')
  assert lines == [f'gintrain: error: {want}'], err[-3000:]


@gin.configurable(module='error_lines')
class ReadsFail(arrays.ArraySource):
  """A user's data source whose third batch cannot be read."""

  def __init__(self):
    super().__init__(datasets.synthetic(num_features=16, num_classes=4))
    self.reads = 0

  def next_batch(self):
    self.reads += 1
    if self.reads == 3:
      raise FileNotFoundError(errno.ENOENT, 'No such file or directory',
                              '/data/shard-3')
    return super().next_batch()


def test_a_user_data_source_failing_reads_the_data(tmp_path, capsys):
  code = run(tmp_path / 'run', '--gin.train.dataset=@error_lines.ReadsFail()')
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith('gintrain: error:')]
  assert code == 1 and 'Traceback' not in err, err[-3000:]
  assert lines == ['gintrain: error: reading the data: cannot access'
                   ' /data/shard-3: No such file or directory [Errno 2].'], (
                       err[-3000:])
