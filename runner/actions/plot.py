"""The end-of-run plot: ``<workdir>/metrics.png`` from ``metrics.jsonl``.

The last action of the default list (``runner.training.action_list``):
after every other action's end-of-run calls it flushes the run's writers
(so the final records are in the file) and draws the curves
(``runner.outputs.plots.plot_metrics``). A run without the JSON-lines
writer (``train.writers`` without ``@writers.jsonl``) has no file to plot:
it logs that and draws nothing. Replace or drop it with
``train.replace_actions = {'plot': ...}``.

    >>> import os, tempfile
    >>> from gintrain.runner.outputs import writers
    >>> workdir = tempfile.mkdtemp()
    >>> writer = writers.JsonlWriter(workdir)
    >>> writer.write_scalars(1, {'loss': 1.0})
    >>> action = PlotMetrics(writer)
    >>> action.bind(None, workdir)
    >>> action.after_end(1, None, {})
    >>> os.path.exists(os.path.join(workdir, 'metrics.png'))
    True
"""

from absl import logging

from gintrain.lib import storage
from gintrain.runner.actions import base
from gintrain.runner.outputs import plots
from gintrain.runner.outputs import workdir as workdir_lib

__all__ = ['PlotMetrics']


class PlotMetrics(base.Action):
  """Draws the metrics plot after the run (see the module doc).

  Args:
    writer: the run's metric writer (flushed before the file is read).
    main: whether this is process 0 (the only one drawing).
  """

  name = 'plot'

  def __init__(self, writer, main: bool = True):
    self.writer, self.main = writer, main
    self.workdir = None

  def bind(self, run, workdir):
    self.workdir = workdir

  def due(self, step, last):
    return False  # nothing per step: the plot is drawn in after_end

  def __call__(self, step, state, metrics):
    del step, state, metrics

  def after_end(self, step, state, metrics):
    if not self.main:
      return
    self.writer.flush()
    source = workdir_lib.path(self.workdir, workdir_lib.METRICS_FILE)
    if not storage.exists(source):
      logging.info('No %s (train.writers without @writers.jsonl): no'
                   ' metrics plot.', source)
      return
    plots.plot_metrics(source,
                       workdir_lib.path(self.workdir, workdir_lib.METRICS_PLOT))
