"""Dask collections on real processes: dask.delayed, dask.array and
dask.dataframe (CSV files the test writes), with resources from
``dask.annotate`` honoured whether or not the graph is optimized, and never
more annotated tasks at once on a worker than it declares.

One scheduler, a worker with GPU=1 and one without, 4 threads each.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask import delayed

import client_sdk
from client_sdk import Client, get_task_context
from tests.helpers.processes import Processes, assert_all_released
from tests.helpers.tasks import max_overlap

PARTITIONS = 4


def held_gpu() -> float:
    """The GPU this task holds (-1 outside a task: dask calls functions to
    infer their output's type)."""
    try:
        return float(get_task_context().resources.get("GPU", 0))
    except RuntimeError:
        return -1.0


def worker_name() -> str:
    try:
        return get_task_context().worker_name
    except RuntimeError:
        return ""


def stamp(part: pd.DataFrame, tag: str) -> pd.DataFrame:
    """The partition with where and when this step ran on it."""
    start = time.monotonic()
    time.sleep(0.1 if len(part) else 0)
    part = part.copy()
    part[f"gpu_{tag}"] = held_gpu()
    part[f"worker_{tag}"] = worker_name()
    part[f"start_{tag}"] = start
    part[f"end_{tag}"] = time.monotonic()
    return part


def func1(part: pd.DataFrame) -> pd.DataFrame:
    return stamp(part, "1")


def func2(part: pd.DataFrame) -> pd.DataFrame:
    return stamp(part, "2")


@pytest.fixture
def cluster(processes: Processes, scheduler_address: str) -> Iterator[str]:
    processes.worker(scheduler_address, "--name", "gpu", "--nthreads", "4", "--resources", "GPU=1")
    processes.worker(scheduler_address, "--name", "cpu", "--nthreads", "4")
    yield scheduler_address
    assert_all_released(scheduler_address)


@pytest.fixture
def csv_files(tmp_path: Path) -> str:
    for i in range(PARTITIONS):
        pd.DataFrame({"a": range(i * 5, i * 5 + 5), "b": 1}).to_csv(
            tmp_path / f"part-{i}.csv", index=False
        )
    return str(tmp_path / "part-*.csv")


def assert_ran_on_the_gpu_one_at_a_time(frame: pd.DataFrame, *tags: str) -> None:
    for tag in tags:
        assert set(frame[f"gpu_{tag}"]) == {1.0}, frame[f"gpu_{tag}"]
        assert set(frame[f"worker_{tag}"]) == {"gpu"}
    spans = {
        (row[f"start_{tag}"], row[f"end_{tag}"]) for _, row in frame.iterrows() for tag in tags
    }
    assert max_overlap(sorted(spans)) == 1  # GPU=1: one annotated task at a time


@pytest.mark.parametrize("optimize_graph", [True, False])
def test_the_seed_s_dataframe_example_holds_a_gpu_for_every_annotated_partition(
    cluster: str, csv_files: str, optimize_graph: bool
) -> None:
    """x = dd.read_csv(...); with dask.annotate(resources={"GPU": 1}): y =
    x.map_partitions(func1); z = y.map_partitions(func2); z.compute(). Dask's
    query planning drops the annotation (and fusion would too); here every
    func1/func2 partition holds GPU=1, optimized or not."""
    with Client(cluster):
        x = dd.read_csv(csv_files)
        with dask.annotate(resources={"GPU": 1}):
            y = x.map_partitions(func1)
            z = y.map_partitions(func2)
        frame = z.compute(optimize_graph=optimize_graph)
    assert sorted(frame["a"]) == list(range(PARTITIONS * 5))
    assert_ran_on_the_gpu_one_at_a_time(frame, "1", "2")


def test_apportion_s_annotate_marks_collections_and_nothing_else(
    cluster: str, csv_files: str
) -> None:
    with Client(cluster) as client:
        x = dd.read_csv(csv_files)
        with client_sdk.annotate(resources={"GPU": 1}):  # apportion's own block
            y = x.map_partitions(func1)
        plain = x.map_partitions(func2)  # built outside any block
        annotated = client.compute(y).result(timeout=60)
        unannotated = client.compute(plain).result(timeout=60)
    assert set(annotated["gpu_1"]) == {1.0} and set(annotated["worker_1"]) == {"gpu"}
    assert set(unannotated["gpu_2"]) == {0.0}


def block_where(block: np.ndarray) -> np.ndarray:
    """Each element: 1 if this block ran holding a GPU on the gpu worker."""
    on_gpu = held_gpu() == 1.0 and worker_name() == "gpu"
    return np.full(block.shape, 1.0 if on_gpu else 100.0)


def test_an_annotated_array_step_holds_a_gpu_through_fusion(cluster: str) -> None:
    with Client(cluster):
        x = da.ones(40, chunks=10)
        with dask.annotate(resources={"GPU": 1}):
            y = x.map_blocks(block_where, dtype=float)
        total = y.sum().compute()  # map_blocks is fused into the sum's tasks
    assert total == 40.0


def where(*inputs: Any) -> tuple[str, float]:
    return worker_name(), held_gpu()


def timed_where(i: int) -> tuple[str, float, float, float]:
    start = time.monotonic()
    time.sleep(0.2)
    return worker_name(), held_gpu(), start, time.monotonic()


def test_delayed_tasks_hold_what_their_annotation_asks_and_no_more(cluster: str) -> None:
    with Client(cluster) as client:
        with dask.annotate(resources={"GPU": 1}):
            on_gpu = [delayed(timed_where)(i) for i in range(3)]
            first = delayed(where)(0)
        after = delayed(where)(on_gpu)
        results = dask.compute(*on_gpu, after)
        assert [r[:2] for r in results[:3]] == [("gpu", 1.0)] * 3
        assert max_overlap([r[2:] for r in results[:3]]) == 1  # GPU=1: one at a time
        assert results[3][1] == 0.0
        on_gpu = [first]
        # The same through the client's own calls.
        assert client.compute(on_gpu[0]).result(timeout=30) == ("gpu", 1.0)
        assert client.get(dict(after.__dask_graph__()), after.key)[1] == 0.0


def test_submit_inside_dask_annotate_takes_its_resources(cluster: str) -> None:
    with Client(cluster) as client:
        with dask.annotate(resources={"GPU": 1}, priority=3):
            future = client.submit(where)
        assert future.result(timeout=30) == ("gpu", 1.0)


def inc(x: int) -> int:
    return x + 1


def test_compute_persist_get_and_the_default_scheduler(cluster: str, csv_files: str) -> None:
    with Client(cluster) as client:
        x = da.arange(20, chunks=5) + 1
        future = client.compute(x.sum())
        assert future.result(timeout=30) == sum(range(1, 21))
        futures = client.compute([x.max(), x.min()])
        assert client.gather(futures) == [20, 1]
        persisted = client.persist(x * 2)
        assert isinstance(persisted, da.Array)
        assert persisted.sum().compute() == 2 * sum(range(1, 21))  # from the held results
        frame = client.persist(dd.read_csv(csv_files))
        assert len(frame.compute()) == PARTITIONS * 5
        dsk = {"a": (inc, 1), "b": (inc, "a"), "c": (sum, ["a", "b"])}
        assert client.get(dsk, ["c", ["a", "b"]]) == [5, [2, 3]]
        assert dask.compute(x.sum(), scheduler=client.get) == (sum(range(1, 21)),)
        assert x.sum().compute() == sum(range(1, 21))  # the client is dask's default
    # Closed, the client is no longer dask's scheduler.
    assert dask.config.get("scheduler", None) is None
