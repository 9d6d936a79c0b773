"""No starvation, end to end: the seed's 70 GB aggregate behind a stream of
small MEMORY tasks starts within a bounded time, and the small ones resume."""

from __future__ import annotations

import time

from client_sdk import Client
from tests.helpers.processes import Processes
from tests.helpers.tasks import max_overlap


def small(i: int) -> tuple[float, float]:
    start = time.time()
    time.sleep(0.3)
    return start, time.time()


def big() -> tuple[float, float]:
    start = time.time()
    time.sleep(0.3)
    return start, time.time()


def test_big_task_is_not_starved_by_small_ones(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "MEMORY=100e9", "--nthreads", "8")
    with Client(scheduler_address) as client:
        # 100 small tasks, five at a time (5 x 20e9 = 100e9): 6 s of work.
        smalls = [client.submit(small, i, resources={"MEMORY": 20e9}) for i in range(100)]
        time.sleep(0.5)
        submitted = time.time()
        aggregate = client.submit(big, resources={"MEMORY": 70e9})
        big_start, big_end = aggregate.result(timeout=60)
        spans = client.gather(smalls)
    waited = big_start - submitted
    # Reserved after 2 s (the default bound), started once four smalls ended.
    assert waited < 4.5, f"the big task waited {waited:.1f}s behind small ones"
    assert waited > 1.0  # it did wait: the bound, not luck, let it in
    # Nothing overlapped the big one beyond what fits: 70e9 + one 20e9 <= 100e9
    # at any instant (one small may start, from the worker's queue, the
    # moment the one before it ends).
    during = [s for s in spans if s[0] < big_end and s[1] > big_start]
    assert max_overlap(during) <= 1
    # Throughput of the small ones resumed after it.
    assert sum(1 for s, _ in spans if s >= big_end) >= 10


def test_a_queued_task_overtaken_by_small_ones_gets_its_worker_reserved(
    processes: Processes,
) -> None:
    """The big task is queued on the worker (it fits what the worker declares)
    while two small ones hold 80 of 100; small ones queued behind it fit in
    what each end frees, so the worker starts them first (a queued task that
    fits never waits) and the big one would starve. The scheduler sees it
    overtaken and waiting longer than --starvation-after, reserves the worker
    for it, queues nothing more there, and the big one starts."""
    address = processes.scheduler("--starvation-after", "1")
    processes.worker(address, "--resources", "MEMORY=100", "--nthreads", "2")
    with Client(address) as client:
        first = [client.submit(small, i, resources={"MEMORY": 40}) for i in range(2)]
        time.sleep(0.1)
        aggregate = client.submit(big, resources={"MEMORY": 70})
        time.sleep(0.1)
        # A stream of small ones: 40 x 0.3 s, two at a time, about 6 s.
        stream = [client.submit(small, i, resources={"MEMORY": 40}) for i in range(40)]
        big_start, big_end = aggregate.result(timeout=60)
        spans = client.gather(first + stream)
    stream_end = max(end for _, end in spans)
    assert big_start < stream_end - 2.0, "the big task waited for the whole stream"
    overlapping = [s for s in spans if s[0] < big_end and s[1] > big_start]
    assert not overlapping  # 70 + 40 > 100: nothing ran beside it
