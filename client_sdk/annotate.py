"""``with annotate(resources=...)``: defaults for every submit inside the block."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from apportion_common.resources import check_resources


@dataclass(frozen=True, slots=True)
class Annotations:
    resources: dict[str, float] = field(default_factory=dict)
    priority: int | None = None
    retries: int | None = None


_NONE = Annotations()
_current: contextvars.ContextVar[Annotations | None] = contextvars.ContextVar(
    "apportion_annotations", default=None
)


def current_annotations() -> Annotations:
    return _current.get() or _NONE


@contextmanager
def annotate(
    resources: Mapping[str, float | str] | None = None,
    priority: int | None = None,
    retries: int | None = None,
) -> Iterator[Annotations]:
    """Apply resources (and priority, retries) to every submit/map inside.

    Nested blocks merge resources, the inner block winning for a name it
    repeats. An explicit ``resources=`` on a submit replaces the block's.
    """
    outer = current_annotations()
    merged = Annotations(
        resources={**outer.resources, **check_resources(resources)},
        priority=outer.priority if priority is None else priority,
        retries=outer.retries if retries is None else retries,
    )
    token = _current.set(merged)
    try:
        yield merged
    finally:
        _current.reset(token)
