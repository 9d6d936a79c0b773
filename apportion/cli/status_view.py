"""What ``apportion status`` shows: the workers as a table that fits the
terminal, and the tasks by state.

Each worker's name and address stay whole on one line (an operator copies
them into ``apportion logs``, ``retire``...); the other columns wrap instead,
and each resource takes a line of its own in its cell. Amounts read like the
input: a declared ``MEMORY=100GB`` shows as ``100GB`` and 70e9 held of it as
``70GB`` (``64GiB``: binary units), a plain number in short form (``100e9``:
``100G``; ``0.5``), never ``1e+11``. A worker's own memory (resident of its
limit, what it spilled to disk, paused) shows under its name, apart from the
``MEMORY`` resource, which is an amount like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from apportion_common.resources import shown_declared, shown_like

if TYPE_CHECKING:
    from client_sdk.info import ClusterInfo, WorkerInfo

NO_WORKERS = "no workers connected"


def status_view(info: ClusterInfo) -> RenderableType:
    """The table (or a sentence, when no worker is connected), then the tasks."""
    tasks = ", ".join(f"{state} {n}" for state, n in sorted(info["tasks"].items())) or "none"
    tasks_line = Text(f"tasks: {tasks}")
    if info.get("dashboard_address"):
        tasks_line.append(f"\ndashboard: {info['dashboard_address']}")
    if not info["workers"]:
        return Group(Text(f"apportion scheduler {info['address']}: {NO_WORKERS}"), tasks_line)
    table = Table(
        title=f"apportion scheduler {info['address']}", box=box.SIMPLE_HEAD, show_lines=True
    )
    table.add_column("worker", no_wrap=True)
    table.add_column("address", no_wrap=True)
    # Few narrow columns, a line per figure: the width goes to the names.
    table.add_column("tasks", overflow="fold")
    table.add_column("resources used/declared", overflow="fold")
    for address, w in sorted(info["workers"].items(), key=lambda kv: (kv[1]["name"], kv[0])):
        worker = Text(w["name"])
        worker.append(f"\n{w['nthreads']} thread{'s' if w['nthreads'] != 1 else ''}", "dim")
        worker.append(memory_lines(w), "dim")
        if w["draining"]:
            worker.append("\ndraining", "yellow")
        if w.get("paused"):
            worker.append("\npaused", "red")
        tasks = f"{w['running']} running\n{w['queued']} queued"
        table.add_row(worker, address, tasks, resources_cell(w) + gpus_cell(w))
    return Group(table, tasks_line)


def gpus_cell(w: WorkerInfo) -> str:
    """A line per GPU the worker knows: ``gpu 1: load-3a2f`` (the task holding
    it), ``gpu 0: free``; nothing where GPU is just a number."""
    lines = []
    for gpu in w.get("gpus", []):  # none from a scheduler older than GPU=auto
        holders = ", ".join(gpu["tasks"]) or "free"
        lines.append(f"\ngpu {gpu['id']}: {holders}")
    return "".join(lines)


def memory_lines(w: WorkerInfo) -> str:
    """``mem 1.2GB/4GB``: the process's resident memory of its limit (alone
    where it has none), then ``900MB spilled`` where it spilled results to
    disk; each line after a newline."""
    if "memory" not in w:  # a scheduler older than memory limits
        return ""
    used, limit = short_bytes(w["memory"]), w["memory_limit"]
    text = f"\nmem {used}/{short_bytes(limit)}" if limit else f"\nmem {used}"
    if w["spilled_bytes"]:
        text += f"\n{short_bytes(w['spilled_bytes'])} spilled"
    return text


def short_bytes(n: int) -> str:
    """Bytes in decimal units, three figures: ``123MB``, ``3.5GB``, ``25.3GB``."""
    amount, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if amount < 999.5 or unit == "PB":
            break
        amount /= 1000
    return f"{amount:.3g}{unit}"


def resources_cell(w: WorkerInfo) -> str:
    """``GPU 1/2``, ``MEMORY 70GB/100GB`` per resource, a line each (``-`` for none)."""
    used = w["used_resources"]
    # .get: an entry from a scheduler older than the spellings has none.
    written = w.get("resources_text", {})
    lines = []
    for name, amount in sorted(w["resources"].items()):
        spelling = written.get(name)
        held = shown_like(used.get(name, 0), spelling)
        lines.append(f"{name} {held}/{shown_declared(amount, spelling)}")
    return "\n".join(lines) or "-"
