"""``gintrain sweep``: many runs from one gin config (see runner/cli/sweep.py).

Modules: :mod:`.spec` (the sweep file and trial expansion), :mod:`.trials`
(trial names, workdirs, records and the trial process), :mod:`.executors`
(local, slurm, print), :mod:`.status` (the results table), :mod:`.plot`
and :mod:`.search` (Optuna studies; the ``[sweep]`` extra).
"""
