"""The threads a worker runs task code in.

A fixed set of threads taking calls from one queue. The worker hands each
run's outcome back to its loop itself (batched), so it needs no future per
call: a ThreadPoolExecutor would pay for a future, a lock and an idle-thread
check on every run, a visible share of a short task's cost.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("worker_service")

_STOP = None


class TaskThreads:
    def __init__(self, nthreads: int, name: str = "apportion-task") -> None:
        self._nthreads = nthreads
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)`` in one of the threads (started on first use)."""
        if self._stopped:
            raise RuntimeError("the task threads have stopped")
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._serve, name=f"{self._name}-{i}", daemon=True)
                for i in range(self._nthreads)
            ]
            for thread in self._threads:
                thread.start()
        self._calls.put((fn, args))

    def shutdown(self) -> None:
        """Stop taking calls; running ones finish (their code cannot be
        interrupted), calls not yet begun are dropped."""
        self._stopped = True
        for _ in self._threads:
            self._calls.put(_STOP)

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is _STOP or self._stopped:
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException:  # a bug in the caller's fn; the thread carries on
                log.exception("a task thread's call failed")
