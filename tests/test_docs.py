"""The documentation site builds strictly, and its references follow the code.

``mkdocs build`` (mkdocs.yml: strict, every warning an error) runs on a copy
of the docs beside a copy of ``runner/`` (so a test can add code to it), with
``lib/`` and ``gin/`` linked. The code blocks of the guides are run by
tests/test_readme.py, like the README's.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip('mkdocs')
pytest.importorskip('mkdocstrings')

# Run in the build's process before mkdocs: what a developer adding a
# configurable to runner/cli/configurables.py or a flag to runner/cli/flags.py
# adds to the process.
_PROBES = """
import sys
from absl import flags
from gintrain.runner.cli import configurables
def docs_probe_factory(probe_width=17, probe_name='x'):
  '''A configurable added by tests/test_docs.py.'''
configurables._register(docs_probe_factory, 'docs_probe', 'runner')
flags.DEFINE_integer('docs_probe_flag', 7, 'A flag added by test_docs.',
                     module_name='gintrain.runner.cli.flags')
"""
_BUILD = """
from mkdocs.commands.build import build
from mkdocs.config import load_config
build(load_config('mkdocs.yml'))
"""


def _tree(tmp_path):
  """A project root in ``tmp_path``: mkdocs.yml, README.md and docs/ copied, runner/
  copied, lib/ and gin/ linked."""
  for name in ('mkdocs.yml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), tmp_path)
  ignore = shutil.ignore_patterns('generated', '__pycache__', 'index.md')
  shutil.copytree(os.path.join(REPO, 'docs'), tmp_path / 'docs',
                  ignore=ignore)
  shutil.copytree(os.path.join(REPO, 'runner'), tmp_path / 'runner',
                  ignore=ignore)
  for name in ('lib', 'gin'):
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  return tmp_path


def _build(root, probes=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  code = (_PROBES if probes else '') + _BUILD
  return subprocess.run([sys.executable, '-c', code], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)


def _page(root, rel):
  with open(root / 'build' / 'site' / rel, encoding='utf-8') as f:
    return f.read()


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The site built with a configurable, a flag and an error line added."""
  root = _tree(tmp_path_factory.mktemp('docs'))
  (root / 'runner' / 'docs_probe.py').write_text(
      'from gintrain.runner.errors import RunnerError\n\n\n'
      'def check_probe(value):\n'
      '  # Probe: added by tests/test_docs.py.\n'
      '  raise RunnerError(f"docs probe value {value} is wrong")\n')
  proc = _build(root, probes=True)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return root


def test_the_repository_docs_build_strictly(built):
  index = _page(built, 'index.html')
  assert 'gintrain' in index
  lib = _page(built, 'reference/lib/index.html')
  # mkdocstrings rendered the docstrings (a flax name and its parameters).
  assert 'save_checkpoint' in lib and 'keep_every_n_steps' in lib


def test_a_new_configurable_flag_and_error_line_appear(built):
  gin_page = _page(built, 'reference/generated/gin/index.html')
  assert 'runner.docs_probe' in gin_page and 'probe_width' in gin_page
  assert 'runner.mlp' in gin_page or 'models.mlp' in gin_page
  flags_page = _page(built, 'reference/generated/flags/index.html')
  assert '--docs_probe_flag' in flags_page
  assert 'A flag added by test_docs.' in flags_page
  assert '--workdir' in flags_page and 'gintrain ckpt' in flags_page
  errors_page = _page(built, 'reference/generated/errors/index.html')
  assert 'docs probe value {value} is wrong' in errors_page
  assert 'added by tests/test_docs.py' in errors_page


def test_broken_links_anchors_and_cross_references_fail_the_build(tmp_path):
  """Each is a warning, and strict mode makes the build fail naming all."""
  root = _tree(tmp_path)
  guide = root / 'docs' / 'guides' / 'quickstart.md'
  guide.write_text(guide.read_text() + '\nSee [this](no_such_page.md) and'
                   ' [that](gin.md#no-such-heading).\n')
  ref = root / 'docs' / 'reference' / 'lib.md'
  ref.write_text(ref.read_text() + '\nSee [nothing][gintrain.lib.nope].\n')
  proc = _build(root)
  assert proc.returncode != 0, proc.stderr[-3000:]
  for named in ('no_such_page.md', 'no-such-heading', 'gintrain.lib.nope'):
    assert named in proc.stderr, (named, proc.stderr[-3000:])
