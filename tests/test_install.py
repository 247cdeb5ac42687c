"""A regular (non-editable) install runs the default experiment anywhere.

The project is installed into a fresh virtual environment with ``pip install
.`` (a wheel, not a link to the checkout), then ``gintrain`` and ``python -m
gintrain.runner.train`` run from an unrelated directory: the shipped gin
configs must come from the installed package, and the top-level names
``lib``, ``runner`` and ``gin`` must stay free for the user.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        check=False, **kwargs)
  assert proc.returncode == 0, f'{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return proc


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
  root = tmp_path_factory.mktemp('venv')
  env_dir = root / 'env'
  _run([sys.executable, '-m', 'venv', str(env_dir)])
  py = env_dir / 'bin' / 'python'
  # The dependencies (jax, optax, ...) come from this interpreter's
  # site-packages, added as a plain path: .pth files there (such as the
  # editable install's import hook) are not run, so `gintrain` can only be
  # the copy installed below.
  purelib = subprocess.run(
      [str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
      capture_output=True, text=True, check=True).stdout.strip()
  deps = [p for p in {sysconfig.get_paths()['purelib'], *site.getsitepackages()}
          if os.path.isdir(p)]
  with open(os.path.join(purelib, '_gintrain_test_deps.pth'), 'w') as f:
    f.write('\n'.join(deps) + '\n')
  # Built from a copy, so the build leaves nothing in the checkout.
  src = root / 'src'
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
      '.git', 'build', '*.egg-info', '__pycache__', 'workdir*'))
  _run([str(py), '-m', 'pip', 'install', '-q', '--no-deps',
        '--no-cache-dir', str(src)],
       env=dict(os.environ, TMPDIR=str(root), PIP_DISABLE_PIP_VERSION_CHECK='1'),
       cwd=str(root))
  return env_dir


def test_installed_package_is_a_copy_under_one_namespace(venv, tmp_path):
  py = str(venv / 'bin' / 'python')
  proc = _run([py, '-c',
               'import importlib.util as u, gintrain.lib.checkpoints as c,'
               ' gintrain.runner.cli.config as g;'
               ' print(c.__file__); print(g.REPO_GIN_DIR);'
               ' print([n for n in ("lib", "runner") if u.find_spec(n)])'],
              cwd=str(tmp_path), env=dict(os.environ, JAX_PLATFORMS='cpu'))
  ckpt_file, gin_dir, top_level = proc.stdout.split('\n')[:3]
  assert ckpt_file.startswith(str(venv)), ckpt_file
  assert gin_dir.startswith(str(venv)), gin_dir
  assert os.path.isfile(os.path.join(gin_dir, 'models', 'mlp.gin'))
  assert top_level == '[]'  # installing claims no top-level lib or runner


def test_console_script_runs_default_experiment_from_elsewhere(venv, tmp_path):
  workdir = tmp_path / 'run'
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  # A user's own ./lib and ./runner must not shadow the package.
  for name in ('lib', 'runner'):
    (elsewhere / name).mkdir()
    (elsewhere / name / '__init__.py').write_text('raise ImportError("shadowed")\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  _run([str(venv / 'bin' / 'gintrain'), f'--workdir={workdir}'],
       cwd=str(elsewhere), env=env)
  records = [json.loads(line) for line in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = [r for r in records if r['split'] == 'eval'][-1]
  assert final['accuracy'] >= 0.95, final
  # The module form works too (a dry run: config found, nothing trained).
  proc = _run([str(venv / 'bin' / 'python'), '-m', 'gintrain.runner.train',
               '--dry_run'], cwd=str(elsewhere), env=env)
  assert 'All %gin.REQUIRED bindings are set' in proc.stdout
