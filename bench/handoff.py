"""Hand-offs of the shapes users' results have, from one worker process to another.

A producer worker makes a value; a consumer worker on the same host starts a
task that takes it. The hand-off is the consumer task's start (its input has
arrived and been rebuilt by then) minus the submit time, less the same for a
task with no input (dispatch). Written once against the API both clients
share, so Dask runs it unchanged.

Shapes: a bare ``bytes``; a tuple of ``bytes`` and a little metadata (what
``return blob, info`` makes); a dict of NumPy arrays; a pandas DataFrame.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.workloads import unique

SHAPES = ("bytes", "tuple", "numpy_dict", "dataframe")
REPEATS = 3


def make_value(shape: str, nbytes: int) -> Any:
    if shape == "bytes":
        return b"x" * nbytes
    if shape == "tuple":
        return b"x" * nbytes, {"kind": "blob", "n": nbytes}
    import numpy as np

    half = nbytes // 16  # float64 items in half the bytes
    if shape == "numpy_dict":
        return {"a": np.ones(half), "b": np.arange(half, dtype=np.float64)}
    if shape == "dataframe":
        import pandas as pd

        return pd.DataFrame({"a": np.ones(half), "b": np.arange(half, dtype=np.int64)})
    raise ValueError(f"unknown shape {shape!r}")


def started_at(value: Any) -> float:
    """When the consumer started: its input had arrived and been rebuilt by then."""
    del value
    return time.time()


def stamp(_: int) -> float:
    return time.time()


def handoff_MBps(
    client: Any, shape: str, nbytes: int, consumer: str, repeats: int = REPEATS
) -> float:
    """Median hand-off rate of ``shape`` values of ``nbytes`` to workers
    offering the ``consumer`` resource, from a worker offering PRODUCER."""
    samples = []
    for r in range(repeats):
        value = client.submit(
            make_value, shape, nbytes, resources={"PRODUCER": 1}, **unique(client)
        )
        client.gather([value])
        dispatch = []
        for i in range(5):
            t0 = time.time()
            stamped = client.submit(stamp, r * 10 + i, resources={consumer: 1}, **unique(client))
            dispatch.append(stamped.result() - t0)
        t0 = time.time()
        consumer_task = client.submit(started_at, value, resources={consumer: 1}, **unique(client))
        start = consumer_task.result()
        samples.append(max(start - t0 - statistics.median(dispatch), 1e-6))
        del value, consumer_task  # free every copy before the next value is made
    return nbytes / statistics.median(samples) / 1e6


def size_label(nbytes: int) -> str:
    return f"{nbytes // 1000**3}GB" if nbytes >= 1000**3 else f"{nbytes // 1000**2}MB"
