"""Test setup: 8 virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# A failing test shows the last lines of each captured stream and log, not all
# of them (a runner test captures its whole training log; one failing run used
# to print tens of thousands of lines). GINTRAIN_TEST_LOG_LINES=0 shows all.
_TAIL_LINES = int(os.environ.get('GINTRAIN_TEST_LOG_LINES', '40'))


def _tail(text: str, lines: int) -> str:
  parts = text.splitlines()
  if len(parts) <= lines:
    return text
  return '\n'.join([f'[... {len(parts) - lines} earlier lines cut;'
                    ' GINTRAIN_TEST_LOG_LINES=0 shows them]',
                    *parts[-lines:]]) + '\n'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  report = (yield).get_result()
  if _TAIL_LINES > 0 and report.failed:
    report.sections = [(title, _tail(content, _TAIL_LINES))
                       for title, content in report.sections]



# pytest-xdist (.ci/run: `-n 3 --dist loadfile`) hands whole files to its
# workers from a queue. By default it orders that queue by the number of
# tests in a file, so the one-test files (the SIGKILL soak, the S3 crash
# test, the SLURM sweep: minutes each) were handed out last and a worker ran
# them alone at the end while the others idled. Here the queue keeps the
# collection order (`--no-loadscope-reorder`, set below so that a plain
# `pytest -n 3 --dist loadfile` does the same), and the collection starts
# with the longest files (measured, longest first), so short files fill in
# at the end. The rest keep pytest's order.
_LONGEST_FIRST = (
    'test_sharding.py', 'test_multihost.py', 'test_reliability_kills.py',
    'test_sweep.py', 'test_reliability_round3.py', 'test_sweep_optuna.py',
    'test_readme.py', 'test_object_store_crash.py',
    'test_object_store_runner.py', 'test_sweep_slurm.py',
    'test_checkpoint_hardening.py', 'test_checkpoint_multiprocess.py',
    'test_sharded_format.py', 'test_reliability_signals.py',
    'test_llama.py', 'test_hf.py', 'test_docs.py', 'test_install.py')
# (xdist hands the first file to worker 0, the second to worker 1, ..., then
# a second file to each in the same order: test_sharding and test_sweep,
# test_multihost and test_reliability_round3 (two of the three files that
# start the SLURM cluster, which runs one at a time on this machine: on one
# worker they do not wait for each other), the kill soak and the Optuna
# sweep.)
# Files whose tests share no module fixture and take long together (the
# README/guide examples: one training run after another): with loadfile,
# each of their tests is a unit of its own, so several workers share them.
_ONE_UNIT_PER_TEST = ('test_readme.py',)


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist >= 3.6
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue('dist') != 'loadfile':
    return None
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=g-import-not-at-top

  class Scheduling(LoadFileScheduling):

    def _split_scope(self, nodeid):
      if nodeid.split('::', 1)[0].endswith(_ONE_UNIT_PER_TEST):
        return nodeid
      return super()._split_scope(nodeid)

  return Scheduling(config, log)
