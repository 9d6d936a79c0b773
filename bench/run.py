"""`make bench`: apportion and Dask distributed side by side, on this machine.

Each workload runs on real scheduler and worker processes (127.0.0.1), three
interleaved rounds (apportion, Dask, apportion, Dask, ...), and the table shows
each system's median and the ratio apportion/Dask. Raw figures go to
bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import workloads as w
from bench.clusters import apportion_cluster, dask_cluster

TWO_GPU_WORKERS = [(2, "GPU=2"), (2, "GPU=2")]
SEED = [(4, "GPU=2"), (4, "GPU=2"), (4, "MEMORY=100e9")]
TRANSFER = [(1, "PRODUCER=1"), (1, "CONSUMER=1")]
SCALE = [(1, "GPU=1")] * 8

Figures = dict[str, float]


def _cluster(system: str, workers: list[tuple[int, str]], **kw: Any) -> Any:
    if system == "apportion":
        return apportion_cluster(workers)
    return dask_cluster(workers, **kw)


def round_of(system: str, quick: bool) -> Figures:
    """One round of every workload on ``system``; each on a fresh cluster."""
    n = 4000 if quick else w.N_THROUGHPUT
    out: Figures = {}
    with _cluster(system, TWO_GPU_WORKERS) as client:
        out["throughput_gpu_tps"] = w.throughput(client, {"GPU": 1}, n)
        out["throughput_plain_tps"] = w.throughput(client, None, n)
        out.update(
            {f"latency_{k}": v for k, v in w.latency(client, 100 if quick else w.N_LATENCY).items()}
        )
    if system == "dask":
        with _cluster(system, TWO_GPU_WORKERS, saturation_inf=True) as client:
            out["throughput_plain_saturation_inf_tps"] = w.throughput(client, None, n)
    with _cluster(system, SEED) as client:
        out["pipeline_makespan_over_ideal"] = w.pipeline(client)
    with _cluster(system, TRANSFER) as client:
        out.update({f"transfer_{k}": v for k, v in w.transfer(client).items()})
    with _cluster(system, SCALE) as client:
        out["scale_8_workers_gpu_tps"] = w.throughput(client, {"GPU": 1}, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer tasks (a smoke run)")
    parser.add_argument("--out", default="bench/results/latest.json")
    args = parser.parse_args()

    raw: dict[str, list[Figures]] = {"apportion": [], "dask": []}
    for i in range(args.rounds):
        for system in ("apportion", "dask"):
            started = time.perf_counter()
            raw[system].append(round_of(system, args.quick))
            print(
                f"round {i + 1}/{args.rounds} {system}: {time.perf_counter() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    medians = {s: _medians(runs) for s, runs in raw.items()}
    _print_table(medians)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": _machine(),
                "rounds": args.rounds,
                "quick": args.quick,
                "raw": raw,
                "medians": medians,
            },
            indent=2,
        )
    )
    print(f"raw figures: {out}")


def _medians(runs: list[Figures]) -> Figures:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _print_table(medians: dict[str, Figures]) -> None:
    from rich.console import Console
    from rich.table import Table

    a, d = medians["apportion"], medians["dask"]
    table = Table(title="apportion vs Dask distributed (medians)")
    for col in ("figure", "apportion", "Dask", "apportion/Dask"):
        table.add_column(col, justify="right" if col != "figure" else "left")
    for key in sorted(set(a) | set(d)):
        av, dv = a.get(key), d.get(key)
        if key == "throughput_plain_tps":
            dv = max(dv or 0, d.get("throughput_plain_saturation_inf_tps", 0))
            label = f"{key} (Dask: its best setting)"
        elif key == "throughput_plain_saturation_inf_tps":
            continue
        else:
            label = key
        ratio = f"{av / dv:.2f}" if av is not None and dv else "-"
        table.add_row(label, _fmt(av), _fmt(dv), ratio)
    Console().print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
