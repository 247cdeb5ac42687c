"""A regular (non-editable) install runs the default experiment anywhere.

The project is installed into a fresh virtual environment with ``pip install
.`` (a wheel, not a link to the checkout), then ``gintrain`` and ``python -m
gintrain.runner.train`` run from an unrelated directory: the shipped gin
configs must come from the installed package, and the top-level names
``lib``, ``runner`` and ``gin`` must stay free for the user.
"""

import glob
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_ignore(directory, names):
  """shutil.copytree's ignore: VCS and build leftovers anywhere, and the
  repository root's scratch workdirs (not runner/outputs/workdir.py)."""
  skip = shutil.ignore_patterns('.git', 'build', '*.egg-info',
                                '__pycache__')(directory, names)
  if os.path.samefile(directory, REPO):
    skip |= {n for n in names if n.startswith('workdir')}
  return skip


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
  shutil.copytree(REPO, src, ignore=_copy_ignore)
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


# --- Every Python we name (slow: downloads every dependency per Python) ----
#
# GINTRAIN_INSTALL_PYTHONS=1 finds python3.X on PATH and under pyenv's
# versions; or give the interpreters: GINTRAIN_INSTALL_PYTHONS="/usr/bin/python3.12
# python3.13". Each supported one gets a fresh venv, `pip install` of the built
# wheel with all its dependencies, and the README's first command run from
# another folder; an unsupported one must be refused within seconds.

SUPPORTED = ((3, 11), (3, 12), (3, 13))  # setup.py's SUPPORTED_PYTHONS
_PYTHONS = os.environ.get('GINTRAIN_INSTALL_PYTHONS', '')


def _candidate_pythons() -> dict:
  """``{(major, minor): interpreter}`` of the Pythons present."""
  names = _PYTHONS.split() if _PYTHONS not in ('', '1') else []
  if not names:
    root = os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv'))
    for minor in range(8, 16):
      names.append(f'python3.{minor}')
      names += sorted(glob.glob(os.path.join(
          root, 'versions', f'3.{minor}.*', 'bin', 'python3')))[-1:]
  found = {}
  for name in names:
    exe = shutil.which(name) or name
    if not os.access(exe, os.X_OK):
      continue
    proc = subprocess.run(
        [exe, '-c', 'import sys; print(*sys.version_info[:2])'],
        capture_output=True, text=True, check=False)
    if proc.returncode == 0:
      found.setdefault(tuple(map(int, proc.stdout.split())), exe)
  return found


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  root = tmp_path_factory.mktemp('wheel')
  src = root / 'src'
  shutil.copytree(REPO, src, ignore=_copy_ignore)
  _run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w',
        str(root / 'dist'), str(src)], cwd=str(root))
  return next((root / 'dist').glob('gintrain-*.whl')), src


@pytest.mark.skipif(not _PYTHONS, reason='slow: set GINTRAIN_INSTALL_PYTHONS=1')
def test_every_python_present_installs_and_runs_or_is_refused(wheel, tmp_path):
  whl, src = wheel
  found = _candidate_pythons()
  assert any(v in found for v in SUPPORTED), found
  report = []
  for version, exe in sorted(found.items()):
    env_dir = tmp_path / f'py{version[0]}{version[1]}'
    _run([exe, '-m', 'venv', str(env_dir)])
    pip = [str(env_dir / 'bin' / 'python'), '-m', 'pip', 'install', '-q',
           '--disable-pip-version-check']
    if version not in SUPPORTED:
      # `pip install .` (the README's command; a wheel has no setup.py, and
      # old pips resolve every dependency before reading its Requires-Python).
      for target in (str(src),):
        start = time.monotonic()
        proc = subprocess.run(pip + [target], capture_output=True, text=True,
                              timeout=300, check=False)
        took = time.monotonic() - start
        assert proc.returncode != 0, (version, target)
        assert '3.11' in proc.stdout + proc.stderr, proc.stderr[-2000:]
        assert took < 60, (version, target, took)
        report.append(f'{version}: refused ({target}) in {took:.1f} s')
      continue
    start = time.monotonic()
    _run(pip + [str(whl)])
    installed = time.monotonic() - start
    workdir, elsewhere = tmp_path / f'run{version}', tmp_path / f'cwd{version}'
    elsewhere.mkdir()
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    env.pop('PYTHONPATH', None)
    start = time.monotonic()
    _run([str(env_dir / 'bin' / 'gintrain'), f'--workdir={workdir}'],
         cwd=str(elsewhere), env=env)
    ran = time.monotonic() - start
    records = [json.loads(line) for line in
               (workdir / 'metrics.jsonl').read_text().splitlines()]
    final = [r for r in records if r['split'] == 'eval'][-1]
    assert final['accuracy'] >= 0.95, (version, final)
    report.append(f'{version}: installed in {installed:.0f} s, default'
                  f' experiment {final["accuracy"]:.3f} accuracy in {ran:.0f} s')
  print('\n'.join(report))
