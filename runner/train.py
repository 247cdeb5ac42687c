"""``python -m gintrain.runner.train``: the runner's entry point.

The same as the ``gintrain`` console script; see
:mod:`gintrain.runner.cli.main` for the flags, outputs and exit statuses.
"""

from gintrain.runner.cli.main import main_with_flags, run  # pylint: disable=unused-import

__all__ = ['main_with_flags', 'run']

if __name__ == '__main__':
  run()
