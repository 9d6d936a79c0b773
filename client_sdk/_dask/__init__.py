"""Dask collections and graphs on an apportion cluster (the ``apportion[dask]`` extra).

:mod:`.capture` keeps what ``dask.annotate`` asked for where dask drops it;
:mod:`.graph` turns a graph into tasks; :mod:`.api` is ``Client.compute``,
``persist`` and ``get``. What a worker runs for each task is
:mod:`apportion_common.dask_node` (workers import no client code).
Dask is imported only when a collection is run.
"""
