"""A worker process's memory: its limit and what it (with its children) uses now.

This is the machine's memory, as Dask's ``memory_limit`` is: what a worker
process may grow to before it spills results to disk, pauses and is
restarted. It has nothing to do with the abstract ``MEMORY`` resource that
workers declare and tasks need, which the scheduler accounts like any other.

``--memory-limit auto`` is the machine's memory, or the cgroup's limit where
one is set and lower (a container's), shared out among the worker
processes; a number or a byte size (``300MB``, ``2GiB``) is one process's;
0 is none.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from .resources import AUTO, ResourceSpecError, check_amount

#: Where cgroup v2, then v1, say how much memory this process's group may use.
CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def system_memory() -> int:
    """Bytes this process's machine (or container) has: the lowest of the
    physical memory and any cgroup limit."""
    total = int(psutil.virtual_memory().total)
    for path in CGROUP_LIMIT_FILES:
        limit = _read_limit(path)
        if limit is not None and 0 < limit < total:
            total = limit
    return total


def _read_limit(path: Path) -> int | None:
    """The number in a cgroup limit file; None for "max", a missing file or junk."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_memory_limit(value: object) -> int | str:
    """``auto``, or the limit in bytes (0: none), from a flag or the
    environment; raises ValueError naming what is wrong."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, str) and value.strip().lower() in ("none", "off", "false"):
        return 0
    try:
        amount = check_amount("memory_limit", value.strip() if isinstance(value, str) else value)
    except ResourceSpecError as exc:
        # check_amount names a resource: here it is a setting.
        reason = str(exc).split(": ", 1)[-1]
        raise ValueError(f"{value!r}: {reason} (bytes, 300MB, 2GiB, auto or 0)") from None
    return int(amount)


def resolve_memory_limit(value: int | str, nworkers: int = 1) -> int:
    """Bytes per worker process for a checked limit (:func:`check_memory_limit`):
    ``auto`` is :func:`system_memory` shared out among ``nworkers``."""
    if value == AUTO:
        return system_memory() // max(nworkers, 1)
    assert isinstance(value, int)
    return value


class Resident:
    """The resident memory (RSS) of process ``pid`` (this one by default) and
    of its descendants, in bytes, each time it is called; 0 once the process
    is gone.

    Descendants count because they work for it: a worker's isolated tasks
    run in child processes (``isolate=True``), and a task that fills one
    must spill, pause and restart its worker as one that fills the worker
    itself does. Finding them means reading every process's /proc entry, so
    it is done at most every :data:`CHILDREN_RESCAN_S`; each call then reads
    one /proc file a process.
    """

    #: How often the descendants are looked for again.
    CHILDREN_RESCAN_S = 1.0

    def __init__(self, pid: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._children: list[psutil.Process] = []
        self._scanned = -math.inf
        try:
            self._process: psutil.Process | None = psutil.Process(pid or os.getpid())
        except psutil.Error:
            self._process = None

    def __call__(self) -> int:
        if self._process is None:
            return 0
        try:
            total = int(self._process.memory_info().rss)
        except psutil.Error:
            return 0
        now = self._clock()
        if now - self._scanned >= self.CHILDREN_RESCAN_S:
            self._scanned = now
            try:
                self._children = self._process.children(recursive=True)
            except psutil.Error:
                self._children = []
        for child in self._children:
            with contextlib.suppress(psutil.Error):  # gone since the scan: nothing resident
                total += int(child.memory_info().rss)
        return total
