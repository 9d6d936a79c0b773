"""Small helpers shared by the end-to-end tests (pickled by value with ``tests``)."""

from __future__ import annotations

import time
from pathlib import Path

from client_sdk import get_task_context


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end and a start at the same
    instant do not overlap)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def timed_sleep(seconds: float) -> tuple[float, float]:
    """Sleep in a task and return its (start, end) on the machine-wide monotonic clock."""
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def where_and_held() -> tuple[str, dict[str, float]]:
    ctx = get_task_context()
    return ctx.worker_name, dict(ctx.resources)


def touch_then_sleep(marker_dir: str, name: str, seconds: float) -> tuple[float, float]:
    """Mark ``name.started`` at once and ``name.done`` when the code returns."""
    start = time.monotonic()
    Path(marker_dir, f"{name}.started").write_text(str(start))
    time.sleep(seconds)
    end = time.monotonic()
    Path(marker_dir, f"{name}.done").write_text(str(end))
    return start, end
