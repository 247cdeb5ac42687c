"""Warm starts: JAX's persistent compilation cache, and the process's start.

A relaunched run (a requeued job, the next trial of a sweep) compiles the
same programs again; with the cache on, XLA's executables are read back from
``--compilation_cache_dir`` instead. It is on by default: where JAX is already told to
cache (``JAX_COMPILATION_CACHE_DIR``), else under the user's cache directory
(``$XDG_CACHE_HOME/gintrain/jax_cache``, else ``~/.cache/gintrain/jax_cache``); ``--compilation_cache_dir=''`` (or
``none``) turns it off. The directory may be an object-store URL when JAX's
file layer reaches it (``gs://``; ``s3://`` with fsspec's s3fs).
JAX caches only programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s by default) to compile.
The cache is unbounded (JAX's size bound needs an access-time file beside
every entry, which entries written without it lack): clear the folder to
reclaim the space. A torn or unreadable entry is a warning and a recompile.

    >>> resolve_dir('none') is None
    True
    >>> resolve_dir('/tmp/c')
    '/tmp/c'
"""

import os
import time

import jax
from absl import logging

__all__ = ['default_dir', 'resolve_dir', 'enable', 'process_start_time']

_OFF = ('', 'none', 'off')


def default_dir() -> str:
  """``<user cache dir>/gintrain/jax_cache``."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'gintrain', 'jax_cache')


def resolve_dir(value: str | None) -> str | None:
  """The cache directory a flag value names (None: off)."""
  if value is None:  # the flag unset: JAX's own setting, else ours
    return jax.config.jax_compilation_cache_dir or default_dir()
  if value.strip().lower() in _OFF:
    return None
  if '://' in value:
    return value.rstrip('/')
  return os.path.abspath(os.path.expanduser(value))


def enable(value: str | None) -> str | None:
  """Points JAX's persistent compilation cache at ``value`` (a flag value:
  see :func:`resolve_dir`), before anything compiles; returns the
  directory, or None when off. A directory that cannot be created turns the
  cache off with a warning (the run itself does not need it)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  directory = resolve_dir(value)
  current = jax.config.jax_compilation_cache_dir
  if directory is not None and '://' not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      logging.warning('--compilation_cache_dir=%s cannot be created (%s):'
                      ' compiling without the cache.', directory,
                      e.strerror or e)
      directory = None
  if directory == current:
    return directory
  jax.config.update('jax_compilation_cache_dir', directory)
  compilation_cache.reset_cache()  # the next compile opens the new one
  return directory


def process_start_time() -> float:
  """When this process started (Unix time, to about 10 ms on Linux: its
  age from ``/proc/self/stat`` against the boot-time clock), else the
  process table's start time (psutil), else this module's import time."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    age = (time.clock_gettime(time.CLOCK_BOOTTIME) -
           ticks / os.sysconf('SC_CLK_TCK'))
    return time.time() - age
  except (OSError, ValueError, IndexError, AttributeError):
    pass
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return float(psutil.Process().create_time())
  except Exception:  # pylint: disable=broad-except
    return _IMPORTED


_IMPORTED = time.time()
