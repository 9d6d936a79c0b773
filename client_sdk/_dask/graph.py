"""A dask graph as apportion tasks: one TaskSpec per node, inputs first.

Each node becomes a task that runs it (:func:`apportion_common.dask_node.run_node`)
on its dependencies' results, which travel between workers as any result
does. A node that is one of this client's Futures (a persisted collection's)
is already on the cluster: its dependents use it directly, and a node that
holds one inside (dask fused it in) takes its result as an input too. Dask keys become
apportion keys (``("x-1f3a", 0)`` -> ``"x-1f3a-0"``), so the same graph
computed twice is the same tasks.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from apportion_common import serialize
from apportion_common.dask_node import held_result, run_node
from apportion_common.resources import check_resources
from protos import apportion_pb2 as pb

from .._spec import TaskOptions
from ..future import Future
from .capture import Notes, combined, evaluated


@dataclass
class Submission:
    """The tasks of a graph, ready to submit."""

    specs: list[pb.TaskSpec] = field(default_factory=list)
    #: dask key -> apportion key
    names: dict[Any, str] = field(default_factory=dict)
    #: dask keys already on the cluster: this client's Futures (persisted)
    existing: dict[Any, Future[Any]] = field(default_factory=dict)


def _names(keys: Iterable[Any]) -> dict[Any, str]:
    """An apportion key for each dask key, distinct within the graph."""
    names: dict[Any, str] = {}
    taken: set[str] = set()
    for key in keys:
        name = "-".join(map(str, key)) if isinstance(key, tuple) else str(key)
        if name in taken:
            name = repr(key)  # two keys that read the same: keep them apart
        names[key] = name
        taken.add(name)
    return names


def _in_order(graph: Mapping[Any, Any]) -> list[Any]:
    """The graph's keys, each after every key it depends on (a work list, not
    recursion: a long chain must not reach Python's recursion limit)."""
    order: list[Any] = []
    seen: set[Any] = set()
    for start in graph:
        if start in seen:
            continue
        stack: list[tuple[Any, bool]] = [(start, False)]
        while stack:
            key, expanded = stack.pop()
            if expanded:
                order.append(key)
                continue
            if key in seen:
                continue
            seen.add(key)
            stack.append((key, True))
            for dep in graph[key].dependencies:
                if dep not in graph:
                    raise KeyError(f"the graph's task {key!r} needs {dep!r}, which it lacks")
                if dep not in seen:
                    stack.append((dep, False))
    return order


def _options_for(found: list[dict[str, Any]], key: Any, defaults: TaskOptions) -> TaskOptions:
    """The call's options, with what annotations ask of this task on top:
    resources it needs as much of as either says; its priority and retries,
    and its workers, where the annotations give them."""
    if not found:
        return defaults
    notes = evaluated(combined(found), key)
    resources = dict(defaults.resources)
    for name, amount in check_resources(notes.get("resources") or {}).items():
        resources[name] = max(resources.get(name, 0.0), amount)
    workers = notes.get("workers") or defaults.workers
    return TaskOptions(
        resources=resources,
        retries=int(notes["retries"]) if notes.get("retries") is not None else defaults.retries,
        priority=int(notes["priority"]) if notes.get("priority") is not None else defaults.priority,
        workers=(workers,) if isinstance(workers, str) else tuple(workers),
        # A preference needs workers to prefer.
        allow_other_workers=bool(workers)
        and (bool(notes.get("allow_other_workers")) or defaults.allow_other_workers),
    )


class _NodePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Pickles a graph node; each of this client's Futures in it (a
    persisted result dask's optimization fused into the node) becomes a
    placeholder that the worker fills with the result."""

    def __init__(self, file: io.BytesIO, client: object) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.client = client
        self.held: dict[str, None] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Future):
            if obj.client is not self.client:
                raise ValueError(f"the graph holds future {obj.key!r} of another client")
            self.held[obj.key] = None
            return held_result, (obj.key,)
        return super().reducer_override(obj)


def _pickled(node: Any, client: object) -> tuple[bytes, tuple[str, ...]]:
    """``node`` pickled, and the keys of the results it holds."""
    buffer = io.BytesIO()
    pickler = _NodePickler(buffer, client)
    try:
        pickler.dump(node)
    except Exception as exc:
        raise serialize.SerializationError(
            f"cannot pickle the dask task {node!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return buffer.getvalue(), tuple(pickler.held)


def to_specs(
    graph: Mapping[Any, Any], notes: Notes, defaults: TaskOptions, client: object
) -> Submission:
    """The tasks of ``graph`` (dask keys -> graph nodes, or legacy tasks)."""
    from dask._task_spec import DataNode, convert_legacy_graph

    nodes = convert_legacy_graph(dict(graph))
    submission = Submission(names=_names(nodes))
    names = submission.names
    for key in _in_order(nodes):
        node = nodes[key]
        if isinstance(node, DataNode) and isinstance(node.value, Future):
            if node.value.client is not client:
                raise ValueError(f"the graph holds future {node.value.key!r} of another client")
            submission.existing[key] = node.value
            names[key] = node.value.key
            continue
        dependencies = tuple(node.dependencies)
        pickled, held = _pickled(node, client)
        refs = [serialize.InputRef(names[dep]) for dep in dependencies]
        refs += [serialize.InputRef(key) for key in held]
        options = _options_for(notes.of(key, node), key, defaults)
        submission.specs.append(
            pb.TaskSpec(
                key=names[key],
                payload=serialize.dump_call(run_node, (pickled, dependencies, held, *refs), {}),
                resources=options.resources,
                dependencies=list(dict.fromkeys([*(names[dep] for dep in dependencies), *held])),
                priority=options.priority,
                retries=options.retries,
                workers=options.workers,
                allow_other_workers=options.allow_other_workers,
            )
        )
    return submission
