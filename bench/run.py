"""`make bench`: apportion and Dask distributed side by side, on this machine.

Each workload runs on real scheduler and worker processes (127.0.0.1), three
interleaved rounds (anchor, apportion, Dask, anchor, apportion, Dask, ...), and
the table shows each system's median and the ratio apportion/Dask. The anchor
is a bare grpc.aio server and client (bench/anchor.py): the floor that
apportion's transport cannot beat, measured in the same rounds. Raw figures go
to bench/results/latest.json.
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

from bench import crosshost, handoff
from bench import workloads as w
from bench.anchor import measure_in_subprocess
from bench.clusters import apportion_cluster, dask_cluster

TWO_GPU_WORKERS = [(2, "GPU=2"), (2, "GPU=2")]
SEED = [(4, "GPU=2"), (4, "GPU=2"), (4, "MEMORY=100e9")]
TRANSFER = [(1, "PRODUCER=1"), (1, "CONSUMER=1")]
#: apportion's hand-off cluster: a consumer taking inputs from peers on this
#: host through shared memory, and one (shared memory off) taking them over gRPC.
HANDOFF = [(1, "PRODUCER=1"), (1, "CONSUMER=1"), (1, "GRPC_CONSUMER=1")]
HANDOFF_ENV = {2: {"APPORTION_WORKER__SHARED_MEMORY": "false"}}
HANDOFF_SIZES = (100 * 1000**2, 1000**3)
SCALE = [(1, "GPU=1")] * 8

Figures = dict[str, float]


def _cluster(
    system: str,
    workers: list[tuple[int, str]],
    worker_env: dict[int, dict[str, str]] | None = None,
    **kw: Any,
) -> Any:
    if system == "apportion":
        return apportion_cluster(workers, worker_env)
    return dask_cluster(workers, **kw)


WORKLOADS = ("throughput", "latency", "pipeline", "handoff", "crosshost", "scale")


def round_of(system: str, quick: bool, only: frozenset[str] = frozenset(WORKLOADS)) -> Figures:
    """One round of the ``only`` workloads on ``system``; each on a fresh cluster."""
    n = 4000 if quick else w.N_THROUGHPUT
    out: Figures = {}
    if only & {"throughput", "latency"}:
        with _cluster(system, TWO_GPU_WORKERS) as client:
            if "throughput" in only:
                out["throughput_gpu_tps"] = w.throughput(client, {"GPU": 1}, n)
                out["throughput_plain_tps"] = w.throughput(client, None, n)
            if "latency" in only:
                samples = w.latency(client, 100 if quick else w.N_LATENCY)
                out.update({f"latency_{k}": v for k, v in samples.items()})
    if system == "dask" and "throughput" in only:
        with _cluster(system, TWO_GPU_WORKERS, saturation_inf=True) as client:
            out["throughput_plain_saturation_inf_tps"] = w.throughput(client, None, n)
    if "pipeline" in only:
        with _cluster(system, SEED) as client:
            out["pipeline_makespan_over_ideal"] = w.pipeline(client)
    if "handoff" in only:
        sizes = HANDOFF_SIZES[:1] if quick else HANDOFF_SIZES
        workers = HANDOFF if system == "apportion" else TRANSFER
        with _cluster(system, workers, HANDOFF_ENV) as client:
            for nbytes in sizes:
                for shape in handoff.SHAPES:
                    row = f"handoff_{shape}_{handoff.size_label(nbytes)}"
                    out[f"{row}_MBps"] = handoff.handoff_MBps(client, shape, nbytes, "CONSUMER")
                    if system == "apportion":
                        out[f"{row}_grpc_MBps"] = handoff.handoff_MBps(
                            client, shape, nbytes, "GRPC_CONSUMER"
                        )
    if "crosshost" in only:
        out.update(crosshost.measure(system))
    if "scale" in only:
        with _cluster(system, SCALE) as client:
            out["scale_8_workers_gpu_tps"] = w.throughput(client, {"GPU": 1}, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer tasks (a smoke run)")
    parser.add_argument("--out", default="bench/results/latest.json")
    parser.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads to run (of {', '.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--systems", default="anchor,apportion,dask", help="which of anchor,apportion,dask"
    )
    args = parser.parse_args()
    only = frozenset(args.only.split(","))
    if unknown := only - set(WORKLOADS):
        parser.error(f"unknown workload(s) {sorted(unknown)}; pick from {', '.join(WORKLOADS)}")
    systems = [s for s in ("anchor", "apportion", "dask") if s in args.systems.split(",")]

    raw: dict[str, list[Figures]] = {s: [] for s in systems}
    for i in range(args.rounds):
        for system in systems:
            started = time.perf_counter()
            if system == "anchor":
                raw[system].append(measure_in_subprocess())
            else:
                raw[system].append(round_of(system, args.quick, only))
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

    a, d, floor = (medians.get(s, {}) for s in ("apportion", "dask", "anchor"))
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

    anchor = Table(
        title="the floor: bare grpc.aio on this machine (medians), and apportion against it"
    )
    for col in ("figure", "bare grpc.aio", "apportion", "apportion/anchor"):
        anchor.add_column(col, justify="right" if col != "figure" else "left")
    for key in sorted(floor):
        anchor.add_row(f"anchor_{key}", _fmt(floor[key]), "-", "-")
    for ours, theirs in ANCHOR_PAIRS:
        if ours in a and theirs in floor:
            anchor.add_row(
                f"{ours} / anchor_{theirs}",
                _fmt(floor[theirs]),
                _fmt(a[ours]),
                f"{a[ours] / floor[theirs]:.2f}",
            )
    Console().print(anchor)


#: apportion figures and the anchor figure each is bounded by.
ANCHOR_PAIRS = [
    *(
        (f"handoff_{shape}_{handoff.size_label(n)}_grpc_MBps", "bulk_MBps")
        for n in HANDOFF_SIZES
        for shape in handoff.SHAPES
    ),
    ("crosshost_tuple_100MB_MBps", "bulk_MBps"),
    ("latency_p50_ms", "unary_p50_ms"),
    ("latency_p99_ms", "unary_p99_ms"),
    ("throughput_gpu_tps", "stream_msgs_per_s"),
    ("throughput_plain_tps", "stream_msgs_per_s"),
]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
