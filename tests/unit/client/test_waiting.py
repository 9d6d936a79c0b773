"""Futures before the end, and the toolkit that waits on many: statuses from
the moment submit returns, add_done_callback, wait, as_completed, progress,
fire_and_forget, wait_for_workers; over a stub transport, sync and async."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from rich.console import Console

from apportion_common.status import ErrorKind
from client_sdk import (
    Client,
    SchedulerConnectionError,
    as_completed,
    fire_and_forget,
    progress,
    wait,
)
from protos import apportion_pb2 as pb
from tests.helpers.stub_transport import (
    ADDRESS,
    StubTransport,
    erred,
    finished,
    resolve,
)

from .conftest import Harness, connect


def never_run(*args: Any, **kwargs: Any) -> None:
    """Submitted only: the test answers for the scheduler."""


async def submit_all(h: Harness, *keys: str) -> list[Any]:
    futures = [await resolve(h.client.submit(never_run, key=k)) for k in keys]
    await h.stub.until(lambda: set(keys) <= set(h.stub.stream.submitted_keys()), "the submits")
    return futures


# ------------------------------------------------------------ statuses


def test_a_future_is_pending_from_the_moment_submit_returns() -> None:
    """Before the client's loop has even taken the submit (its loop thread is
    held here), the future is pending, not done: a `while not f.done()` loop
    waits for the task."""
    stub = StubTransport()
    client = Client(ADDRESS, _transport=stub)
    try:
        with stub.loop_held():
            future = client.submit(never_run, key="early")
            assert future.status == "pending" and not future.done()
            many = client.map(never_run, range(50))
            assert {f.status for f in many} == {"pending"}
            assert not any(f.done() for f in many)
        stub.answer(finished("early", 7))
        assert future.result(timeout=5) == 7
        assert future.status == "finished" and future.done()
    finally:
        client.close()


async def test_each_way_a_task_ends_makes_its_future_done(h: Harness) -> None:
    ok, bad, gone, lost = await submit_all(h, "ok", "bad", "gone", "lost")
    assert not any(f.done() for f in (ok, bad, gone, lost))
    h.stub.answer(finished("ok", 1), erred("bad", ErrorKind.TASK), finished("lost", 2))
    await resolve(gone.cancel())
    # The scheduler forgot a task this client saw finish (a restart without a
    # state directory): its result cannot be made again.
    h.stub.answer(erred("lost", ErrorKind.SCHEDULER_CONNECTION, "no longer known"))
    await h.stub.until(lambda: lost.status == "lost", "lost")
    assert [f.status for f in (ok, bad, gone, lost)] == ["finished", "error", "cancelled", "lost"]
    assert all(f.done() for f in (ok, bad, gone, lost))
    with pytest.raises(SchedulerConnectionError, match="result of task 'lost' is lost"):
        await resolve(lost.result(timeout=5))


async def test_a_done_callback_is_called_once_with_the_future(h: Harness) -> None:
    (f,) = await submit_all(h, "f")
    seen: list[Any] = []
    lock = threading.Lock()

    def record(future: Any) -> None:
        with lock:
            seen.append(future)

    f.add_done_callback(record)
    await h.stub.until(lambda: True)
    assert seen == []
    h.stub.answer(finished("f", 1))
    await h.stub.until(lambda: len(seen) == 1, "the callback")
    f.add_done_callback(record)  # already done: called at once (soon)
    await h.stub.until(lambda: len(seen) == 2, "the second callback")
    h.stub.answer(finished("f", 1))  # a repeated answer calls nothing again
    await h.stub.until(lambda: f.status == "finished")
    assert seen == [f, f]


async def test_a_failing_callback_breaks_nothing(h: Harness) -> None:
    (f,) = await submit_all(h, "f")
    called = threading.Event()

    def boom(_: Any) -> None:
        called.set()
        raise RuntimeError("a bug in the callback")

    f.add_done_callback(boom)
    h.stub.answer(finished("f", 3))
    await h.stub.until(called.is_set, "the callback")
    assert await resolve(f.result(timeout=5)) == 3


# ---------------------------------------------------------------- wait


async def test_wait_for_all_raises_timeout_then_returns_done_and_not_done(h: Harness) -> None:
    a, b, c = await submit_all(h, "a", "b", "c")
    h.stub.answer(finished("a", 1), finished("b", 2))
    with pytest.raises(TimeoutError):
        await resolve(wait([a, b, c], timeout=0.1))
    h.stub.answer(finished("c", 3))
    done, not_done = await resolve(wait([a, b, c], timeout=5))
    assert done == {a, b, c} and not_done == set()


async def test_wait_for_the_first_completed(h: Harness) -> None:
    a, b = await submit_all(h, "a", "b")
    h.stub.answer(finished("b", 2))
    result = await resolve(wait([a, b], timeout=5, return_when="FIRST_COMPLETED"))
    assert result.done == {b} and result.not_done == {a}


async def test_wait_for_the_first_exception(h: Harness) -> None:
    a, b, c = await submit_all(h, "a", "b", "c")
    h.stub.answer(finished("a", 1))
    with pytest.raises(TimeoutError):  # a finished, but raised nothing
        await resolve(wait([a, b, c], timeout=0.1, return_when="FIRST_EXCEPTION"))
    h.stub.answer(erred("c", ErrorKind.TASK))
    done, not_done = await resolve(wait([a, b, c], timeout=5, return_when="FIRST_EXCEPTION"))
    assert done == {a, c} and not_done == {b}


async def test_wrong_uses_of_wait_are_refused_by_name(h: Harness) -> None:
    (a,) = await submit_all(h, "a")
    with pytest.raises(ValueError, match="return_when must be one of ALL_COMPLETED"):
        wait([a], return_when="SOMETIME")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected Futures, got a int"):
        wait([a, 3])  # type: ignore[list-item]
    other = await connect(StubTransport(), "async" if h.asynchronous else "sync")
    try:
        b = await resolve(other.submit(never_run, key="b"))
        with pytest.raises(ValueError, match="futures of one client"):
            wait([a, b])
    finally:
        await resolve(other.close())


# -------------------------------------------------------- as_completed


async def collect(h: Harness, iterator: as_completed) -> list[Any]:
    if h.asynchronous:
        return [item async for item in iterator]
    return list(iterator)


async def test_as_completed_yields_in_the_order_tasks_end(h: Harness) -> None:
    a, b, c = await submit_all(h, "a", "b", "c")
    iterator = as_completed([a, b, c])
    for key in ("b", "c", "a"):
        h.stub.answer(finished(key, key.upper()))
    assert await collect(h, iterator) == [b, c, a]
    # Futures already done when added come in the order they were given.
    assert await collect(h, as_completed([c, a, b])) == [c, a, b]


async def test_as_completed_with_results_and_errors(h: Harness) -> None:
    a, b = await submit_all(h, "a", "b")
    h.stub.answer(finished("a", 10))
    h.stub.answer(erred("b", ErrorKind.TASK, exception=KeyError("missing")))
    pairs = await collect(h, as_completed([a, b], with_results=True, raise_errors=False))
    assert pairs[0] == (a, 10)
    assert pairs[1][0] is b and isinstance(pairs[1][1], KeyError)
    with pytest.raises(KeyError):
        await collect(h, as_completed([b], with_results=True))


async def test_a_key_done_before_another_is_called_back_first() -> None:
    """The core calls back a key already done at once: were it only "soon", a
    key ending meanwhile would come first, and as_completed would yield out
    of the order the tasks ended in."""
    stub = StubTransport()
    client = await connect(stub, "async")
    try:
        a, b = [await client.submit(never_run, key=k) for k in ("a", "b")]
        stub.answer(finished("a", 1))
        await stub.until(lambda: a.done(), "a to end")
        order: list[str] = []
        client.core.when_done("a", order.append)
        assert order == ["a"]
        client.core.when_done("b", order.append)
        stub.answer(finished("b", 2))
        await stub.until(lambda: b.done(), "b to end")
        assert order == ["a", "b"]
    finally:
        await client.close()


async def test_as_completed_takes_futures_added_while_it_runs(h: Harness) -> None:
    a, b = await submit_all(h, "a", "b")
    iterator = as_completed([a])
    assert iterator.count() == 1 and not iterator.is_empty()
    h.stub.answer(finished("a", 1))
    seen = []
    if h.asynchronous:
        async for f in iterator:
            seen.append(f)
            if f is a:
                iterator.add(b)
                h.stub.answer(finished("b", 2))
    else:
        for f in iterator:
            seen.append(f)
            if f is a:
                iterator.add(b)
                h.stub.answer(finished("b", 2))
    assert seen == [a, b] and iterator.is_empty() and iterator.count() == 0


# ------------------------------------------- progress, fire_and_forget


async def test_progress_draws_a_bar_until_every_task_is_done(h: Harness) -> None:
    futures = await submit_all(h, "p0", "p1", "p2")
    h.stub.answer(finished("p0", 0), finished("p1", 1), erred("p2", ErrorKind.TASK))
    out = io.StringIO()
    await resolve(progress(futures, console=Console(file=out, width=120)))
    text = out.getvalue()
    assert "3/3" in text and "1 erred" in text, text


async def test_fire_and_forget_tells_the_scheduler_after_the_submit(h: Harness) -> None:
    (f,) = await submit_all(h, "fire")
    fire_and_forget(f)
    await h.stub.until(lambda: h.stub.stream.key_lists("fire_and_forget") == [["fire"]])
    kinds = [m.WhichOneof("kind") for m in h.stub.stream.written]
    assert kinds.index("submit") < kinds.index("fire_and_forget")


# -------------------------------------------------------- the client's


async def test_wait_for_workers(h: Harness) -> None:
    with pytest.raises(TimeoutError, match=r"2 worker\(s\) did not join within 0.2s \(0 did\)"):
        await resolve(h.client.wait_for_workers(2, timeout=0.2))
    h.stub.cluster_state.workers.extend([pb.WorkerInfo(name="a"), pb.WorkerInfo(name="b")])
    await resolve(h.client.wait_for_workers(2, timeout=5))


async def test_a_pure_call_names_its_task_after_the_call(h: Harness) -> None:
    one = await resolve(h.client.submit(never_run, 1, x=2, pure=True))
    same = await resolve(h.client.submit(never_run, 1, x=2, pure=True))
    other = await resolve(h.client.submit(never_run, 1, x=3, pure=True))
    fresh = await resolve(h.client.submit(never_run, 1, x=2))
    assert one.key == same.key != other.key and fresh.key != one.key
    assert one.key.startswith("never_run-")
    await h.stub.until(lambda: other.key in h.stub.stream.submitted_keys())
    from apportion_common import serialize

    (spec,) = [s for s in h.stub.stream.submitted() if s.key == other.key]
    assert serialize.loads(spec.payload)[2] == {"x": 3}  # pure is not passed on


def test_a_tcp_address_is_the_dask_habit() -> None:
    stub = StubTransport()
    client = Client("tcp://stub:1", _transport=stub)
    try:
        assert client.address == "stub:1"
    finally:
        client.close()
    with pytest.raises(ValueError, match="tls=TLS"):
        Client("tls://stub:1", _transport=StubTransport())
