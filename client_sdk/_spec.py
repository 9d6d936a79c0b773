"""Building a task's spec (``pb.TaskSpec``) from a ``submit`` or ``map`` call.

Three things happen here: the options are resolved once per call against the
``annotate()`` block around it (:func:`task_options`); each task gets a key
unless the caller named one; and every Future in the arguments, also inside
lists, tuples, sets and dicts, becomes a placeholder for its result and a
dependency of the task.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from apportion_common import serialize
from apportion_common.resources import check_resources
from protos import apportion_pb2 as pb

from .annotate import Annotations, current_annotations
from .future import Future


@dataclass(frozen=True, slots=True)
class TaskOptions:
    resources: dict[str, float]
    retries: int
    priority: int
    workers: tuple[str, ...]
    allow_other_workers: bool
    #: run in a child process that sees only the task's GPUs
    isolate: bool = False


def task_options(
    resources: Mapping[str, float | str] | None,
    retries: int | None,
    priority: int | None,
    workers: str | Iterable[str] | None,
    allow_other_workers: bool,
    *,
    annotated: bool = True,
    isolate: bool = False,
) -> TaskOptions:
    """Resolve the defaults of an ``annotate()`` (or ``dask.annotate``) block
    around the call and check the options, once per call. ``annotated=False``:
    the call's own options alone (a collection's tasks carry the annotations
    they were built under instead).

    An explicit ``resources=`` replaces the block's (no merging).
    """
    notes = current_annotations() if annotated else Annotations()
    needs = check_resources(resources) if resources is not None else notes.resources
    retries = notes.retries if retries is None else retries
    priority = notes.priority if priority is None else priority
    if retries is not None and retries < 0:
        raise ValueError(f"retries must be >= 0, not {retries}")
    if workers is None:
        names = notes.workers
        allow_other_workers = allow_other_workers or notes.allow_other_workers
    else:
        names = (workers,) if isinstance(workers, str) else tuple(workers)
    if allow_other_workers and not names:
        raise ValueError("allow_other_workers=True needs workers=[...] to prefer")
    return TaskOptions(
        needs, retries or 0, priority or 0, names, allow_other_workers, bool(isolate)
    )


def map_keys(key: str | list[str] | None, n: int) -> list[str | None]:
    """The keys of a map() of ``n`` tasks: as given, ``key-0``..., or None (made later)."""
    if isinstance(key, list):
        if len(key) != n:
            raise ValueError(f"map() got {len(key)} keys for {n} tasks")
        return list(key)
    if isinstance(key, str):
        return [f"{key}-{i}" for i in range(n)]
    return [None] * n


class SpecBuilder:
    """Makes the TaskSpecs of one client."""

    def __init__(self) -> None:
        # Unique across clients by the random prefix (as a uuid4 would be),
        # and cheaper to make than a uuid4 per task.
        self._key_prefix = secrets.token_hex(8)
        self._key_numbers = itertools.count()

    def spec(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None,
        options: TaskOptions,
        client: object,
        function: serialize.PickledFunction | None = None,
        *,
        pure: bool = False,
    ) -> pb.TaskSpec:
        """``client``: the one whose futures the arguments may hold;
        ``function``: ``fn`` pickled already (once for all the tasks of a map);
        ``pure``: name the task after its function and arguments (the same
        call, the same key) rather than uniquely."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        deps: dict[str, None] = {}
        args, kwargs = _refs_for_futures((args, kwargs), deps, client)
        payload = serialize.dump_call(fn, args, kwargs, function)
        if key is None:
            name = getattr(fn, "__name__", type(fn).__name__)
            if pure:
                token = hashlib.blake2b(payload, digest_size=16).hexdigest()
                key = f"{name}-{token}"
            else:
                key = f"{name}-{self._key_prefix}{next(self._key_numbers):016x}"
        return pb.TaskSpec(
            key=key,
            payload=payload,
            resources=options.resources,
            dependencies=list(deps),
            priority=options.priority,
            retries=options.retries,
            workers=options.workers,
            allow_other_workers=options.allow_other_workers,
            isolate=options.isolate,
        )


def _refs_for_futures(obj: Any, deps: dict[str, None], client: object) -> Any:
    """``obj`` with each Future replaced by an InputRef, its key added to ``deps``."""
    if isinstance(obj, Future):
        if obj.client is not client:
            raise ValueError(f"future {obj.key!r} belongs to another client")
        deps[obj.key] = None
        return serialize.InputRef(obj.key)
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(_refs_for_futures(x, deps, client) for x in obj)
    if type(obj) is dict:
        return {k: _refs_for_futures(v, deps, client) for k, v in obj.items()}
    return obj
