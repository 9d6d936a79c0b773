"""The seed example from Dask's "Worker Resources" page, on a local apportion cluster.

Three workers: two with GPU=2, one with MEMORY=100e9. Load 40 files, process
each with a task that needs one GPU, then aggregate everything with a task that
needs 70 GB of memory. Prints where each task ran and the most GPU tasks that
ran at once on each worker (never more than its 2 GPUs).

Run with ``make demo`` (or ``python examples/seed_pipeline.py``).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

from rich.console import Console
from rich.table import Table

from client_sdk import Client, LocalCluster, get_task_context

N_FILES = 40


def load(filename: str) -> dict[str, object]:
    time.sleep(0.02)  # pretend to read a file
    return {
        "filename": filename,
        "values": list(range(100)),
        "worker": get_task_context().worker_name,
    }


def process(data: dict[str, object]) -> dict[str, object]:
    ctx = get_task_context()
    start = time.time()
    time.sleep(0.2)  # pretend to run a GPU kernel
    values = data["values"]
    assert isinstance(values, list)
    return {
        "total": sum(v * v for v in values),
        "worker": ctx.worker_name,
        "gpus": ctx.resources["GPU"],
        "interval": (start, time.time()),
    }


def aggregate(parts: list[dict[str, object]]) -> dict[str, object]:
    ctx = get_task_context()
    return {
        "total": sum(int(p["total"]) for p in parts),  # type: ignore[call-overload]
        "worker": ctx.worker_name,
        "memory": ctx.resources["MEMORY"],
    }


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = running = 0
    for _, step in edges:
        running += step
        best = max(best, running)
    return best


def main() -> None:
    console = Console()
    started = time.time()
    with LocalCluster(n_workers=0, nthreads=4) as cluster:
        cluster.add_worker(resources={"GPU": 2}, name="gpu-worker-1")
        cluster.add_worker(resources={"GPU": 2}, name="gpu-worker-2")
        cluster.add_worker(resources={"MEMORY": 100e9}, name="memory-worker")
        console.print(f"local cluster up at {cluster.address} in {time.time() - started:.1f}s")
        with Client(cluster) as client:
            filenames = [f"file-{i:02d}.csv" for i in range(N_FILES)]
            t0 = time.time()
            data = [client.submit(load, fn) for fn in filenames]
            processed = [client.submit(process, d, resources={"GPU": 1}) for d in data]
            final = client.submit(aggregate, processed, resources={"MEMORY": 70e9})
            result = final.result()
            elapsed = time.time() - t0
            loads = client.gather(data)
            parts = client.gather(processed)

    ran: dict[str, Counter[str]] = defaultdict(Counter)
    gpu_intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for item in loads:
        ran[str(item["worker"])]["load"] += 1
    for part in parts:
        ran[str(part["worker"])]["process (GPU=1)"] += 1
        gpu_intervals[str(part["worker"])].append(part["interval"])  # type: ignore[arg-type]
    ran[str(result["worker"])]["aggregate (MEMORY=70e9)"] += 1

    table = Table(title="Where the seed pipeline ran")
    table.add_column("worker")
    table.add_column("tasks that ran there")
    table.add_column("most GPU tasks at once", justify="right")
    for worker in sorted(ran):
        tasks = ", ".join(f"{n} x {kind}" for kind, n in sorted(ran[worker].items()))
        peak = most_at_once(gpu_intervals[worker]) if gpu_intervals[worker] else 0
        table.add_row(worker, tasks, str(peak))
    console.print(table)
    console.print(
        f"aggregate = {result['total']} on {result['worker']} holding MEMORY={result['memory']:g}; "
        f"pipeline took {elapsed:.2f}s (ideal {N_FILES * 0.2 / 4:.2f}s with 4 GPUs); "
        "cluster shut down."
    )


if __name__ == "__main__":
    main()
