"""Worker queues on real processes: queued tasks wait on the worker, holding
nothing, and start as runs end; the worker never runs more than it declared."""

from __future__ import annotations

import time

import pytest

from client_sdk import Client
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for
from tests.helpers.tasks import max_overlap, timed_sleep

SLEEP_S = 0.2
TASKS = 8


@pytest.mark.parametrize("nthreads", [1, 2])
def test_queued_gpu_tasks_never_run_two_at_once_on_one_gpu(
    processes: Processes, scheduler_address: str, nthreads: int
) -> None:
    processes.worker(scheduler_address, "--nthreads", str(nthreads), "--resources", "GPU=1")
    most_queued = 0
    with Client(scheduler_address) as client:
        futures = [
            client.submit(timed_sleep, SLEEP_S, resources={"GPU": 1}, key=f"gpu-{i}")
            for i in range(TASKS)
        ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = cluster_state(scheduler_address)
            [worker] = state.workers
            assert worker.running <= 1
            assert worker.used_resources.get("GPU", 0) <= 1
            most_queued = max(most_queued, worker.queued)
            if state.task_counts.get("memory", 0) == TASKS:
                break
            time.sleep(0.02)
        intervals = client.gather(futures)
    assert most_queued >= 1, "no task was ever queued on the worker"
    assert max_overlap(intervals) == 1
    assert_all_released(scheduler_address)


def produce(n: int) -> list[int]:
    return list(range(n))


def consume(data: list[int], seconds: float) -> tuple[int, tuple[float, float]]:
    return len(data), timed_sleep(seconds)


def test_queued_tasks_fetch_their_inputs_while_they_wait_and_cancel_cleanly(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "cpu", "--nthreads", "1")
    processes.worker(scheduler_address, "--name", "gpu", "--nthreads", "1", "--resources", "GPU=1")
    with Client(scheduler_address) as client:
        data = client.submit(produce, 1000, workers=["cpu"], key="data")
        consumers = [
            client.submit(consume, data, SLEEP_S, resources={"GPU": 1}, key=f"use-{i}")
            for i in range(4)
        ]
        dropped = client.submit(consume, data, SLEEP_S, resources={"GPU": 1}, key="dropped")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            gpu = next(w for w in cluster_state(scheduler_address).workers if w.name == "gpu")
            if gpu.queued >= 1:
                break
            time.sleep(0.02)
        dropped.cancel()
        results = client.gather(consumers)
    assert [n for n, _ in results] == [1000] * 4
    assert max_overlap([span for _, span in results]) == 1
    assert_all_released(scheduler_address)


def test_a_worker_starts_its_queued_runs_highest_priority_first(
    processes: Processes, scheduler_address: str
) -> None:
    """Both queued behind a running task, the later, higher-priority one
    starts first when the worker has room (it is queued there, so the
    scheduler's own order no longer decides)."""
    processes.worker(scheduler_address, "--nthreads", "1")
    with Client(scheduler_address) as client:
        blocker = client.submit(timed_sleep, 1.0, key="blocker")
        wait_for(lambda: cluster_state(scheduler_address).workers[0].running == 1, 15, "a start")
        low = client.submit(timed_sleep, 0.0, key="low")
        wait_for(lambda: cluster_state(scheduler_address).workers[0].queued == 1, 5, "low queued")
        high = client.submit(timed_sleep, 0.0, key="high", priority=10)
        wait_for(lambda: cluster_state(scheduler_address).workers[0].queued == 2, 5, "both queued")
        (_, blocked_until), (low_start, _), (high_start, _) = client.gather([blocker, low, high])
    assert blocked_until <= high_start < low_start
    assert_all_released(scheduler_address)


def test_a_free_thread_is_never_held_back_by_a_queued_task_waiting_for_a_resource(
    processes: Processes, scheduler_address: str
) -> None:
    """Dask's test_constrained_vs_ready_priority_2 on real processes. One
    worker, 2 threads, R=1: ``a`` holds a thread, ``b`` a thread and R; then
    ``y`` (needs R) and ``x`` (needs only a thread) are queued there, y first.
    When a ends, x starts at once, although y has waited over a second by then
    (it used to block every task queued behind it after QUEUE_OVERTAKE_S, 1 s)."""
    processes.worker(scheduler_address, "--nthreads", "2", "--resources", "R=1")
    with Client(scheduler_address) as client:
        a = client.submit(timed_sleep, 1.5, key="a")
        b = client.submit(timed_sleep, 4.0, key="b", resources={"R": 1})
        wait_for(lambda: cluster_state(scheduler_address).workers[0].running == 2, 15, "a and b")
        y = client.submit(timed_sleep, 0.1, key="y", resources={"R": 1})
        x = client.submit(timed_sleep, 0.1, key="x")
        wait_for(lambda: cluster_state(scheduler_address).workers[0].queued == 2, 5, "both queued")
        (_, a_end), (_, b_end), (y_start, _), (x_start, _) = client.gather([a, b, y, x])
    assert a_end <= x_start < a_end + 0.5, (a_end, x_start)
    assert x_start < b_end - 1.0
    assert b_end <= y_start  # y needs R: it starts when b gives R back
    assert_all_released(scheduler_address)
