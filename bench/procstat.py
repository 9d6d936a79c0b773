"""A process's memory and CPU time, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Memory:
    rss: int
    hwm: int
    uss: int | None
    pss: int | None


def memory_of(pid: int) -> Memory:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {
        k: int(v.split()[0]) * 1024
        for k, _, v in (line.partition(":") for line in status.splitlines())
        if k in ("VmRSS", "VmHWM")
    }
    uss = pss = None
    with contextlib.suppress(OSError):  # smaps_rollup: Linux 4.14+
        rollup = {
            k: int(v.split()[0]) * 1024
            for k, _, v in (
                line.partition(":")
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
            )
        }
        uss = rollup["Private_Clean"] + rollup["Private_Dirty"]
        pss = rollup["Pss"]
    return Memory(fields["VmRSS"], fields["VmHWM"], uss, pss)


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: the name may hold spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a live process and its live descendants (``apportion
    worker`` may run the worker itself in a child, under a nanny)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
    tree, total = {pid}, 0.0
    for _ in range(len(parents)):  # grow the tree until nothing new joins it
        grown = {child for child, parent in parents.items() if parent in tree} - tree
        if not grown:
            break
        tree |= grown
    for member in tree:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(member)
    return total
