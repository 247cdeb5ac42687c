"""The documentation site builds strictly, and its references follow the code.

``mkdocs build`` (mkdocs.yml: strict, every warning an error) runs on a copy
of the docs beside a copy of ``runner/`` (so a test can add code to it), with
``lib/``, ``gin/``, ``bench/`` and ``launch/`` linked: once as they are (plus a
configurable, a flag and an error line), once with broken links and stale
examples planted. The code blocks of the guides are run by
tests/test_readme.py, like the README's; docs/hooks/examples.py checks them
against the code without running them, inside the build.
"""

import importlib.util
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
  """A project root in ``tmp_path``: mkdocs.yml, README.md and docs/ copied,
  runner/ copied, lib/, gin/, bench/ and launch/ linked."""
  for name in ('mkdocs.yml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), tmp_path)
  ignore = shutil.ignore_patterns('generated', '__pycache__', 'index.md')
  shutil.copytree(os.path.join(REPO, 'docs'), tmp_path / 'docs',
                  ignore=ignore)
  shutil.copytree(os.path.join(REPO, 'runner'), tmp_path / 'runner',
                  ignore=ignore)
  for name in ('lib', 'gin', 'bench', 'launch'):
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  return tmp_path


def _build(root, probes=False):
  """Builds the site in ``root``: with the probes run first in the build's
  process, else with the command a user runs, ``mkdocs build --strict``."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  command = ([sys.executable, '-c', _PROBES + _BUILD] if probes else
             [sys.executable, '-m', 'mkdocs', 'build', '--strict'])
  return subprocess.run(command, cwd=root, env=env,
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


# Stale examples planted in a guide and the README: (what is planted, what
# the build must say about it on the planted command's last line).
_STALE = [
    ('gintrain eval --workdir=/tmp/cnn --chekpoint=420',
     "--chekpoint is not a flag of `gintrain eval` (did you mean '--checkpoint'?)"),
    ('gintrain --workdir=/tmp/x \\\n    --gin.train.num_epochz=2',
     "configurable 'train' has no parameter 'num_epochz'"
     " (did you mean 'num_epochs'?)"),
    ('gintrain --workdir=/tmp/x --gin_file=models/no_such.gin',
     '--gin_file=models/no_such.gin: no such gin file'),
    ('gintrain ckpt convert --too=hf /tmp/a /tmp/b',
     "--too is not a flag of `gintrain ckpt convert` (did you mean '--to'?)"),
    ('gintrain sweep status /tmp/sweep --formt=md',
     '--formt is not a flag of `gintrain sweep status`'),
    ('launch/no_such.sh -n 2 -- gintrain --gin.optimiser.name="\'sgd\'"',
     'launch/no_such.sh: no such file'),
    ('gintrain chkpt ls /tmp/cnn', '`gintrain chkpt`: no such subcommand'),
]
_STALE_README = ('gintrain --gin_bindings="train.model = @models.mlpp()"',
                 "@models.mlpp: no configurable 'models.mlpp'")


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
  """``(root, build stderr, {stale command: its line})``: the site built with a
  broken link, anchor and cross-reference and with stale examples."""
  root = _tree(tmp_path_factory.mktemp('broken'))
  guide = root / 'docs' / 'guides' / 'quickstart.md'
  text = guide.read_text() + ('\nSee [this](no_such_page.md) and'
                              ' [that](gin.md#no-such-heading).\n\n```sh\n')
  lines = {}
  for command, _ in _STALE:
    lines[command] = text.count('\n') + 1 + command.count('\n')  # its last
    text += command + '\n'
  guide.write_text(text + '```\n')
  readme = root / 'README.md'
  text = readme.read_text() + '\n'
  lines[_STALE_README[0]] = text.count('\n') + 1
  readme.write_text(text + f'Or `{_STALE_README[0]}`.\n')
  ref = root / 'docs' / 'reference' / 'lib.md'
  ref.write_text(ref.read_text() + '\nSee [nothing][gintrain.lib.nope].\n')
  proc = _build(root)
  assert proc.returncode != 0, proc.stderr[-3000:]
  return root, proc.stderr + proc.stdout, lines


def test_broken_links_anchors_and_cross_references_fail_the_build(broken):
  """Each is a warning, and strict mode makes the build fail naming all."""
  _, stderr, _ = broken
  for named in ('no_such_page.md', 'no-such-heading', 'gintrain.lib.nope'):
    assert named in stderr, (named, stderr[-3000:])


def test_stale_examples_fail_the_build_naming_file_line_and_fault(broken):
  """A flag, subcommand, binding, reference, gin file or script path the code
  no longer has: one warning each, naming the page, the line and the fault,
  and strict mode fails the build."""
  _, stderr, lines = broken
  guide = os.path.join('docs', 'guides', 'quickstart.md')
  for command, said in _STALE:
    expected = f'{guide}:{lines[command]}: '
    found = [l for l in stderr.splitlines() if expected in l and said in l]
    assert found, (command, expected + said, stderr[-4000:])
  found = [l for l in stderr.splitlines()
           if f'README.md:{lines[_STALE_README[0]]}: ' in l
           and _STALE_README[1] in l]
  assert found, (_STALE_README, stderr[-4000:])
  # The planted optimiser in the launch line is reported as well.
  assert "no configurable 'optimiser' (did you mean 'optimizer'?)" in stderr
  assert 'Aborted with' in stderr and 'strict mode' in stderr


def test_the_real_examples_are_checked(built):  # pylint: disable=unused-argument
  """The real pages pass the check (``built`` is a strict build with the
  hook), and the pages it reads are the README and the hand-written docs."""
  spec = importlib.util.spec_from_file_location(
      'docs_examples', os.path.join(REPO, 'docs', 'hooks', 'examples.py'))
  examples = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(examples)
  pages = examples.pages()
  assert 'README.md' in pages and os.path.join(
      'docs', 'guides', 'sweeps.md') in pages
  assert not any('generated' in p or p.endswith('index.md') for p in pages)
