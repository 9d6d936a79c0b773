"""Errors, cancellation and a worker killed mid-run, on real processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import client_sdk
from apportion_common.serialize import Frames
from client_sdk import Client, get_task_context
from client_sdk._transport import GrpcTransport, SchedulerStream
from protos import apportion_pb2 as pb
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for
from tests.helpers.tasks import timed_sleep, touch_then_sleep
from worker_service.worker import INLINE_RESULT_BYTES


class InventoryError(Exception):
    """A user's own exception type, defined in the module that submits."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.code))


def raise_custom(code: int) -> None:
    raise InventoryError(f"shelf {code} is empty", code)


def raise_value_error(text: str) -> int:
    return int(text)  # ValueError: invalid literal for int()


def double_slowly(x: int, seconds: float) -> tuple[int, str]:
    time.sleep(seconds)
    return 2 * x, get_task_context().worker_name


def double_with_padding(x: int) -> tuple[int, str, bytes]:
    """Too large to travel inline with the report: the client must fetch it."""
    return 2 * x, get_task_context().worker_name, b"x" * (INLINE_RESULT_BYTES + 1)


def _held(address: str, resource: str) -> float:
    return sum(w.used_resources.get(resource, 0) for w in cluster_state(address).workers)


def test_errors_keep_their_type_and_remote_traceback(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "A=1", "--nthreads", "2")
    with Client(scheduler_address) as client:
        custom = client.submit(raise_custom, 42, resources={"A": 1})
        builtin = client.submit(raise_value_error, "forty-two", resources={"A": 1})

        with pytest.raises(InventoryError, match="shelf 42 is empty") as info:
            custom.result(timeout=15)
        assert info.value.code == 42
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "raise_custom" in notes and "Traceback" in notes
        assert custom.status == "error"
        assert isinstance(custom.exception(timeout=5), InventoryError)

        with pytest.raises(ValueError, match="forty-two") as vinfo:
            builtin.result(timeout=15)
        assert type(vinfo.value) is ValueError
        notes = "\n".join(getattr(vinfo.value, "__notes__", []))
        assert "raise_value_error" in notes and "invalid literal" in notes
        assert builtin.status == "error"
        assert_all_released(scheduler_address)


def test_cancel_a_pending_task(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--resources", "A=1", "--nthreads", "2")
    with Client(scheduler_address) as client:
        blocker = client.submit(touch_then_sleep, str(tmp_path), "blocker", 1.0, resources={"A": 1})
        wait_for(lambda: (tmp_path / "blocker.started").exists(), 15, "the blocker to start")
        pending = client.submit(touch_then_sleep, str(tmp_path), "pending", 0.0, resources={"A": 1})
        time.sleep(0.2)
        assert pending.status == "pending"
        pending.cancel()
        wait_for(lambda: pending.status == "cancelled", 5, "the cancel")
        assert pending.done()
        with pytest.raises(client_sdk.FutureCancelledError) as info:
            pending.result(timeout=5)
        assert isinstance(info.value, concurrent.futures.CancelledError)
        blocker.result(timeout=15)
        # A=1 is free again and nothing else was queued: the cancelled task never ran.
        time.sleep(0.3)
        assert not (tmp_path / "pending.started").exists()
        assert pending.status == "cancelled"


def test_cancel_a_running_task_holds_resources_until_its_code_returns(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--resources", "A=1", "--nthreads", "2")
    with Client(scheduler_address) as client:
        running = client.submit(touch_then_sleep, str(tmp_path), "running", 1.5, resources={"A": 1})
        wait_for(lambda: (tmp_path / "running.started").exists(), 15, "the task to start")
        running.cancel()
        wait_for(lambda: running.status == "cancelled", 5, "the cancel")
        with pytest.raises(client_sdk.FutureCancelledError):
            running.result(timeout=5)
        # The task's code still runs in its thread: its A=1 stays held.
        time.sleep(0.3)
        assert not (tmp_path / "running.done").exists()
        assert _held(scheduler_address, "A") == 1
        # A task that needs A=1 must wait for the cancelled code to return.
        after = client.submit(timed_sleep, 0.0, resources={"A": 1})
        start, _ = after.result(timeout=15)
        ended = float((tmp_path / "running.done").read_text())
        assert start >= ended
        assert_all_released(scheduler_address)


def test_worker_killed_mid_run_its_tasks_finish_on_the_other(
    processes: Processes, scheduler_address: str
) -> None:
    doomed = processes.worker(scheduler_address, "--nthreads", "4", "--name", "doomed")
    with Client(scheduler_address) as client:
        # A finished result that lives only on the doomed worker (too large
        # to have come inline: the client must fetch it from a holder).
        early = client.submit(double_with_padding, 50)
        assert early.result(timeout=15)[:2] == (100, "doomed")
        processes.worker(scheduler_address, "--nthreads", "4", "--name", "survivor")
        futures = [client.submit(double_slowly, i, 1.0) for i in range(8)]

        def doomed_is_busy() -> bool:
            return any(
                w.name == "doomed" and w.running >= 3
                for w in cluster_state(scheduler_address).workers
            )

        wait_for(doomed_is_busy, 15, "tasks running on the doomed worker")
        os.kill(doomed.pid, signal.SIGKILL)
        assert doomed.wait(5) == -signal.SIGKILL
        # The lost result is made again on the survivor.
        assert early.result(timeout=15)[:2] == (100, "survivor")
        results = client.gather(futures)
    assert [r for r, _ in results] == [2 * i for i in range(8)]
    # Every result the client read was made (or remade) by the survivor.
    assert {w for _, w in results} == {"survivor"}
    names = [w.name for w in cluster_state(scheduler_address).workers]
    assert names == ["survivor"]


def fail_first_time(marker: str) -> str:
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise InventoryError("first try fails", 1)
    return "second try"


def test_retries_run_a_failed_task_again(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--resources", "A=1")
    with Client(scheduler_address) as client:
        no_retry = client.submit(fail_first_time, str(tmp_path / "a"), resources={"A": 1})
        with pytest.raises(InventoryError):
            no_retry.result(timeout=15)
        retried = client.submit(fail_first_time, str(tmp_path / "b"), retries=1, resources={"A": 1})
        assert retried.result(timeout=15) == "second try"


def test_an_error_flows_to_dependents_and_cancel_flows_to_dependents(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--resources", "A=1", "--nthreads", "2")
    with Client(scheduler_address) as client:
        bad = client.submit(raise_custom, 7)
        downstream = client.submit(double_slowly, bad, 0.0)
        with pytest.raises(InventoryError, match="shelf 7"):
            downstream.result(timeout=15)
        assert downstream.status == "error"

        blocker = client.submit(touch_then_sleep, str(tmp_path), "blocker", 0.5, resources={"A": 1})
        upstream = client.submit(double_slowly, 1, 0.0, resources={"A": 1})
        dependent = client.submit(double_slowly, upstream, 0.0)
        upstream.cancel()
        wait_for(lambda: dependent.status == "cancelled", 5, "the dependent to be cancelled")
        with pytest.raises(client_sdk.FutureCancelledError):
            dependent.result(timeout=5)
        blocker.result(timeout=15)


class HoldingBackFetches(GrpcTransport):
    """The client's real transport, except that a fetch from ``held`` waits
    until the scheduler has told the client of another holder of the key."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.held = ""
        self.fetching = threading.Event()
        self.moved = asyncio.Event()
        #: the holders of each finished key, as the scheduler last said
        self.holders: dict[str, tuple[str, ...]] = {}

    def open_stream(self) -> SchedulerStream:
        return _NotingHolders(super().open_stream(), self)

    def finished(self, key: str, addresses: tuple[str, ...]) -> None:
        self.holders[key] = addresses
        if self.held and addresses != (self.held,):
            self.moved.set()

    async def fetch(self, address: str, key: str, nbytes: int = 0) -> Frames:
        if address == self.held:
            self.fetching.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.moved.wait(), 10)
        return await super().fetch(address, key, nbytes)


class _NotingHolders:
    """A stream that tells its transport where each finished result lives."""

    def __init__(self, stream: SchedulerStream, transport: HoldingBackFetches) -> None:
        self._stream = stream
        self._transport = transport

    async def write(self, message: pb.ClientToScheduler) -> None:
        await self._stream.write(message)

    async def read(self) -> pb.SchedulerToClient | None:
        msg = await self._stream.read()
        for update in msg.updates if msg is not None else ():
            if update.status == pb.TASK_STATUS_FINISHED:
                self._transport.finished(update.key, tuple(update.addresses))
        return msg

    async def done_writing(self) -> None:
        await self._stream.done_writing()

    def cancel(self) -> None:
        self._stream.cancel()


def test_result_is_found_when_the_recompute_lands_during_a_failed_fetch(
    processes: Processes, scheduler_address: str
) -> None:
    """A race in Future.result(): the client is fetching a result from its only
    holder when that worker dies; before the fetch fails, the scheduler has
    recomputed the result elsewhere and told the client. The client must read
    it from the new holder, not wait for a change that already came. (The
    fetch is held back by the client's transport to make the race certain.)
    """
    doomed = processes.worker(scheduler_address, "--name", "doomed")
    transport = HoldingBackFetches(scheduler_address)
    with Client(scheduler_address, _transport=transport) as client:
        early = client.submit(double_with_padding, 21)
        assert early.result(timeout=15)[:2] == (42, "doomed")
        (transport.held,) = transport.holders[early.key]
        processes.worker(scheduler_address, "--name", "survivor")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(early.result, 10)
            assert transport.fetching.wait(10)
            os.kill(doomed.pid, signal.SIGKILL)
            assert result.result(timeout=20)[:2] == (42, "survivor")


def append_line(path: str, value: int) -> int:
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def test_a_cancelled_key_submitted_again_makes_a_new_task(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--nthreads", "1")
    log = str(tmp_path / "log")
    with Client(scheduler_address) as client:
        blocker = client.submit(timed_sleep, 0.5)
        # The cancelled future is still held when the key is submitted again.
        first = client.submit(append_line, log, 1, key="again")
        first.cancel()
        second = client.submit(append_line, log, 2, key="again")
        # The cancelled future is dropped first; the scheduler's answer to the
        # cancel must not cancel the new task under the same key.
        third = client.submit(append_line, log, 3, key="later")
        third.cancel()
        del third
        fourth = client.submit(append_line, log, 4, key="later")
        assert blocker.status == "pending"  # so nothing above could have run yet
        assert second.result(timeout=15) == 2
        assert fourth.result(timeout=15) == 4
    assert Path(log).read_text().split() == ["2", "4"]
