"""What a worker runs for one task of a dask graph (client_sdk submits it).

It imports nothing of dask: the node itself, unpickled, knows what to call.
A node may hold results already on the cluster (a persisted collection's,
fused into it by dask's optimization): they travel as placeholders naming
their task, and unpickling the node here puts each result in its place.

Nodes are unpickled one at a time: the first one imports dask's modules, and
task threads importing a package side by side can see it half made.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

_results = threading.local()
_unpickling = threading.Lock()


def held_result(key: str) -> Any:
    """(While a node is unpickled.) The result of task ``key``, an input of this run."""
    return _results.values[key]


def run_node(
    node: bytes, dependencies: tuple[Any, ...], held: tuple[str, ...], *values: Any
) -> Any:
    """Evaluate dask graph node ``node`` (pickled) on its dependencies'
    values (dask keys ``dependencies``, in order), then the results it holds
    (task keys ``held``)."""
    n = len(dependencies)
    with _unpickling:
        _results.values = dict(zip(held, values[n:], strict=True))
        try:
            graph_node = pickle.loads(node)
        finally:
            _results.values = None
    return graph_node(dict(zip(dependencies, values[:n], strict=True)))


class Annotated:
    """A user function that carries the annotations it was passed under
    (``dask.annotate``), so that they reach every task that calls it, however
    dask's optimization renames or fuses them. Calling it calls the function."""

    __slots__ = ("annotations", "func")

    def __init__(self, func: Any, annotations: dict[str, Any]) -> None:
        self.func = func
        self.annotations = annotations

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    @property
    def __name__(self) -> str:  # dask names tasks after their function
        return str(getattr(self.func, "__name__", type(self.func).__name__))

    def __dask_tokenize__(self) -> tuple[str, str, str]:
        from dask.tokenize import tokenize

        return ("apportion.Annotated", tokenize(self.func), repr(sorted(self.annotations.items())))

    def __reduce__(self) -> tuple[type[Annotated], tuple[Any, dict[str, Any]]]:
        return Annotated, (self.func, self.annotations)

    def __repr__(self) -> str:
        return f"<{self.__name__} annotated {self.annotations}>"
