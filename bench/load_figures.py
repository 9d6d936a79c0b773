"""What `make bench-load` measures, the least-squares fit it draws, and the table it prints."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


def fit(points: list[tuple[float, float]]) -> dict[str, Any]:
    """Least squares y = slope * x + intercept, R², and each interval's slope."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    syy = sum((y - my) ** 2 for _, y in points)
    slope = sxy / sxx
    return {
        "slope": slope,
        "intercept": my - slope * mx,
        "r2": (sxy * sxy) / (sxx * syy) if syy else 1.0,
        "interval_slopes": [
            (y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in itertools.pairwise(points) if x1 != x0
        ],
    }


@dataclass
class Figures:
    clients: int
    tasks_per_client: int
    workers: int
    nthreads: int
    tasks: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    fits: dict[str, Any] = field(default_factory=dict)
    payload_bytes: float = 0.0
    key_bytes: float = 0.0
    clients_ready_s: float = 0.0
    submit_s: float = 0.0
    submit_steps_s: list[float] = field(default_factory=list)
    submit_tps: float = 0.0
    #: wall time each client spent in map() (pickling its tasks), summed
    client_map_s: list[float] = field(default_factory=list)
    client_cpu_submit_s: list[float] = field(default_factory=list)
    scheduler_cpu_submit_s: float = 0.0
    workers_joined_after_s: float = 0.0
    drain_s: float = 0.0
    drain_tps: float = 0.0
    drain_from_spawn_tps: float = 0.0
    scheduler_cpu_drain_s: float = 0.0
    worker_cpu_s: list[float] = field(default_factory=list)
    client_cpu_drain_s: list[float] = field(default_factory=list)
    client_warnings: int = 0
    checks: dict[str, int] = field(default_factory=dict)
    release_s: float = 0.0
    rss_peak: int = 0
    rss_released: int = 0
    rss_clients_gone: int = 0
    by_reference: bool = False
    loadavg_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    loadavg_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uss_released: int | None = None
    wall_s: float = 0.0


# ------------------------------------------------------------------ report


def print_table(f: Figures) -> None:

    mib = 2**20
    samples = Table(title="Scheduler memory against queued tasks")
    for name in ("queued tasks", "VmRSS (MiB)", "USS (MiB)", "PSS (MiB)"):
        samples.add_column(name, justify="right")
    for s in f.samples:
        samples.add_row(
            f"{s['tasks']:,}",
            f"{s['rss'] / mib:.1f}",
            "-" if s["uss"] is None else f"{s['uss'] / mib:.1f}",
            "-" if s["pss"] is None else f"{s['pss'] / mib:.1f}",
        )

    how = "by reference" if f.by_reference else "by value, from the client's __main__"
    table = Table(
        title=f"{f.tasks:,} tasks from {f.clients} clients; {f.workers} workers x "
        f"{f.nthreads} threads (SLOT={f.nthreads}); task function pickled {how}"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, label in (("rss", "VmRSS"), ("uss", "USS")):
        if name not in f.fits:
            continue
        line = f.fits[name]
        table.add_row(
            f"scheduler bytes per queued task ({label}, least squares; R²)",
            f"{line['slope']:,.0f}; {line['r2']:.4f}",
        )
        table.add_row(
            f"  payloads aside ({label} slope - {f.payload_bytes:.0f} B payload)",
            f"{line['slope'] - f.payload_bytes:,.0f}",
        )
        table.add_row(
            f"  {label} slope per interval (B/task)",
            ", ".join(f"{s:,.0f}" for s in line["interval_slopes"]),
        )
    table.add_row(
        "pickled payload per task; key (bytes)", f"{f.payload_bytes:.0f}; {f.key_bytes:.0f}"
    )
    table.add_row("clients started and connected (s)", f"{f.clients_ready_s:.1f}")
    table.add_row("submit: until the scheduler held every task (s)", f"{f.submit_s:.1f}")
    table.add_row("submit rate (tasks/s)", f"{f.submit_tps:,.0f}")
    table.add_row(
        "  CPU in submit: scheduler / all clients (s)",
        f"{f.scheduler_cpu_submit_s:.1f} / {sum(f.client_cpu_submit_s):.1f}",
    )
    table.add_row("first worker joined, after its start (s)", f"{f.workers_joined_after_s:.1f}")
    table.add_row("drain: first worker joined -> last result (s)", f"{f.drain_s:.1f}")
    table.add_row("completion throughput (tasks/s)", f"{f.drain_tps:,.0f}")
    table.add_row(
        "  CPU in drain: scheduler / workers / clients (s)",
        f"{f.scheduler_cpu_drain_s:.1f} / {sum(f.worker_cpu_s):.1f} / "
        f"{sum(f.client_cpu_drain_s):.1f}",
    )
    c = f.checks
    table.add_row(
        "results received / errors / missing / duplicated / wrong",
        f"{c['received']:,} / {c['errors']} / {c['missing']} / {c['duplicated']} / "
        f"{c['wrong'] + c['misplaced']}",
    )
    table.add_row("futures dropped -> 0 tasks held, 0 resources used (s)", f"{f.release_s:.1f}")
    table.add_row("scheduler RSS peak (VmHWM, MiB)", f"{f.rss_peak / mib:.1f}")
    table.add_row(
        "scheduler RSS after release; after clients left (MiB)",
        f"{f.rss_released / mib:.1f}; {f.rss_clients_gone / mib:.1f}",
    )
    table.add_row("client WARNING lines (one per queued task)", f"{f.client_warnings:,}")
    table.add_row("total wall time (s)", f"{f.wall_s:.1f}")
    table.add_row(
        "load average at start; at end",
        f"{f.loadavg_start[0]:.2f}; {f.loadavg_end[0]:.2f}",
    )
    console = Console(width=max(Console().width, 110))
    console.print(samples)
    console.print(table)
