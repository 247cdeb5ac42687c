"""A ``jax.profiler`` trace of a range of steps, written into the workdir."""

import shutil
import tempfile

import jax
from absl import logging

from gintrain.lib import storage
from gintrain.runner.actions import base

__all__ = ['Profile', 'PROFILE_DIR']

PROFILE_DIR = 'profile'


class Profile(base.Action):
  """Traces steps ``first..last`` (inclusive) into ``<workdir>/profile``
  (TensorBoard's profile plugin or Perfetto read it).

  The trace starts after step ``first - 1`` and stops after step ``last``
  once its work is done (the state is waited for). On an object-store
  workdir (``s3://...``) the trace is written to a local temporary folder
  and uploaded when it stops.
  """

  name = 'profiler'

  def __init__(self, workdir: str, first: int, last: int):
    self.logdir = storage.join(workdir, PROFILE_DIR)
    self.first, self.last = first, last
    self.active = False
    self.staging = None  # the local folder of a trace bound for a URL

  def on_start(self, step):
    if self.first - 1 <= step < self.last:
      self.start()

  def due(self, step, last):
    return step in (self.first - 1, self.last) or (last and self.active)

  def start(self):
    local = storage.local_file(self.logdir)
    if local is None:
      self.staging = tempfile.mkdtemp(prefix='gintrain-profile-')
      local = self.staging
    jax.profiler.start_trace(local)
    self.active = True

  def __call__(self, step, state, metrics):
    if step == self.first - 1 and not self.active:
      self.start()
    elif self.active:
      jax.block_until_ready(state)
      self.stop()
      logging.info('profile of steps %d..%d written to %s', self.first,
                   step, self.logdir)

  def stop(self):
    if not self.active:
      return
    self.active = False
    jax.profiler.stop_trace()
    if self.staging is not None:
      staging, self.staging = self.staging, None
      try:
        storage.upload_tree(staging, self.logdir)
      finally:
        shutil.rmtree(staging, ignore_errors=True)

  def close(self):
    self.stop()
