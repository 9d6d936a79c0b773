"""The chaos bench's tasks (``bench.chaos``): each run appends one line to
the log of the worker process it ran in, so that what ran where, when, and
holding what, is known from the tasks themselves, not from the scheduler."""

from __future__ import annotations

import json
import os
import time

from apportion_common.task_context import get_task_context

#: Seconds each kind of task works: the GPU stage is the bottleneck, as in the seed.
LOAD_S, PROCESS_S, AGGREGATE_S = 0.002, 0.02, 0.005


def _record(log_dir: str, began: float) -> None:
    context = get_task_context()
    assert context is not None
    line = json.dumps(
        {
            "key": context.key,
            "worker": context.worker_name,
            "pid": os.getpid(),
            "start": began,
            "end": time.time(),
            "resources": dict(context.resources),
        }
    )
    fd = os.open(
        os.path.join(log_dir, f"runs-{os.getpid()}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )
    try:
        os.write(fd, (line + "\n").encode())  # one write: whole lines, whoever dies when
    finally:
        os.close(fd)


def load(log_dir: str, client: int, i: int) -> int:
    began = time.time()
    time.sleep(LOAD_S)
    _record(log_dir, began)
    return client * 1_000_000 + i


def process(log_dir: str, x: int) -> int:
    began = time.time()
    time.sleep(PROCESS_S)
    _record(log_dir, began)
    return 2 * x + 1


def aggregate(log_dir: str, parts: list[int]) -> int:
    began = time.time()
    time.sleep(AGGREGATE_S)
    _record(log_dir, began)
    return sum(parts)


def expected(client: int, i: int) -> int:
    return 2 * (client * 1_000_000 + i) + 1
