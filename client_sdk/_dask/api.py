"""``Client.compute``, ``persist`` and ``get`` for dask collections and graphs.

Each turns collections into one graph as ``dask.compute`` would (optimized
unless ``optimize_graph=False``), reads the annotations it carries before they
are optimized away (:mod:`.capture`), submits its tasks in one batch
(:mod:`.graph`) and hands back futures, collections backed by them, or
results. Only the keys asked for come back to the client; the others stay on
the workers until no task needs them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._spec import TaskOptions
from ..future import Future
from .capture import Notes, from_layers, install
from .graph import to_specs

if TYPE_CHECKING:
    from ..client import Client


def require_dask() -> None:
    """Dask collections need dask: say how to get it."""
    try:
        import dask  # noqa: F401
    except ImportError:
        raise ImportError(
            "running dask collections needs dask: pip install 'apportion[dask]'"
        ) from None
    install()


#: The open clients that are dask's default scheduler, newest last.
_defaults: list[weakref.ref[Client[Any]]] = []
_defaults_lock = threading.Lock()
#: dask's configuration while any of them is open (leaving it restores dask's own)
_default_config: Any = None


def as_dask_default(client: Client[Any]) -> Callable[[], None] | None:
    """Make ``client`` dask's scheduler (a plain ``x.compute()`` runs on it),
    as Dask's own Client does. Returns what undoes that (None without dask).
    With several such clients open, the newest that is still open is used."""
    global _default_config
    try:
        import dask
    except ImportError:
        return None
    install()
    ref = weakref.ref(client)
    with _defaults_lock:
        if not _defaults:
            _default_config = dask.config.set(
                {"scheduler": _default_get, "dataframe.shuffle.method": "tasks"}
            )
        _defaults.append(ref)

    def undo() -> None:
        global _default_config
        with _defaults_lock:
            if ref in _defaults:
                _defaults.remove(ref)
            if not _defaults and _default_config is not None:
                config, _default_config = _default_config, None
                config.__exit__(None, None, None)

    return undo


def _default_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """dask's scheduler function while a default client is open."""
    with _defaults_lock:
        clients = [c for ref in reversed(_defaults) if (c := ref()) is not None]
    if not clients:
        raise RuntimeError("no apportion Client is open to run this on")
    return clients[0].get(dsk, keys, **kwargs)


def _layer_notes(obj: Any) -> Notes:
    """The annotations the HighLevelGraphs inside ``obj`` carry (an expression
    of dask's, a HighLevelGraph, or a collection backed by one)."""
    from dask._expr import Expr, HLGExpr
    from dask.base import is_dask_collection
    from dask.highlevelgraph import HighLevelGraph

    names: dict[str, dict[str, Any]] = {}

    def read(graph: Any) -> None:
        names.update(from_layers(graph))

    if isinstance(obj, Expr):
        for node in obj.walk():
            if isinstance(node, HLGExpr):
                read(node.hlg)
    elif isinstance(obj, HighLevelGraph):
        read(obj)
    elif is_dask_collection(obj) and not isinstance(getattr(type(obj), "expr", None), property):
        graph = obj.__dask_graph__()
        if isinstance(graph, HighLevelGraph):
            read(graph)
    return Notes(names)


def _flatten(keys: Any) -> list[Any]:
    if isinstance(keys, list):
        return [k for item in keys for k in _flatten(item)]
    return [keys]


def _repack(keys: Any, values: dict[Any, Any]) -> Any:
    if isinstance(keys, list):
        return [_repack(item, values) for item in keys]
    return values[keys]


def _submit(
    client: Client[Any], graph: Any, notes: Notes, options: TaskOptions, want: list[Any]
) -> dict[Any, Future[Any]]:
    """Submit ``graph``'s tasks; Futures of the keys in ``want``. The other
    tasks' futures go at once: the scheduler keeps them while a wanted task
    needs them."""
    submission = to_specs(graph, notes, options, client)
    made = client._submit_specs(submission.specs)
    futures = {spec.key: future for spec, future in zip(submission.specs, made, strict=True)}
    wanted: dict[Any, Future[Any]] = {}
    for key in want:
        existing = submission.existing.get(key)
        wanted[key] = existing if existing is not None else futures[submission.names[key]]
    return wanted


def get(client: Client[Any], dsk: Any, keys: Any, options: TaskOptions) -> Any:
    """Run a graph (a dict, a HighLevelGraph, or a dask expression as
    ``dask.compute`` passes it to its scheduler); the results of ``keys``, in
    their nesting (lists of keys)."""
    require_dask()
    notes = _layer_notes(dsk)
    graph = dsk.__dask_graph__() if hasattr(dsk, "__dask_graph__") else dsk
    want = _flatten(keys)
    futures = _submit(client, graph, notes, options, want)
    ordered = [futures[key] for key in want]

    def repack(values: list[Any]) -> Any:
        return _repack(keys, dict(zip(want, values, strict=True)))

    if client.asynchronous:

        async def gather() -> Any:
            return repack(await client.gather(ordered))

        return gather()
    return repack(client.gather(ordered))


def compute(
    client: Client[Any], collections: Any, optimize_graph: bool, options: TaskOptions
) -> Any:
    """A Future of each collection's value (``x.compute()``'s), or the list."""
    require_dask()
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr, is_dask_collection

    single = not isinstance(collections, list | tuple)
    futures: list[Any] = []
    for collection in [collections] if single else list(collections):
        if not is_dask_collection(collection):
            futures.append(collection)
            continue
        notes = _layer_notes(collection)
        expr = FinalizeCompute(collections_to_expr([collection], optimize_graph)).optimize()
        (key,) = _flatten(expr.__dask_keys__())
        futures.append(_submit(client, expr.__dask_graph__(), notes, options, [key])[key])
    return futures[0] if single else futures


def persist(
    client: Client[Any], collections: Any, optimize_graph: bool, options: TaskOptions
) -> Any:
    """The same collections, backed by results held on the cluster."""
    require_dask()
    import dask
    from dask.base import is_dask_collection

    single = not isinstance(collections, list | tuple)
    persisted: list[Any] = []
    for collection in [collections] if single else list(collections):
        if not is_dask_collection(collection):
            persisted.append(collection)
            continue
        notes = _layer_notes(collection)
        (optimized,) = dask.optimize(collection) if optimize_graph else (collection,)
        keys = _flatten(optimized.__dask_keys__())
        futures = _submit(client, optimized.__dask_graph__(), notes, options, keys)
        rebuild, args = optimized.__dask_postpersist__()
        persisted.append(rebuild(futures, *args))
    return persisted[0] if single else persisted
