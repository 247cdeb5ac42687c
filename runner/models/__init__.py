"""Models: plain-JAX classifiers, the calling convention, and an nnx adapter.

* :mod:`.plain`: ``mlp`` and ``cnn`` in plain JAX with flax.linen's parameter
  names (a ``Model`` has ``init``/``apply``).
* :mod:`.calling`: how the runner calls any model with flax's convention
  (``init``/``apply``; ``train=``, ``rngs=``, ``mutable=`` where accepted), so
  flax linen modules work unchanged.
* :mod:`.nnx`: an adapter giving a flax ``nnx`` module that convention.
"""
