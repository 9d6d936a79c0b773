"""Placement micro-benchmark: the scheduler's state machine alone, no processes.

Simulated workers (10 ... 10,000) each declare a mix of 8 resource kinds; tasks
with mixed needs keep every worker busy, and each reported finish frees room
for one more placement. Reports placement decisions per second in that steady
state, and the scheduler's memory per pending task (payloads aside).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections import deque

from apportion_common.resources import to_quanta
from scheduler_service.commands import AssignTask
from scheduler_service.events import TaskFinished, TasksSubmitted, TaskSubmission, WorkerJoined
from scheduler_service.state import ClusterState

KINDS = ["GPU", "MEMORY", "DISK", "LICENSE", "FPGA", "NET", "TPU", "process"]


def make_workers(state: ClusterState, n: int, rng: random.Random) -> None:
    for worker_id in range(1, n + 1):
        kinds = rng.sample(KINDS, 4)
        declared = to_quanta({k: rng.choice([2, 4, 8]) for k in kinds})
        state.handle(WorkerJoined(worker_id, f"w{worker_id}", f"h:{worker_id}", 4, declared))


def make_tasks(n: int, rng: random.Random, start: int = 0) -> tuple[TaskSubmission, ...]:
    return tuple(
        TaskSubmission(
            f"t{start + i}",
            b"",
            to_quanta({k: 1 for k in rng.sample(KINDS, rng.choice([0, 1, 1, 2]))}),
        )
        for i in range(n)
    )


def decisions_per_second(n_workers: int, n_tasks: int, budget_s: float) -> tuple[float, int]:
    rng = random.Random(n_workers)
    state = ClusterState()
    make_workers(state, n_workers, rng)
    # A deque: list.pop(0) moves every other run along, a cost per finish
    # (large at 10,000 workers) that the rate would have counted.
    running: deque[AssignTask] = deque()
    for cmd in state.handle(TasksSubmitted("c", make_tasks(n_tasks, rng))):
        if isinstance(cmd, AssignTask):
            running.append(cmd)
    decisions = 0
    start = last_decision = time.perf_counter()
    while running and time.perf_counter() - start < budget_s:
        run = running.popleft()
        for cmd in state.handle(TaskFinished(run.worker_id, run.key, run.run_id, 8)):
            if isinstance(cmd, AssignTask):
                running.append(cmd)
                decisions += 1
                last_decision = time.perf_counter()
    # Up to the last decision only: once every task is placed, the runs left
    # (40,000 with 10,000 workers) finish with nothing to decide.
    return decisions / (last_decision - start), decisions


def bytes_per_pending_task(n_tasks: int) -> float:
    rng = random.Random(0)
    tasks = make_tasks(n_tasks, rng)
    gc.collect()
    tracemalloc.start()
    state = ClusterState()
    state.handle(TasksSubmitted("c", tasks))
    gc.collect()
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(state.tasks) == n_tasks
    return used / n_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per size")
    args = parser.parse_args()
    print(f"{'workers':>8} {'decisions/s':>12} {'decisions':>10} {'us/decision':>12}")
    for n in (10, 100, 1_000, 10_000):
        rate, count = decisions_per_second(n, args.tasks, args.budget)
        print(f"{n:>8} {rate:>12,.0f} {count:>10,} {1e6 / rate:>12.1f}")
    print(f"scheduler memory per pending task: {bytes_per_pending_task(args.tasks):,.0f} bytes")


if __name__ == "__main__":
    main()
