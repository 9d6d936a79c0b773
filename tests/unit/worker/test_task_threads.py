"""The worker's task threads: calls run in the threads, a failing call does
not take a thread down, and after shutdown nothing new begins."""

from __future__ import annotations

import threading

import pytest

from worker_service.threads import TaskThreads


def test_calls_run_in_the_task_threads_and_survive_a_failing_one() -> None:
    threads = TaskThreads(2, name="t")
    seen: list[str] = []
    done = threading.Event()

    lock = threading.Lock()

    def record(i: int) -> None:
        with lock:
            seen.append(threading.current_thread().name)
            if len(seen) == 10:
                done.set()

    def fail() -> None:
        raise RuntimeError("a bug")

    threads.submit(fail)
    for i in range(10):
        threads.submit(record, i)
    assert done.wait(5)
    assert len(seen) == 10 and set(seen) <= {"t-0", "t-1"}
    threads.shutdown()
    with pytest.raises(RuntimeError, match="stopped"):
        threads.submit(record, 0)
