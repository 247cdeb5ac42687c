"""Actions: everything the loop does besides the step.

:class:`~.base.Action` is the interface (called as ``action(step, state,
metrics)`` when ``action.due(step, last)``); :class:`~.base.PeriodicAction`
runs every N steps. Provided: train reports (:mod:`.report`), evaluation
(:mod:`.evaluation`), early stopping (:mod:`.early_stop`), keep-best
(:mod:`.keep_best`), checkpoints (:mod:`.checkpoint`), agreed preemption
(:mod:`.preempt`), profiler traces (:mod:`.profiler`), samples
(:mod:`.samples`), the spike guard (:mod:`.spike_guard`), goodput records
(:mod:`.goodput`) and the divergence check (:mod:`.finite`); each has an
end-of-run method ``end``. Your own are bound with ``train.actions =
[@my_module.MyAction()]``; ``train.replace_actions = {'eval':
@my_module.MyEval}`` replaces a built-in one
(``runner.training.action_list`` builds the list).
"""
