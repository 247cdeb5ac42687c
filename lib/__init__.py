"""gintrain's library: the ``flax.training`` toolkit without flax.

Modules mirror flax's: ``checkpoints``, ``lr_schedule``, ``train_state``,
``early_stopping``, ``common_utils``, plus ``struct``, ``serialization`` and
``errors`` (flax's ``flax.struct``, ``flax.serialization``, ``flax.errors``).
Replace ``from flax.training import X`` by ``from gintrain.lib import X``.
"""
