"""The seed's example on real processes: load -> process(GPU=1) -> aggregate(MEMORY=70e9)."""

from __future__ import annotations

import time

from client_sdk import Client, get_task_context
from tests.helpers.processes import Processes, assert_all_released
from tests.helpers.tasks import max_overlap


def load(i: int) -> list[int]:
    time.sleep(0.01)
    return list(range(i, i + 10))


def process(data: list[int]) -> dict[str, object]:
    ctx = get_task_context()
    start = time.monotonic()
    time.sleep(0.05)
    return {
        "sum": sum(data),
        "worker": ctx.worker_address,
        "gpu": ctx.resources.get("GPU"),
        "interval": (start, time.monotonic()),
    }


def aggregate(parts: list[dict[str, object]]) -> tuple[int, str, dict[str, float]]:
    ctx = get_task_context()
    return sum(int(p["sum"]) for p in parts), ctx.worker_address, ctx.resources  # type: ignore[call-overload]


def test_seed_pipeline_respects_gpu_and_memory(
    processes: Processes, scheduler_address: str
) -> None:
    gpu_a = processes.worker(scheduler_address, "--resources", "GPU=2", "--nthreads", "4")
    gpu_b = processes.worker(scheduler_address, "--resources", "GPU=2", "--nthreads", "4")
    processes.worker(scheduler_address, "--resources", "MEMORY=100e9", "--nthreads", "4")
    assert gpu_a.poll() is None and gpu_b.poll() is None
    with Client(scheduler_address) as client:
        workers = client.scheduler_info()["workers"]
        gpu_workers = {a for a, w in workers.items() if w["resources"].get("GPU") == 2}
        memory_workers = {a for a, w in workers.items() if "MEMORY" in w["resources"]}
        data = [client.submit(load, i) for i in range(40)]
        processed = [client.submit(process, d, resources={"GPU": 1}) for d in data]
        final = client.submit(aggregate, processed, resources={"MEMORY": 70e9})
        total, where, held = final.result(timeout=60)
        parts = client.gather(processed)

    assert total == sum(sum(range(i, i + 10)) for i in range(40))
    assert where in memory_workers
    assert held == {"MEMORY": 70e9}
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for part in parts:
        assert part["worker"] in gpu_workers
        assert part["gpu"] == 1
        by_worker.setdefault(part["worker"], []).append(part["interval"])  # type: ignore[arg-type]
    for intervals in by_worker.values():
        assert max_overlap(intervals) <= 2
    assert_all_released(scheduler_address)
