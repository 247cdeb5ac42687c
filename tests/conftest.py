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

