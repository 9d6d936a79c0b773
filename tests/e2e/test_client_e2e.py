"""The client SDK against real processes: threads, asyncio, nested futures,
annotate, keys, serialization failures, task context, LocalCluster."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from client_sdk import (
    Client,
    Future,
    LocalCluster,
    SchedulerConnectionError,
    SerializationError,
    annotate,
    get_task_context,
)
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for
from tests.helpers.tasks import where_and_held


def wait_until_no_tasks(address: str, what: str) -> None:
    """Wait (10 s at most) until the scheduler holds no task at all."""
    wait_for(lambda: sum(cluster_state(address).task_counts.values()) == 0, 10, what)


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def describe(nested: Any, *, extra: Any = None) -> Any:
    return {"nested": nested, "extra": extra}


def held_resources() -> dict[str, float]:
    return dict(get_task_context().resources)


def count_call(path: str, value: int) -> int:
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def make_lock() -> threading.Lock:
    return threading.Lock()


def context_fields() -> tuple[str, str, str, dict[str, float]]:
    ctx = get_task_context()
    return ctx.key, ctx.worker_address, ctx.worker_name, dict(ctx.resources)


def test_sync_client_from_eight_threads(processes: Processes, scheduler_address: str) -> None:
    processes.worker(scheduler_address, "--nthreads", "4", "--resources", "A=2")
    with Client(scheduler_address) as client:

        def work(t: int) -> list[int]:
            futures = [
                client.submit(add, t * 100, i, resources={"A": 1} if i % 2 else None)
                for i in range(10)
            ]
            futures += client.map(inc, range(t * 10, t * 10 + 5))
            assert client.scheduler_info()["workers"]
            return [f.result(timeout=30) for f in futures]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(8)))
    for t, got in enumerate(results):
        assert got == [t * 100 + i for i in range(10)] + [x + 1 for x in range(t * 10, t * 10 + 5)]


async def test_async_client(processes: Processes, scheduler_address: str) -> None:
    processes.worker(scheduler_address, "--nthreads", "2", "--resources", "GPU=1")
    async with Client(scheduler_address, asynchronous=True) as client:
        future = await client.submit(inc, 1, resources={"GPU": 1})
        assert isinstance(future, Future)
        assert await future == 2
        assert await future.result(timeout=10) == 2
        futures = await client.map(inc, range(5))
        assert all(isinstance(f, Future) for f in futures)
        assert await client.gather(futures) == [1, 2, 3, 4, 5]
        total = await client.submit(add, future, futures[-1])
        assert await client.gather({"total": total, "list": [future]}) == {
            "total": 7,
            "list": [2],
        }
        info = await client.scheduler_info()
        assert len(info["workers"]) == 1


def test_futures_nested_in_arguments(processes: Processes, scheduler_address: str) -> None:
    processes.worker(scheduler_address, "--nthreads", "2")
    processes.worker(scheduler_address, "--nthreads", "2")
    with Client(scheduler_address) as client:
        a, b, c, d = (client.submit(inc, i) for i in (1, 2, 3, 4))
        got = client.submit(describe, [a, (b, {"c": c})], extra={"d": [d], "plain": 5}).result(
            timeout=30
        )
    assert got == {"nested": [2, (3, {"c": 4})], "extra": {"d": [5], "plain": 5}}


def test_annotate_nests_merges_and_is_replaced_by_explicit_resources(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--nthreads", "2", "--resources", "A=2 B=2 C=1")
    with Client(scheduler_address) as client:
        with annotate(resources={"A": 1, "B": 1}):
            outer = client.submit(held_resources)
            with annotate(resources={"B": 2, "C": 0.5}):
                inner = client.submit(held_resources)
                explicit = client.submit(held_resources, resources={"C": 1})
                mapped = client.map(held_resources)
            back_out = client.submit(held_resources)
        outside = client.submit(held_resources)
        assert outer.result(timeout=30) == {"A": 1, "B": 1}
        assert inner.result(timeout=30) == {"A": 1, "B": 2, "C": 0.5}
        assert explicit.result(timeout=30) == {"C": 1}
        assert mapped == []  # map over nothing makes no task
        assert back_out.result(timeout=30) == {"A": 1, "B": 1}
        assert outside.result(timeout=30) == {}


def test_same_key_returns_the_existing_task(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--nthreads", "2")
    log = tmp_path / "calls"
    with Client(scheduler_address) as client:
        first = client.submit(count_call, str(log), 1, key="the-task")
        assert first.key == "the-task"
        assert first.result(timeout=30) == 1
        again = client.submit(count_call, str(log), 2, key="the-task")
        assert again.key == "the-task"
        assert again.result(timeout=30) == 1
        fresh = client.submit(count_call, str(log), 3)
        assert fresh.key != "the-task"
        assert fresh.result(timeout=30) == 3
    assert log.read_text().split() == ["1", "3"]


def test_unpicklable_function_fails_at_submit(scheduler_address: str) -> None:
    lock = threading.Lock()

    def holds_lock() -> bool:
        return lock.locked()

    with Client(scheduler_address) as client:
        with pytest.raises(SerializationError, match="holds_lock"):
            client.submit(holds_lock)
        with pytest.raises(SerializationError):
            client.submit(inc, lock)  # an unpicklable argument too
        assert client.submit(inc, 1, key="after").key == "after"


def test_unpicklable_result_names_the_result_and_the_worker_survives(
    processes: Processes, scheduler_address: str
) -> None:
    worker = processes.worker(scheduler_address, "--nthreads", "1")
    with Client(scheduler_address) as client:
        bad = client.submit(make_lock)
        with pytest.raises(SerializationError, match="result") as info:
            bad.result(timeout=30)
        assert bad.key in str(info.value)
        assert bad.status == "error"
        assert client.submit(inc, 41).result(timeout=30) == 42
    assert worker.poll() is None
    assert len(cluster_state(scheduler_address).workers) == 1


def test_task_context(processes: Processes, scheduler_address: str) -> None:
    with pytest.raises(RuntimeError):
        get_task_context()
    processes.worker(scheduler_address, "--resources", "GPU=2", "--name", "ctx-worker")
    with Client(scheduler_address) as client:
        future = client.submit(context_fields, resources={"GPU": 1.5})
        key, address, name, held = future.result(timeout=30)
        (worker_address,) = client.scheduler_info()["workers"]
    assert key == future.key
    assert address == worker_address
    assert name == "ctx-worker"
    assert held == {"GPU": 1.5}
    with pytest.raises(RuntimeError):
        get_task_context()


def test_local_cluster() -> None:
    with LocalCluster(n_workers=2, nthreads=2, resources={"GPU": 2}) as cluster:
        with Client(cluster) as client:
            info = client.scheduler_info()
            assert info["address"] == cluster.address
            assert len(info["workers"]) == 2
            for w in info["workers"].values():
                assert w["nthreads"] == 2 and w["resources"] == {"GPU": 2}
            futures = [client.submit(where_and_held, resources={"GPU": 1}) for _ in range(8)]
            results = client.gather(futures)
            assert all(held == {"GPU": 1} for _, held in results)
            assert {name for name, _ in results} <= {w["name"] for w in info["workers"].values()}
        assert_all_released(cluster.address)
        procs = [cluster.scheduler, *cluster.workers]
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def test_two_clients_share_a_key(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--nthreads", "2")
    log = tmp_path / "calls"
    with Client(scheduler_address) as first, Client(scheduler_address) as second:
        a = first.submit(count_call, str(log), 1, key="shared")
        assert a.result(timeout=30) == 1
        b = second.submit(count_call, str(log), 2, key="shared")
        assert b.result(timeout=30) == 1
        first.close()
        # The first client left; the second still holds the key and its result.
        assert b.result(timeout=30) == 1
    assert log.read_text().split() == ["1"]


def test_dropped_futures_and_closed_clients_release_their_tasks(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--nthreads", "2", "--resources", "A=1")
    with Client(scheduler_address) as client:
        futures = client.map(inc, range(10))
        assert client.gather(futures) == list(range(1, 11))
        assert sum(cluster_state(scheduler_address).task_counts.values()) == 10
        del futures
        gc.collect()
        wait_until_no_tasks(scheduler_address, "the scheduler to forget released tasks")
        running = client.submit(sleep_then, 0.5, 1, resources={"A": 1})
        queued = client.submit(sleep_then, 0.5, 2, resources={"A": 1})
        wait_for(lambda: cluster_state(scheduler_address).workers[0].running == 1, 10, "a run")
        assert running.status == queued.status == "pending"
    # Closing the client released both; the running one's code still returns.
    assert_all_released(scheduler_address)
    wait_until_no_tasks(scheduler_address, "the scheduler to forget the closed client's tasks")


def test_a_key_dropped_and_submitted_again_at_once_is_never_lost(
    processes: Processes, scheduler_address: str
) -> None:
    """Releases of dropped futures and submits travel in batches: a key whose
    future is dropped and submitted again straight away (key=...) must still
    get its result, and nothing may be left behind."""
    processes.worker(scheduler_address, "--nthreads", "2")
    with Client(scheduler_address) as client:
        keep = [client.submit(inc, i) for i in range(20)]  # a release batch under way
        for i in range(50):
            dropped = client.submit(inc, i, key=f"again-{i}")
            del dropped
            again = client.submit(inc, i + 100, key=f"again-{i}")
            # The first task's result (it was still there) or the second's.
            assert again.result(timeout=30) in (i + 1, i + 101)
            del again
        assert client.gather(keep) == list(range(1, 21))
        del keep
        gc.collect()
        wait_until_no_tasks(scheduler_address, "every task to be released")
    assert_all_released(scheduler_address)


@pytest.mark.parametrize("worker_queue", ["0", "default"])
def test_priority_orders_queued_tasks(
    processes: Processes, tmp_path: Path, worker_queue: str
) -> None:
    args = ("--worker-queue", worker_queue) if worker_queue != "default" else ()
    scheduler_address = processes.scheduler(*args)
    processes.worker(scheduler_address, "--nthreads", "1")
    log = tmp_path / "order"
    with Client(scheduler_address) as client:
        blocker = client.submit(sleep_then, 0.5, 0)
        wait_for(lambda: cluster_state(scheduler_address).workers[0].running == 1, 10, "a run")
        low = [client.submit(count_call, str(log), i) for i in range(3)]
        high = client.submit(count_call, str(log), 99, priority=10)
        client.gather([blocker, high, *low])
    order = log.read_text().split()
    if worker_queue == "0":
        assert order == ["99", "0", "1", "2"]
    else:
        # A task already in the worker's queue (two places per thread) may
        # run before a later one of higher priority; nothing else does.
        assert "99" in order[:3], order
        assert [n for n in order if n != "99"] == ["0", "1", "2"]


def test_losing_the_scheduler_fails_pending_futures(processes: Processes) -> None:
    address = processes.scheduler()
    scheduler = processes.procs[0]
    processes.worker(address, "--nthreads", "1")
    # It tries to reconnect for one second, then gives up.
    with Client(address, reconnect_timeout=1) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        pending = client.submit(sleep_then, 5, 1)
        wait_for(lambda: cluster_state(address).workers[0].running == 1, 10, "a run")
        scheduler.kill()
        scheduler.wait(10)
        with pytest.raises(SchedulerConnectionError) as info:
            pending.result(timeout=15)
        assert isinstance(info.value, ConnectionError)
        assert address in str(info.value)
        with pytest.raises(SchedulerConnectionError):
            client.submit(inc, 2).result(timeout=15)


def test_client_to_an_absent_scheduler_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(SchedulerConnectionError, match=r"127\.0\.0\.1:1"):
        Client("127.0.0.1:1", timeout=1)
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError):
        Client("no-port-here")
