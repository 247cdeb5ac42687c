"""Tasks: the math of one kind of problem (loss, metrics, evaluation).

:class:`~.base.Task` is the interface; :mod:`.classification` and
:mod:`.regression` are provided. A task of your own subclasses ``Task`` and
is bound in gin (``train.task = @my_module.MyTask``).
"""
