"""Scheduling rules on real processes: worker restrictions, KilledWorker,
resources changed at runtime, explain, no_worker_timeout, the warning for a
resource no worker declares, and byte units in concurrency."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import client_sdk
from client_sdk import Client, get_task_context
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for
from tests.helpers.tasks import max_overlap, timed_sleep, touch_then_sleep, where_and_held


def worker_name() -> str:
    return get_task_context().worker_name


def die_here() -> None:
    """Kill the worker process that runs this task, as a segfault would."""
    os._exit(1)


def first_of(pair: tuple[float, float]) -> float:
    return pair[0]


def plus_one(x: int) -> tuple[int, str]:
    return x + 1, get_task_context().worker_name


@pytest.fixture
def scheduler_with(processes: Processes) -> Iterator[Callable[..., str]]:
    """Start a scheduler with extra flags; like ``scheduler_address``, check at
    teardown that it is still up and every worker's resources are free."""
    started: list[tuple[str, int]] = []

    def start(*flags: str) -> str:
        address = processes.scheduler(*flags)
        started.append((address, len(processes.procs) - 1))
        return address

    yield start
    for address, index in started:
        assert_all_released(address)
        proc = processes.procs[index]
        assert proc.poll() is None, f"the scheduler died with status {proc.returncode}"


def _address_of(client: Client, name: str) -> str:
    workers = client.scheduler_info()["workers"]
    (address,) = [a for a, w in workers.items() if w["name"] == name]
    return str(address)


# ----------------------------------------------------------------- restrictions


def test_a_task_restricted_to_a_worker_runs_only_there(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "a", "--nthreads", "2")
    processes.worker(scheduler_address, "--name", "b", "--nthreads", "2")
    with Client(scheduler_address) as client:
        b_address = _address_of(client, "b")
        free = client.gather([client.submit(worker_name) for _ in range(8)])
        # Unrestricted, spread placement uses both: the restriction is what pins.
        assert set(free) == {"a", "b"}
        by_name = client.gather([client.submit(worker_name, workers=["b"]) for _ in range(8)])
        by_address = [client.submit(worker_name, workers=[b_address]) for _ in range(8)]
        mapped = client.map(plus_one, range(8), workers=["b"])
        one_string = client.submit(worker_name, workers="b")
        assert by_name == ["b"] * 8
        assert client.gather(by_address) == ["b"] * 8
        assert client.gather(mapped) == [(i + 1, "b") for i in range(8)]
        assert one_string.result(timeout=15) == "b"


def test_a_restricted_task_waits_for_its_busy_worker_unless_others_are_allowed(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--name", "a", "--resources", "GPU=1", "--nthreads", "2")
    processes.worker(scheduler_address, "--name", "b", "--resources", "GPU=1", "--nthreads", "2")
    with Client(scheduler_address) as client:
        long = client.submit(
            touch_then_sleep, str(tmp_path), "long", 1.5, resources={"GPU": 1}, workers=["b"]
        )
        wait_for(lambda: (tmp_path / "long.started").exists(), 15, "the long task to start on b")
        strict = client.submit(
            touch_then_sleep, str(tmp_path), "strict", 0.0, resources={"GPU": 1}, workers=["b"]
        )
        loose = client.submit(
            where_and_held, resources={"GPU": 1}, workers=["b"], allow_other_workers=True
        )
        # The loose one runs on a at once, while b is still busy.
        assert loose.result(timeout=15) == ("a", {"GPU": 1})
        assert not (tmp_path / "long.done").exists(), "the long task ended first"
        assert not (tmp_path / "strict.started").exists()
        assert strict.status == "pending"
        # In b's queue (two places per thread), holding nothing yet.
        assert "is queued on b" in client.explain(strict)
        # The strict one waits for b's GPU: it starts only after the long one ends.
        strict_start, _ = strict.result(timeout=15)
        _, long_end = long.result(timeout=15)
        assert long_end <= strict_start


def test_a_restriction_never_loosens_resources(
    processes: Processes, scheduler_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="client_sdk")
    processes.worker(scheduler_address, "--name", "gpu", "--resources", "GPU=1")
    processes.worker(scheduler_address, "--name", "cpu")
    with Client(scheduler_address) as client:
        never = client.submit(
            touch_then_sleep, str(tmp_path), "never", 0.0, resources={"GPU": 1}, workers=["cpu"]
        )
        loose = client.submit(
            worker_name, resources={"GPU": 1}, workers=["cpu"], allow_other_workers=True
        )
        # Preferred but lacking the GPU, cpu is passed over for the worker that has one.
        assert loose.result(timeout=15) == "gpu"
        time.sleep(1.0)
        assert never.status == "pending"
        assert not (tmp_path / "never.started").exists()
        why = client.explain(never)
        assert "cannot run yet" in why and "GPU=1" in why, why
        assert "the most any worker offers is GPU=0" in why, why
        # The client was told at once too, naming the resource.
        assert any("GPU" in r.getMessage() and never.key in r.getMessage() for r in caplog.records)
        never.cancel()
        wait_for(lambda: never.status == "cancelled", 5, "the cancel")
    assert not (tmp_path / "never.started").exists()


# ---------------------------------------------------------------- KilledWorker


def test_a_task_that_kills_its_workers_errs_with_killed_worker(
    processes: Processes, scheduler_with: Callable[..., str]
) -> None:
    address = scheduler_with("--allowed-failures", "1")
    # Without a nanny, a dead worker process stays dead (see test_faults_e2e
    # for workers that their parent restarts).
    first = processes.worker(address, "--name", "first", "--no-nanny")
    second = processes.worker(address, "--name", "second", "--no-nanny")
    with Client(address) as client:
        doomed = client.submit(die_here, key="doomed-task")
        with pytest.raises(client_sdk.KilledWorker, match="doomed-task") as info:
            doomed.result(timeout=20)
        assert isinstance(info.value, client_sdk.ApportionError)
        message = str(info.value)
        assert "2 workers" in message and "first" in message and "second" in message, message
        assert doomed.status == "error"
        # It killed both workers (once each), not one twice.
        assert first.wait(10) == 1
        assert second.wait(10) == 1
        wait_for(lambda: not cluster_state(address).workers, 10, "both workers to be gone")
        processes.worker(address, "--name", "third")
        others = [client.submit(plus_one, i) for i in range(4)]
        assert client.gather(others) == [(i + 1, "third") for i in range(4)]
        assert doomed.status == "error"


# ------------------------------------------------------------ runtime capacity


def test_set_resources_raises_and_lowers_capacity_while_tasks_run(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--name", "gpu", "--resources", "GPU=1", "--nthreads", "4")
    seconds = 0.8
    marks = str(tmp_path)
    with Client(scheduler_address) as client:
        futures = [
            client.submit(touch_then_sleep, marks, f"t{i}", seconds, resources={"GPU": 1})
            for i in range(4)
        ]

        def started() -> list[int]:
            return [i for i in range(4) if (tmp_path / f"t{i}.started").exists()]

        wait_for(lambda: bool(started()), 15, "the first task to start")
        time.sleep(0.2)
        assert len(started()) == 1  # GPU=1: one at a time
        raised = client.set_resources("gpu", {"GPU": 2})
        assert raised["resources"] == {"GPU": 2}
        # A second one starts at once, well before the first ends.
        wait_for(lambda: len(started()) == 2, seconds / 2, "a second task after raising")

        def used() -> dict[str, float]:
            (info,) = client.scheduler_info()["workers"].values()
            return dict(info["used_resources"])

        # The worker started it from its queue; its report of that may still
        # be on the way (a busy worker's reports wait a moment to travel together).
        wait_for(lambda: used() == {"GPU": 2}, seconds / 4, "the scheduler to hear of the start")
        lowered = client.set_resources("gpu", {"GPU": 1})
        assert lowered["resources"] == {"GPU": 1}
        assert lowered["used_resources"] == {"GPU": 2}  # both still run
        (info,) = client.scheduler_info()["workers"].values()
        assert info["resources"] == {"GPU": 1}
        intervals = client.gather(futures)
    first_two = sorted(intervals, key=lambda iv: iv[0])[:2]
    last_two = sorted(intervals, key=lambda iv: iv[0])[2:]
    # Both that ran under GPU=2 finished; the next started only once used GPU
    # was back to 0 (so one more fits GPU=1), and the last two ran one at a time.
    assert max_overlap(first_two) == 2
    assert min(s for s, _ in last_two) >= max(e for _, e in first_two)
    assert max_overlap(last_two) == 1
    assert max_overlap(intervals) == 2
    assert_all_released(scheduler_address)
    (worker,) = cluster_state(scheduler_address).workers
    assert dict(worker.resources) == {"GPU": 1}


def test_set_resources_refuses_an_unknown_worker_and_a_bad_amount(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "gpu", "--resources", "GPU=1")
    with Client(scheduler_address) as client:
        with pytest.raises(KeyError, match="nope"):
            client.set_resources("nope", {"GPU": 2})
        with pytest.raises(ValueError, match="GPU=-1"):
            client.set_resources("gpu", {"GPU": -1})
        with pytest.raises(ValueError, match="GPU"):
            client.set_resources("gpu", {"GPU": float("nan")})
        (info,) = client.scheduler_info()["workers"].values()
        assert info["resources"] == {"GPU": 1}
        # By address works as by name.
        (address,) = client.scheduler_info()["workers"]
        assert client.set_resources(address, {"GPU": 3, "MEMORY": "1GiB"})["resources"] == {
            "GPU": 3,
            "MEMORY": 1024**3,
        }


# --------------------------------------------------------------------- explain


def test_explain_says_why_each_task_is_not_running(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--name", "w", "--resources", "GPU=1", "--nthreads", "3")
    with Client(scheduler_address) as client:
        running = client.submit(touch_then_sleep, str(tmp_path), "run", 1.5, resources={"GPU": 1})
        wait_for(lambda: (tmp_path / "run.started").exists(), 15, "the running task to start")
        quick = client.submit(plus_one, 1, key="quick")
        # w's queue (two places per thread) takes six; two more wait here.
        in_queue = [
            client.submit(timed_sleep, 0.0, resources={"GPU": 1}, key=f"in-queue-{i}")
            for i in range(6)
        ]
        q1 = client.submit(timed_sleep, 0.0, resources={"GPU": 1}, key="queued-1")
        q2 = client.submit(timed_sleep, 0.0, resources={"GPU": 1}, key="queued-2")
        never = client.submit(timed_sleep, 0.0, resources={"TPU": 1}, key="no-tpu")
        dependent = client.submit(first_of, running, key="waits")
        # Everything above reached the scheduler once the last one is known.
        wait_for(lambda: "not known" not in client.explain(dependent), 5, "the submissions")

        assert client.explain(running) == f"task {running.key!r} is running on w"
        why = client.explain(dependent)
        assert "waits for its input" in why and running.key in why, why
        why = client.explain(never)
        assert "TPU=1" in why and "the most any worker offers is TPU=0" in why, why
        why = client.explain(q2)
        assert "busy on every worker that fits it" in why and "GPU" in why, why
        assert "1 task(s) like it are ahead of it" in why, why
        assert "0 task(s) like it are ahead of it" in client.explain(q1)
        for future in in_queue:
            assert client.explain(future) == (
                f"task {future.key!r} is queued on w, to start there when its resources are free"
            )
        assert quick.result(timeout=15) == (2, "w")
        assert "has finished" in client.explain(quick)
        assert "not known" in client.explain("no-such-key")
        never.cancel()
        assert dependent.result(timeout=15) == running.result(timeout=5)[0]
        client.gather([q1, q2, *in_queue])


# ----------------------------------------------------------- no_worker_timeout


def test_no_worker_timeout_errs_a_task_no_worker_can_hold(
    processes: Processes, scheduler_with: Callable[..., str]
) -> None:
    address = scheduler_with("--no-worker-timeout", "1")
    processes.worker(address, "--name", "gpu", "--resources", "GPU=1")
    with Client(address) as client:
        began = time.monotonic()
        tpu = client.submit(timed_sleep, 0.0, resources={"TPU": 1})
        fits = client.submit(timed_sleep, 0.0, resources={"GPU": 1})
        fits.result(timeout=15)
        with pytest.raises(client_sdk.NoValidWorkerError, match="TPU") as info:
            tpu.result(timeout=10)
        waited = time.monotonic() - began
        # Ticks every 0.25 s measure the wait, so it may look a little short.
        assert 0.7 <= waited < 5, waited
        assert tpu.key in str(info.value)
        assert tpu.status == "error"
        # A task that fits still runs, after the timeout too.
        assert plus_one_result(client) == (2, "gpu")


def plus_one_result(client: Client) -> tuple[int, str]:
    result: tuple[int, str] = client.submit(plus_one, 1).result(timeout=15)
    return result


def test_no_worker_timeout_still_applies_after_an_unfitting_worker_joins(
    processes: Processes, scheduler_with: Callable[..., str]
) -> None:
    address = scheduler_with("--no-worker-timeout", "1")
    processes.worker(address, "--name", "first")
    with Client(address) as client:
        tpu = client.submit(timed_sleep, 0.0, resources={"TPU": 1})
        wait_for(lambda: "TPU" in client.explain(tpu), 5, "the task to reach the scheduler")
        processes.worker(address, "--name", "second")  # no TPU either
        with pytest.raises(client_sdk.NoValidWorkerError):
            tpu.result(timeout=3)


# ------------------------------------------------------- unknown resource names


def test_a_resource_no_worker_declares_is_warned_of_at_once(
    processes: Processes, scheduler_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="client_sdk")
    processes.worker(scheduler_address, "--name", "w", "--resources", "TPU=1", "--nthreads", "2")
    with Client(scheduler_address) as client:
        began = time.monotonic()
        slow = client.submit(timed_sleep, 1.5)
        typo = client.submit(plus_one, slow, resources={"TPUU": 1})

        def warned() -> bool:
            return any(
                r.name == "client_sdk" and r.levelno == logging.WARNING and "TPUU" in r.getMessage()
                for r in caplog.records
            )

        wait_for(warned, 1.0, "the warning naming TPUU")
        # At once: while the task still waits for its input.
        assert time.monotonic() - began < 1.2
        assert not slow.done()
        assert typo.status == "pending"
        (record,) = [r for r in caplog.records if "TPUU" in r.getMessage()]
        assert typo.key in record.getMessage()
        typo.cancel()
        wait_for(lambda: typo.status == "cancelled", 5, "the cancel")


# ------------------------------------------------------------------------ units


def test_byte_units_bound_concurrency(processes: Processes, scheduler_address: str) -> None:
    processes.worker(scheduler_address, "--resources", "MEMORY=2GiB", "--nthreads", "4")
    with Client(scheduler_address) as client:
        futures = [client.submit(timed_sleep, 0.4, resources={"MEMORY": "1GiB"}) for _ in range(6)]
        intervals = client.gather(futures)
    # Two 1 GiB tasks fit in 2 GiB at once; a third never does.
    assert max_overlap(intervals) == 2
