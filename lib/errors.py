"""Exceptions raised by ``lib``.

The class names match ``flax.errors`` so code that catches them by name keeps
working. Every message ends with what to do about it.
"""

__all__ = [
    'GintrainError',
    'FlaxError',
    'InvalidCheckpointError',
    'AlreadyExistsError',
    'CheckpointReadError',
    'MsgpackDecodeError',
    'MPACheckpointingRequiredError',
    'MPARestoreTargetRequiredError',
    'MPARestoreDataCorruptedError',
]


def _rebuild(cls, args, state):
  """Unpickles an error without calling its (differently shaped) __init__."""
  err = cls.__new__(cls)
  Exception.__init__(err, *args)
  err.__dict__.update(state)
  return err


class GintrainError(Exception):
  """Base class of the library's errors (flax: ``FlaxError``).

  Errors keep their class, message and attributes when pickled (e.g. when
  re-raised from a worker process):

    >>> import pickle
    >>> err = pickle.loads(pickle.dumps(InvalidCheckpointError('/c/ckpt_3', 3)))
    >>> type(err).__name__, err.step
    ('InvalidCheckpointError', 3)
  """

  def __init__(self, message: str, hint: str = ''):
    self.hint = hint
    super().__init__(f'{message} {hint}'.strip())

  def __reduce__(self):
    return (_rebuild, (type(self), self.args, dict(self.__dict__)))


FlaxError = GintrainError
"""flax's name for :class:`GintrainError` (the same class, not a subclass).

``except errors.FlaxError`` catches every error of the library, as
``except flax.errors.FlaxError`` does for flax's:

  >>> issubclass(InvalidCheckpointError, FlaxError), FlaxError is GintrainError
  (True, True)
"""


class InvalidCheckpointError(GintrainError):
  """A save with ``overwrite=False`` would not be the newest checkpoint.

  Raised when the directory already holds a checkpoint at this step, or one
  that sorts after it (a larger step, or a non-numeric name such as
  ``checkpoint_best`` that starts with the prefix). Nothing is written.
  """

  def __init__(self, path, step):
    self.path, self.step = path, step
    super().__init__(
        f'Trying to save an outdated checkpoint at step: "{step}" and path:'
        f' "{path}".',
        'Save with a larger step, pass overwrite=True to replace it (and'
        ' delete every newer checkpoint), or use another prefix or directory.')


class AlreadyExistsError(GintrainError):
  """A rename target exists and overwriting was not requested."""

  def __init__(self, path):
    self.path = path
    super().__init__(
        f'Trying to overwrite an existing file: "{path}".',
        'Another writer may be saving into the same directory; pass'
        ' overwrite=True or use a separate directory per run.')


class CheckpointReadError(GintrainError, ValueError):
  """A checkpoint file could not be read or decoded (corrupt or truncated)."""

  def __init__(self, path, reason):
    self.path, self.reason = path, reason
    super().__init__(
        f'Checkpoint file "{path}" is unreadable: {reason}.',
        'The file is truncated or corrupt (e.g. copied while being written);'
        ' restore an older step or delete this file.')


class MsgpackDecodeError(GintrainError, ValueError):
  """Bytes given to ``msgpack_restore``/``from_bytes`` are not a valid tree."""

  def __init__(self, reason):
    self.reason = reason
    super().__init__(
        f'Cannot decode msgpack checkpoint bytes: {reason}.',
        'The bytes are truncated, corrupt, or were not written by to_bytes.')


class MPACheckpointingRequiredError(GintrainError):
  """A tree holds arrays that span processes, but no ``gda_manager`` was given."""

  def __init__(self, path, step):
    self.path, self.step = path, step
    super().__init__(
        f'Checkpoint failed at step: "{step}" and path: "{path}": the target'
        ' contains jax.Arrays that are not fully addressable by this process.',
        'Pass gda_manager=jax.experimental.array_serialization.serialization'
        '.GlobalAsyncCheckpointManager() to save_checkpoint_multiprocess and'
        ' restore_checkpoint.')


class MPARestoreTargetRequiredError(GintrainError):
  """A multi-process array in the file has no matching array in the target."""

  def __init__(self, path, step, key=None):
    self.path, self.step, self.key = path, step, key
    where = f' for key "{key}"' if key else ''
    super().__init__(
        f'Restore failed at step: "{step}" and path: "{path}": the checkpoint'
        f' holds a multi-process array{where} but the target has no'
        ' jax.Array at that place to take its sharding from.',
        'Pass a target with a non-fully-addressable jax.Array there, or'
        ' allow_partial_mpa_restoration=True to skip it.')


class MPARestoreDataCorruptedError(GintrainError):
  """The ``<checkpoint>_gda`` directory is missing or was never committed."""

  def __init__(self, step, path):
    self.path, self.step = path, step
    super().__init__(
        f'Restore failed at step: "{step}" and path: "{path}": the'
        ' multi-process array data is missing or was never committed.',
        'The save was interrupted; restore an older step.')
