"""Data: where batches come from, per process, resumably.

:class:`~.base.DataSource` is the interface; :class:`~.arrays.ArraySource`
(in-memory arrays, batch = f(seed, step)) and
:class:`~.iterable.IterableSource` (any gin-bound callable returning an
iterable of batch dicts) are provided; :mod:`.datasets` has bundled data.
"""
