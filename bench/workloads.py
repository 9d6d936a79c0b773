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
TRANSFER_BYTES = 100 * 1000 * 1000
TRANSFER_REPEATS = 3


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
        assert client.submit(noop, i, **_unique(client)).result() == i
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
    data = [client.submit(load, i, **_unique(client)) for i in range(n)]
    processed = [client.submit(process, d, resources={"GPU": 1}, **_unique(client)) for d in data]
    final = client.submit(aggregate, processed, resources={"MEMORY": 70e9}, **_unique(client))
    total = final.result()
    makespan = time.perf_counter() - start
    assert total == sum(i * 10 for i in range(n))
    ideal = n * 0.020 / 4
    return makespan / ideal


def _unique(client: Any) -> dict[str, Any]:
    # Dask dedups identical calls by hashing; apportion makes a task per call.
    return {"pure": False} if _is_dask(client) else {}


def make_bytes(nbytes: int) -> bytes:
    return b"x" * nbytes


def started_at(data: bytes) -> float:
    """When the consumer started: its input had arrived by then."""
    del data
    return time.time()


def stamp(_: int) -> float:
    return time.time()


def transfer(
    client: Any, nbytes: int = TRANSFER_BYTES, repeats: int = TRANSFER_REPEATS
) -> dict[str, float]:
    """A result made on the PRODUCER worker and consumed on the CONSUMER one.

    Hand-off: the consumer task's start (it starts once its input has arrived)
    minus the submit time, less the same for a task with no input (dispatch).
    Each of ``repeats`` hand-offs moves a fresh value; the medians come back.
    """
    handoffs, ends = [], []
    for r in range(repeats):
        blob = client.submit(make_bytes, nbytes, resources={"PRODUCER": 1}, **_unique(client))
        client.gather([blob])
        dispatch = []
        for i in range(5):
            t0 = time.time()
            dispatch.append(
                client.submit(
                    stamp, r * 10 + i, resources={"CONSUMER": 1}, **_unique(client)
                ).result()
                - t0
            )
        t0 = time.time()
        consumer = client.submit(started_at, blob, resources={"CONSUMER": 1}, **_unique(client))
        start = consumer.result()
        ends.append(time.time() - t0)
        handoffs.append(max(start - t0 - statistics.median(dispatch), 1e-6))
        del blob, consumer  # free both copies before the next value is made
    return {
        "handoff_MBps": nbytes / statistics.median(handoffs) / 1e6,
        "end_to_end_MBps": nbytes / statistics.median(ends) / 1e6,
    }
