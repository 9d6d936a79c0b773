"""``with annotate(resources=...)``: defaults for every submit inside the block.

It and ``dask.annotate`` are one mechanism seen from two sides: a submit or
map inside ``dask.annotate(resources=..., priority=..., retries=...,
workers=..., allow_other_workers=...)`` takes those as this block's, and a
dask collection built inside ``annotate(...)`` carries them as dask's (when
dask is loaded).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from apportion_common.resources import check_resources


@dataclass(frozen=True, slots=True)
class Annotations:
    resources: dict[str, float] = field(default_factory=dict)
    priority: int | None = None
    retries: int | None = None
    #: names or addresses the tasks may run on (any when empty)
    workers: tuple[str, ...] = ()
    allow_other_workers: bool = False


_NONE = Annotations()
_current: contextvars.ContextVar[Annotations | None] = contextvars.ContextVar(
    "apportion_annotations", default=None
)


def _from_dask() -> Annotations:
    """What a ``dask.annotate`` block around the caller asks (nothing if dask
    is not loaded: then no block can be open). Callables, which dask allows
    per key, apply to collections only."""
    dask = sys.modules.get("dask")
    get = getattr(dask, "get_annotations", None)
    notes: dict[str, Any] = get() if get is not None else {}
    if not notes:
        return _NONE
    plain = {k: v for k, v in notes.items() if not callable(v)}
    workers = plain.get("workers") or ()
    return Annotations(
        resources=check_resources(plain.get("resources") or {}),
        priority=plain.get("priority"),
        retries=plain.get("retries"),
        workers=(workers,) if isinstance(workers, str) else tuple(workers),
        allow_other_workers=bool(plain.get("allow_other_workers")),
    )


def current_annotations() -> Annotations:
    """This block's annotations over any ``dask.annotate`` block's."""
    ours = _current.get()
    theirs = _from_dask()
    if ours is None:
        return theirs
    if theirs is _NONE:
        return ours
    return Annotations(
        resources={**theirs.resources, **ours.resources},
        priority=theirs.priority if ours.priority is None else ours.priority,
        retries=theirs.retries if ours.retries is None else ours.retries,
        workers=ours.workers or theirs.workers,
        allow_other_workers=ours.allow_other_workers or theirs.allow_other_workers,
    )


@contextmanager
def annotate(
    resources: Mapping[str, float | str] | None = None,
    priority: int | None = None,
    retries: int | None = None,
) -> Iterator[Annotations]:
    """Apply resources (and priority, retries) to every submit/map inside,
    and to the tasks of dask collections built inside.

    Nested blocks merge resources, the inner block winning for a name it
    repeats. An explicit ``resources=`` on a submit replaces the block's.
    """
    outer = _current.get() or _NONE
    merged = Annotations(
        resources={**outer.resources, **check_resources(resources)},
        priority=outer.priority if priority is None else priority,
        retries=outer.retries if retries is None else retries,
    )
    token = _current.set(merged)
    try:
        with _as_dask(merged):
            yield merged
    finally:
        _current.reset(token)


@contextmanager
def _as_dask(notes: Annotations) -> Iterator[None]:
    """Open a ``dask.annotate`` block with ``notes`` too, if dask is loaded."""
    dask = sys.modules.get("dask")
    dask_annotate = getattr(dask, "annotate", None)
    if dask_annotate is None:
        yield
        return
    given: dict[str, Any] = {"resources": notes.resources} if notes.resources else {}
    if notes.priority is not None:
        given["priority"] = notes.priority
    if notes.retries is not None:
        given["retries"] = notes.retries
    with dask_annotate(**given) if given else contextlib.nullcontext():
        yield
