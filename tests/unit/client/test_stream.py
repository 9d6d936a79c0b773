"""The client's stream over time: keys released when their futures go, a
reconnect that submits again what is pending, a refused or lost scheduler,
and the goodbye on close."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest

from client_sdk import SchedulerConnectionError
from tests.helpers.stub_transport import StubStream, StubTransport, finished, resolve

from .conftest import Harness, connect


def never_run(*args: Any) -> None:
    """Submitted only: the test answers for the scheduler."""


async def test_dropping_futures_releases_their_keys_in_one_message(h: Harness) -> None:
    futures = await resolve(h.client.map(never_run, range(200)))
    keys = {f.key for f in futures}
    await h.stub.until(lambda: len(h.stub.stream.submitted()) == 200, "the submits")
    h.stub.answer(*(finished(key, 0) for key in keys))
    # A synchronous client's loop thread would take the first key at once,
    # woken by it while the others are still being dropped; held, it takes
    # them all when it next runs, as when it is busy.
    with nullcontext() if h.asynchronous else h.stub.loop_held():
        del futures
    await h.stub.until(lambda: h.stub.stream.of_kind("release"), "a release")
    (released,) = h.stub.stream.key_lists("release")
    assert sorted(released) == sorted(keys)


async def test_a_key_is_released_only_when_its_last_future_goes(h: Harness) -> None:
    first = await resolve(h.client.submit(never_run, key="shared"))
    second = await resolve(h.client.submit(never_run, key="shared"))
    await h.stub.until(lambda: h.stub.stream.submitted_keys() == ["shared"], "the submit")
    del first
    later = await resolve(h.client.submit(never_run, key="later"))
    await h.stub.until(lambda: "later" in h.stub.stream.submitted_keys(), "the next submit")
    assert second.status == later.status == "pending"
    del second
    await h.stub.until(lambda: h.stub.stream.of_kind("release"), "a release")
    assert h.stub.stream.key_lists("release") == [["shared"]]


async def test_a_key_dropped_at_once_is_released_after_its_submit(h: Harness) -> None:
    await resolve(h.client.submit(never_run, key="brief"))  # the future is dropped at once
    await h.stub.until(lambda: h.stub.stream.of_kind("release"), "a release")
    kinds = [m.WhichOneof("kind") for m in h.stub.stream.written]
    assert kinds == ["hello", "submit", "release"]
    assert h.stub.stream.key_lists("release") == [["brief"]]


def wrote_again(old: StubStream, stub: StubTransport, keys: set[str]) -> bool:
    return stub.stream is not old and keys <= set(stub.stream.submitted_keys())


async def test_a_broken_stream_is_reopened_and_the_pending_tasks_submitted_again(
    h: Harness,
) -> None:
    done = await resolve(h.client.submit(never_run, key="done"))
    p1 = await resolve(h.client.submit(never_run, 1, key="p1"))
    p2 = await resolve(h.client.submit(never_run, 2, key="p2", resources={"GPU": 1}))
    first = h.stub.stream
    await h.stub.until(lambda: len(first.submitted()) == 3, "the submits")
    h.stub.answer(finished("done", "kept"))
    assert await resolve(done.result()) == "kept"

    h.stub.break_stream()
    await h.stub.until(lambda: wrote_again(first, h.stub, {"p1", "p2"}), "a new stream")
    second = h.stub.stream
    assert len(h.stub.streams) == 2
    hello = second.written[0].hello
    assert hello.client_id == first.written[0].hello.client_id  # the same client
    assert list(hello.resume_keys) == ["done"]  # finished: only its state is asked for
    specs = {s.key: s for s in second.submitted()}
    assert specs.keys() == {"p1", "p2"}
    assert specs["p2"] == next(s for s in first.submitted() if s.key == "p2")
    assert p1.status == p2.status == "pending"

    h.stub.answer(finished("p1", 11), finished("p2", 12))
    assert await resolve(h.client.gather([done, p1, p2])) == ["kept", 11, 12]
    later = await resolve(h.client.submit(never_run, key="later"))
    await h.stub.until(lambda: "later" in second.submitted_keys(), "a submit on the new stream")
    assert later.status == "pending"


async def test_inputs_released_before_a_restart_are_submitted_again_for_what_needs_them(
    h: Harness,
) -> None:
    # bench-chaos: the scheduler was killed before its journal held a graph
    # whose inputs the client had already dropped (`del loads`): submitting
    # only the pending tasks again met MissingDependencyError.
    load = await resolve(h.client.submit(never_run, 1, key="load"))
    step = await resolve(h.client.submit(never_run, load, key="step"))
    total = await resolve(h.client.submit(never_run, step, key="total"))
    unrelated = await resolve(h.client.submit(never_run, 2, key="unrelated"))
    first = h.stub.stream
    await h.stub.until(lambda: len(first.submitted()) == 4, "the submits")
    del load, step, unrelated
    await h.stub.until(lambda: first.of_kind("release"), "the releases")

    h.stub.break_stream()
    await h.stub.until(lambda: wrote_again(first, h.stub, {"total"}), "a new stream")
    second = h.stub.stream
    # The released inputs the pending task needs, each before what needs it;
    # not the unrelated one; and released again: this client does not want them.
    assert second.submitted_keys() == ["load", "step", "total"]
    (release,) = second.of_kind("release")
    assert sorted(release.release.keys) == ["load", "step"]
    h.stub.answer(finished("total", 3))
    assert await resolve(total.result()) == 3


async def test_what_was_sent_while_the_scheduler_was_away_arrives_after_the_reconnect(
    h: Harness,
) -> None:
    keep = await resolve(h.client.submit(never_run, key="keep"))
    drop = await resolve(h.client.submit(never_run, key="drop"))
    first = h.stub.stream
    await h.stub.until(lambda: len(first.submitted()) == 2, "the submits")
    h.stub.answer(finished("keep", 1), finished("drop", 2))
    assert await resolve(h.client.gather([keep, drop])) == [1, 2]
    h.stub.reachable = False
    h.stub.break_stream()
    new = await resolve(h.client.submit(never_run, key="new"))
    del drop
    await resolve(h.client.cancel(new))
    h.stub.reachable = True
    await h.stub.until(lambda: h.stub.stream is not first, "a new stream")
    second = h.stub.stream
    await h.stub.until(lambda: second.key_lists("release") == [["drop"]], "the release")
    assert ["new"] in second.key_lists("cancel")
    assert list(second.written[0].hello.resume_keys) == ["keep"]
    assert await resolve(keep.result()) == 1


async def test_a_refused_stream_is_not_reopened_and_pending_futures_fail(h: Harness) -> None:
    done = await resolve(h.client.submit(never_run, key="done"))
    waiting = await resolve(h.client.submit(never_run, key="waiting"))
    await h.stub.until(lambda: len(h.stub.stream.submitted()) == 2, "the submits")
    h.stub.answer(finished("done", "r"))
    assert await resolve(done.result()) == "r"
    h.stub.break_stream("UNAUTHENTICATED: the token was not accepted", refused=True)
    with pytest.raises(
        SchedulerConnectionError,
        match=r"lost the scheduler at stub:1 \(UNAUTHENTICATED: the token was not accepted\)",
    ):
        await resolve(waiting.result(timeout=5))
    assert waiting.status == "error"
    assert len(h.stub.streams) == 1
    assert await resolve(done.result()) == "r"  # what came before stays


async def test_pending_futures_fail_when_the_scheduler_stays_away(mode: str) -> None:
    stub = StubTransport()
    client = await connect(stub, mode, reconnect_timeout=0.3)
    try:
        waiting = await resolve(client.submit(never_run, key="waiting"))
        await stub.until(lambda: stub.stream.submitted_keys() == ["waiting"], "the submit")
        stub.reachable = False
        stub.break_stream("UNAVAILABLE: the scheduler went away")
        with pytest.raises(SchedulerConnectionError, match="lost the scheduler at stub:1"):
            await resolve(waiting.result(timeout=5))
        assert len(stub.streams) == 1
        # Submitted once lost: failed at once.
        late = await resolve(client.submit(never_run, key="late"))
        await stub.until(lambda: late.status == "error", "the late task to fail")
        with pytest.raises(SchedulerConnectionError, match="UNAVAILABLE: the scheduler went away"):
            await resolve(late.result())
    finally:
        await resolve(client.close())
    assert stub.closed


async def test_close_sends_what_is_queued_then_goodbye_and_ends_the_stream(mode: str) -> None:
    stub = StubTransport()
    client = await connect(stub, mode)
    future = await resolve(client.submit(never_run, key="k"))
    await stub.until(lambda: stub.stream.submitted_keys() == ["k"], "the submit")
    await resolve(client.cancel(future))
    await resolve(client.close())
    kinds = [m.WhichOneof("kind") for m in stub.stream.written]
    assert kinds[0] == "hello" and kinds[-2:] == ["cancel", "goodbye"]
    assert stub.stream.done_writing_called and stub.stream.cancelled
    assert stub.closed
