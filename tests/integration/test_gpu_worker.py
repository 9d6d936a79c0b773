"""A worker that knows its GPUs, in process on 127.0.0.1 with a real scheduler
and client: concurrent tasks get distinct devices, fractions pack, the
scheduler shows who holds which, and ``isolate=True`` (or
``--isolate-gpu-tasks``) runs a task in a child process that sees only its
devices. The devices are made up: nothing here touches a GPU."""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from apportion_common.gpus import GpuDevice
from client_sdk import Client, get_task_context
from scheduler_service import SchedulerServer
from worker_service.worker import Worker

GPUS = (
    GpuDevice("2", 2, "GPU-2222", "Fake GPU", 80 * 2**30),
    GpuDevice("3", 3, "GPU-3333", "Fake GPU", 80 * 2**30),
)
CALL_TIMEOUT = 30

#: While a test's tasks run: which devices each running task holds.
_running: dict[str, tuple[str, ...]] = {}
_overlaps: list[dict[str, tuple[str, ...]]] = []
_lock = threading.Lock()


def hold(seconds: float) -> tuple[str, ...]:
    """Hold the task's GPUs for a while, noting who else holds what meanwhile."""
    # This module's own globals, not the copies a task pickled by value
    # carries (tests are sent by value): the worker runs in this process.
    here = importlib.import_module(__name__)
    ctx = get_task_context()
    with here._lock:
        here._running[ctx.key] = ctx.gpus
        here._overlaps.append(dict(here._running))
    time.sleep(seconds)
    with here._lock:
        del here._running[ctx.key]
    return ctx.gpus


def where_am_i() -> dict[str, Any]:
    ctx = get_task_context()
    return {
        "pid": os.getpid(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": ctx.gpus,
        "key": ctx.key,
    }


async def _worker(server: SchedulerServer, **options: Any) -> Worker:
    worker = Worker(server.address, host="127.0.0.1", validate=True, **options)
    await worker.start()
    await worker.wait_registered(10)
    return worker


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[..., Any]]:
    """Start workers on demand (closed at the end) under one validating scheduler."""
    server = SchedulerServer("127.0.0.1", 0, validate=True)
    await server.start()
    workers: list[Worker] = []

    async def start(**options: Any) -> tuple[SchedulerServer, Worker]:
        workers.append(await _worker(server, **options))
        return server, workers[-1]

    _overlaps.clear()
    try:
        yield start
    finally:
        for worker in workers:
            await worker.close()
        await server.stop(0)
        server.servicer.state.validate()


async def _settled(client: Client[Any], worker: Worker) -> dict[str, Any]:
    """The worker's entry once nothing is held there any more."""
    deadline = time.monotonic() + 10
    while True:
        info = (await client.scheduler_info())["workers"][worker.address]
        if not any(info["used_resources"].values()) and not any(g["tasks"] for g in info["gpus"]):
            return info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)


async def test_concurrent_tasks_get_distinct_devices_and_the_scheduler_shows_them(
    cluster: Callable[..., Any],
) -> None:
    server, worker = await cluster(resources={"GPU": 2}, nthreads=4, gpus=GPUS)
    async with Client(server.address, asynchronous=True) as client:
        futures = [await client.submit(hold, 1.0, resources={"GPU": 1}) for _ in range(2)]
        # While they run: each device held by one of them, as status shows it.
        deadline = time.monotonic() + 10
        while True:
            info = (await client.scheduler_info())["workers"][worker.address]
            holders = {g["id"]: g["tasks"] for g in info["gpus"]}
            if all(holders.values()):
                break
            assert time.monotonic() < deadline, holders
            await asyncio.sleep(0.05)
        assert sorted(k for keys in holders.values() for k in keys) == sorted(
            f.key for f in futures
        )
        assert [g["name"] for g in info["gpus"]] == ["Fake GPU", "Fake GPU"]
        given = [await asyncio.wait_for(f.result(), CALL_TIMEOUT) for f in futures]
        assert sorted(given) == [("2",), ("3",)]
        assert {tuple(sorted(o.values())) for o in _overlaps if len(o) == 2} == {(("2",), ("3",))}
        settled = await _settled(client, worker)
        assert [g["tasks"] for g in settled["gpus"]] == [[], []]
    worker.state.validate()


async def test_fractional_leases_pack_two_to_a_device(cluster: Callable[..., Any]) -> None:
    server, worker = await cluster(resources={"GPU": 2}, nthreads=4, gpus=GPUS)
    async with Client(server.address, asynchronous=True) as client:
        futures = [await client.submit(hold, 0.8, resources={"GPU": 0.5}) for _ in range(4)]
        given = [await asyncio.wait_for(f.result(), CALL_TIMEOUT) for f in futures]
        assert sorted(given) == [("2",), ("2",), ("3",), ("3",)]
        for seen in _overlaps:
            per_device = [d for gpus in seen.values() for d in gpus]
            assert all(per_device.count(d) <= 2 for d in per_device), seen
        assert max(len(seen) for seen in _overlaps) == 4  # all four ran at once
        await _settled(client, worker)


async def test_an_isolated_task_runs_in_a_child_that_sees_only_its_device(
    cluster: Callable[..., Any],
) -> None:
    server, worker = await cluster(resources={"GPU": 2}, nthreads=2, gpus=GPUS)
    async with Client(server.address, asynchronous=True) as client:
        isolated = await client.submit(where_am_i, resources={"GPU": 1}, isolate=True)
        here = await asyncio.wait_for(isolated.result(), CALL_TIMEOUT)
        assert here["pid"] != os.getpid()
        assert here["gpus"] in (("2",), ("3",)) and here["visible"] == here["gpus"][0]
        assert here["key"] == isolated.key
        no_gpu = await client.submit(where_am_i, isolate=True)
        assert (await asyncio.wait_for(no_gpu.result(), CALL_TIMEOUT))["visible"] == ""
        threaded = await client.submit(where_am_i, resources={"GPU": 1})
        in_thread = await asyncio.wait_for(threaded.result(), CALL_TIMEOUT)
        assert in_thread["pid"] == os.getpid() and in_thread["gpus"] in (("2",), ("3",))

        def boom() -> None:
            raise KeyError("from the child")

        failed = await client.submit(boom, isolate=True, resources={"GPU": 1})
        with pytest.raises(KeyError, match="from the child"):
            await asyncio.wait_for(failed.result(), CALL_TIMEOUT)
        await _settled(client, worker)


async def test_a_worker_that_isolates_gpu_tasks_keeps_the_others_in_threads(
    cluster: Callable[..., Any],
) -> None:
    server, _ = await cluster(
        resources={"GPU": 1}, nthreads=2, gpus=GPUS[:1], isolate_gpu_tasks=True
    )
    async with Client(server.address, asynchronous=True) as client:
        gpu = await client.submit(where_am_i, resources={"GPU": 1})
        cpu = await client.submit(where_am_i)
        on_gpu = await asyncio.wait_for(gpu.result(), CALL_TIMEOUT)
        on_cpu = await asyncio.wait_for(cpu.result(), CALL_TIMEOUT)
    assert on_gpu["pid"] != os.getpid() and on_gpu["visible"] == "2"
    assert on_cpu["pid"] == os.getpid()


async def test_without_known_devices_an_isolated_child_sees_what_the_worker_sees(
    cluster: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    server, worker = await cluster(resources={"GPU": 2}, nthreads=1)
    async with Client(server.address, asynchronous=True) as client:
        task = await client.submit(where_am_i, resources={"GPU": 1}, isolate=True)
        here = await asyncio.wait_for(task.result(), CALL_TIMEOUT)
        assert here["visible"] == "5,6" and here["gpus"] == ()
        info = await _settled(client, worker)
        assert info["gpus"] == []
