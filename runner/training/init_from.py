"""``--init_from``: a fresh run's parameters from another run's checkpoint.

Where the weights come from (a checkpoint file or URL, a folder of
``checkpoint_*`` files, or a run's workdir), which leaves are loaded
(:class:`InitFrom`: include/exclude patterns and rename pairs, bound as
``runner.init_from``; ``hf:FOLDER`` reads a Hugging Face folder through
``runner.models.hf``), and the report of what was loaded, left at its
initial value and unused (:class:`InitReport`). The trainer calls
:func:`load_params` on the fresh state's parameters, which reads through
``runner.outputs.checkpoints.restore_state`` (the restore path of resume
and eval) with this module's selection; a resumed run ignores
``--init_from``.

    >>> import numpy as np
    >>> rules = InitFrom('ckpt', exclude=['^head/'])
    >>> params = {'body': {'w': np.zeros(2)}, 'head': {'w': np.zeros(3)}}
    >>> out, report = select_params(rules, params,
    ...                             {'body': {'w': np.ones(2)}})
    >>> out['body']['w'], out['head']['w'], report.initial
    (array([1., 1.]), array([0., 0., 0.]), ['head/w'])
"""

import dataclasses
import re
from typing import Any

import numpy as np
from absl import logging

from gintrain.lib import checkpoint_naming
from gintrain.lib import checkpoints as lib_checkpoints
from gintrain.lib import serialization
from gintrain.lib import storage
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError
from gintrain.runner.outputs import checkpoints
from gintrain.runner.outputs import workdir as workdir_lib
from gintrain.runner.parallel import distributed

__all__ = ['InitFrom', 'InitReport', 'select_params', 'load_params',
           'checkpoint_params', 'checkpoint_file', 'params_of']

@dataclasses.dataclass(frozen=True)
class InitFrom:
  """Where ``--init_from`` loads weights from, and which ones.

  Paths are the ``'/'``-joined keys of a parameter, e.g.
  ``'Dense_1/kernel'``. A checkpoint leaf is first renamed by the first
  ``rename`` pair whose pattern it matches (``re.sub``); a model leaf is
  loaded when its path matches some ``include`` pattern and no ``exclude``
  pattern (``re.search``: anchor with ``^``/``$`` for whole names), and is
  left at its initial value otherwise.

  Attributes:
    path: a checkpoint file, a directory of ``checkpoint_*`` files, or a
      run's workdir.
    include: regular expressions; leaves to load (default: all).
    exclude: regular expressions; leaves to leave at their initial value.
    rename: ``(pattern, replacement)`` pairs applied to checkpoint paths,
      giving the model path each loads into.
  """
  path: str
  include: tuple = ('.*',)
  exclude: tuple = ()
  rename: tuple = ()

  def __post_init__(self):
    for name in ('include', 'exclude'):
      object.__setattr__(self, name, validation.check_regex_list(
          f'init_from.{name}', getattr(self, name)))
    pairs = []
    for pair in ((self.rename,) if _is_pair(self.rename) else self.rename):
      if not _is_pair(pair):
        validation.fail('init_from.rename', 'a list of (pattern, replacement)'
                        ' pairs', self.rename)
      pairs.append((validation.check_regex('init_from.rename', pair[0]),
                    pair[1]))
    object.__setattr__(self, 'rename', tuple(pairs))

  def __str__(self):
    return self.path


def _is_pair(x):
  return (isinstance(x, (tuple, list)) and len(x) == 2 and
          all(isinstance(s, str) for s in x))


@dataclasses.dataclass
class InitReport:
  """What :func:`load_params` did (paths as in :class:`InitFrom`).

  Attributes:
    path: the checkpoint file read.
    loaded: ``{model path: checkpoint path}`` of the leaves loaded.
    initial: model paths left at their initial value.
    unused: checkpoint paths that were not loaded.
  """
  path: str
  loaded: dict
  initial: list
  unused: list

  def lines(self) -> list[str]:
    """The report, as log lines."""
    def names(paths):
      return ', '.join(paths) if paths else '(none)'
    renamed = [f'{m} <- {c}' if m != c else m for m, c in self.loaded.items()]
    return [f'init_from {self.path}: loaded {len(self.loaded)} leaves:'
            f' {names(renamed)}',
            f'init_from {self.path}: left at their initial value'
            f' ({len(self.initial)}): {names(self.initial)}',
            f'init_from {self.path}: unused in the checkpoint'
            f' ({len(self.unused)}): {names(self.unused)}']


def checkpoint_params(path: str, flag: str = '--init_from'):
  """``(file, raw params tree)`` of the checkpoint at ``path`` (a file, a
  folder of ``checkpoint_*`` files or a run's workdir; local or a URL),
  for readers that have no model to restore into (``gintrain sample``).

  Raises:
    RunnerError: nothing there, an Orbax checkpoint, a folder without
      checkpoints, or an unreadable file (naming ``flag`` and the path).
  """
  path = checkpoint_file(path, flag)
  raw = checkpoints.read_arrays(path, checkpoints.read_file(path))
  return path, params_of(raw, path, flag)


def checkpoint_file(path: str, flag: str = '--init_from') -> str:
  """The checkpoint file ``path`` names: itself, the newest
  ``checkpoint_*`` of a folder, or of a run's workdir's ``checkpoints/``.

  Raises:
    RunnerError: nothing there, an Orbax checkpoint, or a folder without
      checkpoints (naming ``flag`` and the path).
  """
  if not storage.exists(path):
    raise RunnerError(f'{flag}={path}: no such file or directory.')
  if storage.isdir(workdir_lib.path(path, workdir_lib.CHECKPOINT_DIR)):
    path = workdir_lib.path(path, workdir_lib.CHECKPOINT_DIR)  # a workdir
  if storage.isdir(path):
    path = _latest_in(path, flag)
  return path


def params_of(raw: Any, path: str, flag: str = '--init_from') -> Any:
  """The parameters in a checkpoint's raw tree: a runner checkpoint's
  ``state/params``, a ``TrainState``'s ``params``, or the bare tree."""
  if raw is None:
    raise RunnerError(f'{flag}={path}: the directory holds no'
                      ' checkpoint_* file.')
  if isinstance(raw, dict) and isinstance(raw.get('state'), dict):
    raw = raw['state']
  if isinstance(raw, dict) and 'params' in raw and 'opt_state' in raw:
    raw = raw['params']
  return raw


def _latest_in(folder: str, flag: str) -> str:
  """The newest ``checkpoint_*`` file of ``folder``."""
  if checkpoint_naming.is_orbax_dir(folder):
    raise RunnerError(f'{flag}={folder}: an Orbax checkpoint directory; give'
                      ' a msgpack checkpoint file (checkpoint_<step>), a'
                      ' folder of them, or a run\'s workdir.')
  latest = lib_checkpoints.latest_checkpoint(folder)
  if latest is None:
    name = folder.rstrip('/').rsplit('/', 1)[-1]
    looks_like_file = re.fullmatch(r'.+_\d+', name)
    raise RunnerError(
        f'{flag}={folder}: a directory that holds no checkpoint_* file'
        + (' (a checkpoint is a file named checkpoint_<step>, not a'
           ' directory)' if looks_like_file else '') + '.')
  if storage.isdir(latest):
    raise RunnerError(f'{flag}={latest}: a directory, not a checkpoint'
                      ' file; give the checkpoint file itself.')
  return latest


def _renamed(rules: 'InitFrom', got: dict, flag: str) -> dict:
  """``{model path: checkpoint path}`` after ``rules.rename``."""
  sources = {}
  for key in got:
    target = key
    for pattern, replacement in rules.rename:
      if pattern.search(key):
        target = pattern.sub(replacement, key)
        break
    if target in sources:
      raise RunnerError(f'{flag}: init_from.rename maps both {sources[target]}'
                        f' and {key} to {target}.')
    sources[target] = key
  return sources


def select_params(rules: InitFrom, params: Any, raw: Any,
                  path: str | None = None) -> tuple[Any, InitReport]:
  """``params`` with the leaves ``rules`` select replaced from ``raw``.

  Args:
    rules: the include/exclude/rename rules.
    params: the model's (initial) parameters.
    raw: the checkpoint's parameter tree (a state dict).
    path: the checkpoint file, for messages (default ``rules.path``).

  Returns:
    ``(params, report)``.

  Raises:
    RunnerError: an included leaf missing from the checkpoint, two
      checkpoint leaves renamed onto one, or a shape/dtype mismatch.
  """
  flag = f'--init_from={rules.path}'
  path = path or rules.path
  want = checkpoints.flatten(serialization.to_state_dict(params))
  got = checkpoints.flatten(raw)
  sources = _renamed(rules, got, flag)
  loaded, initial, faults = {}, [], []
  for key, leaf in want.items():
    chosen = (any(p.search(key) for p in rules.include) and
              not any(p.search(key) for p in rules.exclude))
    if not chosen:
      initial.append(key)
    elif key not in sources:
      faults.append(f'{key}: missing from the checkpoint (exclude it with'
                    ' init_from.exclude, or map a checkpoint leaf onto it'
                    ' with init_from.rename)')
    else:
      g = got[sources[key]]
      if not (hasattr(g, 'shape') and hasattr(g, 'dtype')) or (
          np.shape(g) != np.shape(leaf) or
          np.dtype(g.dtype) != np.dtype(leaf.dtype)):
        what = checkpoints.describe_leaf(g) if hasattr(g, 'dtype') else type(g).__name__
        faults.append(f'{key}: {what} in the checkpoint'
                      f'{" (as " + sources[key] + ")" if sources[key] != key else ""},'
                      f' {checkpoints.describe_leaf(leaf)} expected (exclude it with'
                      ' init_from.exclude to start it afresh)')
      else:
        loaded[key] = sources[key]
  if faults:
    shown = '; '.join(faults[:6])
    more = f'; and {len(faults) - 6} more' if len(faults) > 6 else ''
    raise RunnerError(f'{flag} does not match the model: {shown}{more}.')
  used = set(loaded.values())
  unused = [key for key in got if key not in used]
  flat = {key: (got[loaded[key]] if key in loaded else leaf)
          for key, leaf in want.items()}
  report = InitReport(path, loaded, initial, unused)
  return serialization.from_state_dict(params, _unflatten(flat)), report


def _unflatten(flat: dict) -> dict:
  out = {}
  for key, leaf in flat.items():
    node = out
    parts = key.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = leaf
  return out


HF_PREFIX = 'hf:'


def load_params(init_from: 'str | InitFrom', params: Any) -> Any:
  """The parameters stored at ``init_from``, restored into ``params``
  (numpy arrays on the host; the caller places the whole state).

  ``init_from`` is a path (every leaf is loaded; the checkpoint must match
  the model exactly) or an :class:`InitFrom` (its rules choose the leaves;
  the others keep their value in ``params``; what was loaded, left and
  unused is logged on process 0). The path is a checkpoint file, a
  directory whose latest ``checkpoint_*`` is used, a run's workdir (its
  ``checkpoints/``), or ``hf:FOLDER`` (a Hugging Face folder, read by
  ``runner.models.hf`` in the layout of ``params``). The checkpoint may be
  a runner checkpoint (``state/params``), a ``TrainState`` (``params``) or
  a bare params tree. It is read by ``checkpoints.restore_state``, as a
  resume reads its checkpoint, with this module's selection.

  Raises:
    RunnerError: nothing at the path, or parameters that do not fit.
  """
  rules = init_from if isinstance(init_from, InitFrom) else None
  where = str(init_from)
  flag = f'--init_from={where}'
  raw = None
  if where.startswith(HF_PREFIX):
    from gintrain.runner.models import hf  # pylint: disable=g-import-not-at-top
    path, raw = where, hf.read_like(where[len(HF_PREFIX):], params)
  else:
    path = checkpoint_file(where, '--init_from')
  reports = []

  def select(tree):
    got = params_of(tree, path, '--init_from')
    if rules is None:
      checkpoints.check_tree(serialization.to_state_dict(params), got, flag)
      return got
    out, report = select_params(rules, params, got, path)
    reports.append(report)
    return serialization.to_state_dict(out)

  out, _ = checkpoints.restore_state(path, params, None, raw=raw,
                                     select=select, what=flag, hint='')
  if reports and distributed.is_main_process():
    for line in reports[0].lines():
      logging.info('%s', line)
  return out
