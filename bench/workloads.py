"""The workloads, written once against the API both clients share.

apportion's Client and Dask's Client both offer ``submit``, ``map``,
``gather``, ``result`` and ``resources=``, so each workload runs unchanged
on both. Every function returns seconds (or derived figures); the caller
takes medians.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

N_THROUGHPUT = 20_000
N_LATENCY = 500
N_PIPELINE = 200


def noop(x: int) -> int:
    return x


def throughput(client: Any, resources: dict[str, float] | None, n: int = N_THROUGHPUT) -> float:
    """Tasks per second, from first submit to all results gathered."""
    start = time.perf_counter()
    kwargs = {"resources": resources} if resources else {}
    futures = client.map(noop, range(n), **kwargs)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    assert results[-1] == n - 1
    del futures
    return n / elapsed


def latency(client: Any, n: int = N_LATENCY) -> dict[str, float]:
    """Sequential submit -> result round trips, in milliseconds."""
    samples = []
    for i in range(n):
        start = time.perf_counter()
        assert client.submit(noop, i, **unique(client)).result() == i
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[int(0.99 * (len(samples) - 1))],
    }


def _is_dask(client: Any) -> bool:
    return type(client).__module__.startswith("distributed")


def load(i: int) -> list[int]:
    time.sleep(0.005)
    return [i] * 10


def process(data: list[int]) -> int:
    time.sleep(0.020)
    return sum(data)


def aggregate(parts: list[int]) -> int:
    return sum(parts)


def pipeline(client: Any, n: int = N_PIPELINE) -> float:
    """The seed's pipeline; makespan over the ideal (n x 20 ms over 4 GPU slots)."""
    start = time.perf_counter()
    data = [client.submit(load, i, **unique(client)) for i in range(n)]
    processed = [client.submit(process, d, resources={"GPU": 1}, **unique(client)) for d in data]
    final = client.submit(aggregate, processed, resources={"MEMORY": 70e9}, **unique(client))
    total = final.result()
    makespan = time.perf_counter() - start
    assert total == sum(i * 10 for i in range(n))
    ideal = n * 0.020 / 4
    return makespan / ideal


def unique(client: Any) -> dict[str, Any]:
    # Dask dedups identical calls by hashing; apportion makes a task per call.
    return {"pure": False} if _is_dask(client) else {}
