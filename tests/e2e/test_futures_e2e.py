"""The futures a Dask user reaches for, on real processes: a future's status
before the end, add_done_callback, wait, as_completed, progress,
fire_and_forget, wait_for_workers, pure keys, tcp:// addresses, and
Client() with no address."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from client_sdk import Client, as_completed, progress, wait
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for


def nap(seconds: float, value: int = 0) -> int:
    time.sleep(seconds)
    return value


def fail_after(seconds: float) -> None:
    time.sleep(seconds)
    raise ValueError("on purpose")


@pytest.fixture
def address(processes: Processes, scheduler_address: str) -> str:
    processes.worker(scheduler_address, "--nthreads", "4")
    return scheduler_address


def test_a_future_is_pending_until_its_task_ends(address: str) -> None:
    with Client(address) as client:
        futures = [client.submit(nap, 0.3, i) for i in range(50)]
        # Straight after submit, before the scheduler has answered.
        assert {f.status for f in futures} == {"pending"}
        assert not any(f.done() for f in futures)
        loops = 0
        while not futures[0].done():  # ends when the task does, not at once
            loops += 1
            time.sleep(0.01)
        assert loops > 5 and futures[0].status == "finished"
        erred = client.submit(fail_after, 0.2)
        assert erred.status == "pending"
        assert isinstance(erred.exception(timeout=10), ValueError)
        assert erred.status == "error" and erred.done()
        slow = client.submit(nap, 2)
        slow.cancel()
        assert slow.status == "cancelled" and slow.done()
    assert_all_released(address)


def test_callbacks_wait_and_as_completed(address: str) -> None:
    with Client(address) as client:
        called = threading.Event()
        seen: list[str] = []
        fast = client.submit(nap, 0.1, 1)
        fast.add_done_callback(lambda f: (seen.append(f.status), called.set()))
        assert called.wait(10) and seen == ["finished"]

        futures = [client.submit(nap, s, i) for i, s in enumerate([0.9, 0.1, 0.5])]
        done, not_done = wait(futures, return_when="FIRST_COMPLETED", timeout=10)
        assert done == {futures[1]} and not_done == {futures[0], futures[2]}
        with pytest.raises(TimeoutError):
            wait(futures, timeout=0.01)
        order = [f.result() for f in as_completed(futures)]
        assert order[-1] == 0  # the slowest comes last
        assert sorted(order) == [0, 1, 2]
        pairs = list(
            as_completed([client.submit(fail_after, 0.1)], raise_errors=False, with_results=True)
        )
        assert isinstance(pairs[0][1], ValueError)
        first_error = wait(
            [client.submit(nap, 5), client.submit(fail_after, 0.1)],
            return_when="FIRST_EXCEPTION",
            timeout=10,
        )
        assert len(first_error.done) == 1 and len(first_error.not_done) == 1
    assert_all_released(address)


def test_progress_draws_until_all_are_done(address: str) -> None:
    with Client(address) as client:
        futures = client.map(nap, [0.05] * 20, range(20))
        out = io.StringIO()
        progress(futures, console=Console(file=out, width=120))
        assert all(f.done() for f in futures)
        assert "20/20" in out.getvalue()


async def test_the_async_client_has_the_same_toolkit(address: str) -> None:
    async with Client(address, asynchronous=True) as client:
        futures = [await client.submit(nap, s, i) for i, s in enumerate([0.4, 0.1])]
        assert futures[0].status == "pending" and not futures[0].done()
        done, _ = await wait(futures, return_when="FIRST_COMPLETED", timeout=10)
        assert done == {futures[1]}
        order = [f.key async for f in as_completed(futures)]
        assert order == [futures[1].key, futures[0].key]
        await client.wait_for_workers(1, timeout=5)


def test_wait_for_workers_and_addresses_dask_users_type(
    processes: Processes, scheduler_address: str
) -> None:
    with Client(f"tcp://{scheduler_address}") as client:
        with pytest.raises(TimeoutError, match="1 worker"):
            client.wait_for_workers(1, timeout=0.3)
        processes.worker(scheduler_address, wait=False)
        client.wait_for_workers(1, timeout=30)
        assert len(client.scheduler_info()["workers"]) == 1
        same = [client.submit(nap, 0, 7, pure=True) for _ in range(2)]
        assert same[0].key == same[1].key and same[0].result(timeout=10) == 7
        other = client.submit(nap, 0, 7)
        assert other.key != same[0].key


TOUCH = """
import sys, time
from pathlib import Path
from client_sdk import Client, fire_and_forget

def touch_later(path, seconds):
    time.sleep(seconds)
    Path(path).write_text("done")

client = Client(sys.argv[1])
fire_and_forget(client.submit(touch_later, sys.argv[2], 1.0))
client.close()  # goodbye at once: the task must run to the end regardless
"""


def test_fire_and_forget_runs_to_the_end_after_the_client_closed(
    processes: Processes, tmp_path: Path
) -> None:
    # A short grace: the forgotten task outlives it, and the wait for "no task" is short.
    address = processes.scheduler("--client-grace", "0.5")
    processes.worker(address, "--nthreads", "4")
    marker = tmp_path / "marker"
    done = subprocess.run(
        [sys.executable, "-c", TOUCH, address, str(marker)], timeout=60, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    wait_for(marker.exists, 20, "the forgotten task to run")
    # And then nothing is left: its result was not wanted.
    wait_for(lambda: sum(cluster_state(address).task_counts.values()) == 0, 10, "no task")


def test_a_client_with_no_address_starts_its_own_cluster() -> None:
    with Client() as client:
        assert client.cluster is not None
        assert client.submit(nap, 0, 5).result(timeout=30) == 5
        cluster = client.cluster
    assert all(p.poll() is not None for p in [cluster.scheduler, *cluster.workers])


def test_the_cli_takes_a_tcp_address(address: str) -> None:
    from tests.helpers.processes import APPORTION

    done = subprocess.run(
        [APPORTION, "status", f"tcp://{address}", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert address in done.stdout
