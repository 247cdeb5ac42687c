"""Every example of README.md, gin/README.md and the docs' guides runs, in a
temp dir, without a warning from gintrain's own code.

Fenced ``sh`` blocks run in order with bash (``/tmp/`` becomes the test's
temp dir; the set-up commands `pip install` / `bash .ci/run` are left out, but
the command a `pip install . && ...` line runs is kept,
and a block whose first line says ``not run by the README test`` is skipped).
``python`` blocks run as scripts, except a block that defines gin
configurables, which is saved as ``plugins.py`` and run through the gin
block that imports it.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SETUP = ('pip install', 'bash .ci/run')
SKIP = 'not run by the README test'
# "path:line: SomeWarning: ..." printed for a warning raised in our code.
OUR_WARNING = re.compile(r'(/lib/|/runner/|gintrain)\S*:\d+: \w*Warning')


def _blocks(path):
  text = open(os.path.join(REPO, path), encoding='utf-8').read()
  return re.findall(r'^```(\w*)\n(.*?)^```', text, re.M | re.S)


def _env(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PATH=BIN + os.pathsep + os.environ.get('PATH', ''),
             PYTHONPATH=str(tmp_path))
  env.pop('XLA_FLAGS', None)
  return env


def _check(proc, what):
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f'{what}\n{output[-4000:]}'
  assert not OUR_WARNING.search(output), f'{what}\n{output[-4000:]}'


def _sh_blocks(path):
  out = []
  for lang, body in _blocks(path):
    if lang != 'sh' or SKIP in body.split('\n', 1)[0]:
      continue
    lines = []
    for line in body.split('\n'):
      if line.lstrip().startswith(('# 1.', '# 2.')):
        continue
      if any(line.lstrip().startswith(s) for s in SETUP):
        # `pip install . && gintrain ...`: the install is left out, the
        # command it runs is kept.
        if ' && ' not in line:
          continue
        line = line.split(' && ', 1)[1]
      lines.append(line)
    if any(l.strip() and not l.lstrip().startswith('#') for l in lines):
      out.append('\n'.join(lines))
  return out


GUIDES = sorted(os.path.relpath(p, REPO) for p in glob.glob(
    os.path.join(REPO, 'docs', 'guides', '*.md')))


@pytest.mark.parametrize('path', ['README.md', 'gin/README.md', *GUIDES])
def test_shell_examples_run(tmp_path, path):
  blocks = _sh_blocks(path)
  if path == 'README.md':
    assert blocks  # the set-up command's default experiment
  for body in blocks:
    script = body.replace('/tmp/', f'{tmp_path}/')
    proc = subprocess.run(['bash', '-e', '-c', script], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True,
                          timeout=900, check=False)
    _check(proc, script)


def _has_python(path):
  return any(lang == 'python' for lang, _ in _blocks(path))


def test_the_plugin_example_is_somewhere():
  assert _has_python('README.md')
  assert any('# my_experiment.gin' in body for path in GUIDES
             for _, body in _blocks(path))


@pytest.mark.parametrize('path', [p for p in ['README.md', *GUIDES]
                                  if _has_python(p)])
def test_python_and_plugin_examples_run(tmp_path, path):
  blocks = _blocks(path)
  python = [body for lang, body in blocks if lang == 'python']
  for body in python:
    if '@gin.configurable' in body:
      (tmp_path / 'plugins.py').write_text(body)
      continue
    script = body.replace('/tmp/', f'{tmp_path}/')
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600, check=False)
    _check(proc, script)
  gin_blocks = [body for lang, body in blocks
                if lang == '' and body.startswith('# my_experiment.gin')]
  if not gin_blocks:
    return
  (gin_block,) = gin_blocks
  (tmp_path / 'my_experiment.gin').write_text(
      gin_block.replace('/tmp/', f'{tmp_path}/'))
  proc = subprocess.run(
      [os.path.join(BIN, 'gintrain'), f'--workdir={tmp_path / "mine"}',
       '--gin_file=my_experiment.gin'], cwd=tmp_path, env=_env(tmp_path),
      capture_output=True, text=True, timeout=600, check=False)
  _check(proc, 'my_experiment.gin')
  assert (tmp_path / 'mine' / 'metrics.csv').exists()
  assert (tmp_path / 'steps.jsonl').exists()
