"""gintrain --help, gintrain eval and gintrain compare (in-process)."""

import json
import os
import subprocess
import sys

from absl import flags

from gintrain.runner import train
from gintrain.runner.cli import flags as runner_flags
from gintrain.runner.cli import main as cli_main

from tiny import TINY  # pylint: disable=g-bad-import-order


def records(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def test_help_lists_every_runner_flag(capsys):
  for arg in ('--help', '-h'):
    assert train.main_with_flags(['gintrain', arg]) == 0
    out = capsys.readouterr().out
    for module in runner_flags.FLAG_MODULES:
      for flag in flags.FLAGS.get_flags_for_module(module):
        assert f'--{flag.name}' in out or f'--[no]{flag.name}' in out, (
            flag.name)
    assert '--checkpoint' in out and '--helpfull' in out
    # Gin flags first, then the run's, then the multi-process ones.
    listed = [line.strip() for line in out.split('\n')
              if line.startswith('  --')]
    for earlier, later in (('--gin_file', '--workdir'),
                           ('--workdir', '--resume'),
                           ('--init_from', '--[no]dry_run'),
                           ('--[no]dry_run', '--checkpoint'),
                           ('--checkpoint', '--coordinator_address')):
      assert listed.index(earlier) < listed.index(later)


def test_help_console_script_exits_0():
  proc = subprocess.run(
      [sys.executable, '-c', 'from gintrain.runner.cli.main import run; run()',
       '--help'], capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert '--gin_file' in proc.stdout and '--helpfull' in proc.stdout


def test_eval_matches_the_runs_final_eval(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert train.main_with_flags(['gintrain', f'--workdir={workdir}', *TINY]) == 0
  final = records(workdir, 'eval')[-1]
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', 'eval', f'--workdir={workdir}']) == 0
  out = capsys.readouterr().out
  got = records(workdir, 'eval_only')
  assert len(got) == 1 and got[0]['step'] == 12
  for key in ('loss', 'accuracy'):
    assert got[0][key] == final[key]  # exactly
  assert out.startswith('eval_only step 12 (') and 'accuracy=' in out
  # A step, with the run's gin files instead of config.parsed.gin.
  at8 = [r for r in records(workdir, 'eval') if r['step'] == 8][0]
  assert train.main_with_flags(['gintrain', 'eval', f'--workdir={workdir}',
                                '--checkpoint=8', *TINY]) == 0
  got = records(workdir, 'eval_only')[-1]
  assert got['step'] == 8 and got['loss'] == at8['loss']
  # Nothing was trained: the checkpoints are those of the run.
  assert sorted(os.listdir(workdir / 'checkpoints')) == [
      'checkpoint_12', 'checkpoint_4', 'checkpoint_8']


def test_eval_errors(tmp_path, capsys):
  assert train.main_with_flags(['gintrain', 'eval']) == 1
  assert 'gintrain eval needs --workdir' in capsys.readouterr().err
  assert train.main_with_flags(['gintrain', 'eval',
                                f'--workdir={tmp_path}']) == 1
  err = capsys.readouterr().err
  assert err.strip() == (f'gintrain: error: --workdir={tmp_path} holds no'
                         f" {cli_main.PARSED_CONFIG}; give the run's"
                         ' --gin_file flags.')
  assert train.main_with_flags(['gintrain', f'--workdir={tmp_path}/w',
                                '--checkpoint=3', *TINY]) == 1
  assert '--checkpoint is a flag of `gintrain eval`' in capsys.readouterr().err


def test_compare_plots_runs(tmp_path, capsys):
  for name, lr in (('a', '0.01'), ('b', '0.001')):
    assert train.main_with_flags(
        ['gintrain', f'--workdir={tmp_path / name}', *TINY,
         f'--gin.optimizer.learning_rate={lr}']) == 0
  out = tmp_path / 'cmp.png'
  assert train.main_with_flags(['gintrain', 'compare', str(tmp_path / 'a'),
                                str(tmp_path / 'b'), f'--out={out}']) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(out) > 10_000
  capsys.readouterr()
  assert train.main_with_flags(['gintrain', 'compare', str(tmp_path / 'a'),
                                str(tmp_path / 'nope')]) == 1
  assert capsys.readouterr().err.strip() == (
      f'gintrain compare: error: {tmp_path / "nope"}: no metrics.jsonl (not a'
      ' run directory?).')


def test_help_names_every_subcommand(capsys):
  from gintrain.runner.cli import main as cli  # pylint: disable=g-import-not-at-top
  assert cli.main_with_flags(['gintrain', '--help']) == 0
  out = capsys.readouterr().out
  for name in [*cli.TOOLS, 'eval']:
    assert f'gintrain {name} ' in out, name
