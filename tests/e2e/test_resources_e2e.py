"""Resources bound concurrency on real worker processes, not threads."""

from __future__ import annotations

import hashlib
import logging
import random

import pytest

from client_sdk import Client, get_task_context
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for
from tests.helpers.tasks import max_overlap, timed_sleep, where_and_held

SLEEP_S = 0.3
PAYLOAD_BYTES = 20_000_000


def produce(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def consume(data: bytes) -> tuple[int, str, str]:
    return len(data), hashlib.sha256(data).hexdigest(), get_task_context().worker_name


def producer_location(data: bytes) -> str:
    return get_task_context().worker_name


def _overlap_on_one_worker(
    processes: Processes, address: str, worker_resources: str, need: dict[str, float], n: int
) -> int:
    processes.worker(address, "--resources", worker_resources, "--nthreads", "4")
    with Client(address) as client:
        futures = [client.submit(timed_sleep, SLEEP_S, resources=need) for _ in range(n)]
        intervals = client.gather(futures)
    assert_all_released(address)
    return max_overlap(intervals)


def test_concurrency_is_bounded_by_resources_not_threads(
    processes: Processes, scheduler_address: str
) -> None:
    # 4 threads, but A=2 and each task needs A=1: exactly two at once.
    overlap = _overlap_on_one_worker(processes, scheduler_address, "A=2", {"A": 1}, 6)
    assert overlap == 2


def test_scarcest_resource_bounds_concurrency(processes: Processes, scheduler_address: str) -> None:
    # A would allow 4 at once, B only 1 / 0.5 = 2.
    overlap = _overlap_on_one_worker(processes, scheduler_address, "A=4 B=1", {"A": 1, "B": 0.5}, 6)
    assert overlap == 2


def test_fractional_amounts_run_two_halves_at_once(
    processes: Processes, scheduler_address: str
) -> None:
    overlap = _overlap_on_one_worker(processes, scheduler_address, "GPU=1", {"GPU": 0.5}, 6)
    assert overlap == 2


def test_without_resources_threads_bound_concurrency(
    processes: Processes, scheduler_address: str
) -> None:
    # The control for the tests above: with no resource needed, all 4 threads run.
    overlap = _overlap_on_one_worker(processes, scheduler_address, "A=2", {}, 4)
    assert overlap == 4


def test_task_needing_an_undeclared_resource_waits_and_says_why(
    processes: Processes, scheduler_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="client_sdk")
    processes.worker(scheduler_address, "--resources", "A=1", "--name", "plain")
    with Client(scheduler_address) as client:
        future = client.submit(where_and_held, resources={"TPU": 2})

        def warned() -> bool:
            return any(
                r.name == "client_sdk" and r.levelno == logging.WARNING for r in caplog.records
            )

        wait_for(warned, timeout=5, what="a WARNING from client_sdk")
        message = next(r.getMessage() for r in caplog.records if r.name == "client_sdk")
        assert "TPU" in message
        assert "the most any worker offers is TPU=0" in message
        assert future.status == "pending"
        assert cluster_state(scheduler_address).workers[0].running == 0

        processes.worker(scheduler_address, "--resources", "TPU=4", "--name", "tpu-box")
        name, held = future.result(timeout=15)
    assert name == "tpu-box"
    assert held == {"TPU": 2}


def test_large_result_moves_between_workers_intact(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "PRODUCER=1", "--name", "w1")
    processes.worker(scheduler_address, "--resources", "CONSUMER=1", "--name", "w2")
    expected = hashlib.sha256(produce(PAYLOAD_BYTES, 7)).hexdigest()
    with Client(scheduler_address) as client:
        data = client.submit(produce, PAYLOAD_BYTES, 7, resources={"PRODUCER": 1})
        where_made = client.submit(producer_location, data, resources={"PRODUCER": 1})
        checked = client.submit(consume, data, resources={"CONSUMER": 1})
        length, digest, consumer = checked.result(timeout=60)
        assert where_made.result(timeout=30) == "w1"
        assert (length, digest, consumer) == (PAYLOAD_BYTES, expected, "w2")
        # And to the client too.
        local = data.result(timeout=60)
        assert len(local) == PAYLOAD_BYTES
        assert hashlib.sha256(local).hexdigest() == expected


def test_fixed_point_accounting_fits_three_tenths(
    processes: Processes, scheduler_address: str
) -> None:
    # In floating point 0.1 + 0.1 + 0.1 > 0.3, so a float ledger would run two.
    overlap = _overlap_on_one_worker(processes, scheduler_address, "A=0.3", {"A": 0.1}, 3)
    assert overlap == 3


def test_many_small_tasks_across_workers(processes: Processes, scheduler_address: str) -> None:
    for _ in range(2):
        processes.worker(scheduler_address, "--resources", "A=3", "--nthreads", "4")
    with Client(scheduler_address) as client:
        futures = client.map(pow, range(1000), [2] * 1000, resources={"A": 1})
        assert client.gather(futures) == [i * i for i in range(1000)]
        held = client.scheduler_info()["workers"].values()
    assert all(w["used_resources"] == {"A": 0} for w in held)
