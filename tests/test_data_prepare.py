"""gintrain data prepare: killed mid-way and rerun, byte-identical output;
--dry_run; a changed plan is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from gintrain.runner.cli import main as cli_main
from gintrain.runner.data import prepare
from gintrain.runner.data import sources


def _inputs(root):
  rng = np.random.default_rng(0)
  for i in range(8):
    with open(root / f'part{i}.jsonl', 'w', encoding='utf-8') as f:
      for _ in range(30):
        n = int(rng.integers(5, 200))
        f.write(json.dumps({'text': ''.join(
            rng.choice(list('abcdef \n'), size=n))}) + '\n')
  return [str(root / f'part{i}.jsonl') for i in range(8)]


def _command(out, inputs, workers):
  return [sys.executable, '-m', 'gintrain.runner.train', 'data', 'prepare',
          f'--out={out}', f'--workers={workers}', *inputs]


def test_killed_and_rerun_is_byte_identical(tmp_path):
  inputs = _inputs(tmp_path)
  whole = tmp_path / 'whole'
  assert cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', f'--out={whole}', '--no_progress',
       *inputs]) == 0
  manifest = sources.read_manifest(str(whole))
  assert manifest['documents'] == 240 and len(manifest['shards']) == 8
  assert manifest['tokenizer']['hash'] == 'byte'
  assert manifest['shards'][0]['sources'][0]['size'] == os.path.getsize(
      inputs[0])

  killed = tmp_path / 'killed'
  env = dict(os.environ, GINTRAIN_PREPARE_DELAY_S='0.5',
             JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(_command(killed, inputs, 1), env=env,  # pylint: disable=consider-using-with
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not (killed / 'shard-00002.json').exists():
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(p.name for p in killed.glob('shard-*.json'))
  assert 3 <= len(done) < 8 and not (killed / 'manifest.json').exists()
  # rerun with 2 workers: finishes the rest, keeps the finished shards
  before = (killed / 'shard-00000.array_record').stat().st_mtime_ns
  result = subprocess.run(_command(killed, inputs, 2), env=dict(
      os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert 'ETA' in result.stderr  # the progress line
  assert (killed / 'shard-00000.array_record').stat().st_mtime_ns == before
  assert prepare.hash_of(str(killed)) == prepare.hash_of(str(whole))
  assert sorted(os.listdir(killed)) == sorted(os.listdir(whole))


def test_dry_run_and_changed_inputs(tmp_path, capsys):
  inputs = _inputs(tmp_path)
  assert cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', '--dry_run', '--length=64',
       '--no_progress', *inputs]) == 0
  out = capsys.readouterr().out
  assert 'Would write 8 shards, 240 documents' in out
  assert 'packing efficiency at length 64' in out
  assert not list(tmp_path.glob('*.array_record'))
  out_dir = tmp_path / 'out'
  assert cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', f'--out={out_dir}', '--no_progress',
       *inputs[:2]]) == 0
  capsys.readouterr()
  assert cli_main.main_with_flags(
      ['gintrain', 'data', 'prepare', f'--out={out_dir}', '--no_progress',
       *inputs]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('gintrain: error:')
  assert 'holds another preparation' in err[0]
