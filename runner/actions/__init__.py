"""Actions: everything the loop does besides the step.

:class:`~.base.Action` is the interface (called as ``action(step, state,
metrics)`` when ``action.due(step, last)``); :class:`~.base.PeriodicAction`
runs every N steps. Provided: train reports (:mod:`.report`), evaluation
(:mod:`.evaluation`), early stopping (:mod:`.early_stop`), keep-best
(:mod:`.keep_best`), checkpoints (:mod:`.checkpoint`), agreed preemption
(:mod:`.preempt`), profiler traces (:mod:`.profiler`). Your own are bound
with ``train.actions = [@my_module.MyAction()]``.
"""
