"""What the client makes of the scheduler's answers: results (inline or
fetched), gather, errors of every kind, cancellation, statuses it does not
know."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from apportion_common.status import ErrorKind
from client_sdk import (
    FutureCancelledError,
    KilledWorker,
    MissingDependencyError,
    NoValidWorkerError,
    SchedulerConnectionError,
    TaskError,
)
from protos import apportion_pb2 as pb
from tests.helpers.stub_transport import (
    WORKER,
    StubTransport,
    erred,
    finished,
    pending,
    resolve,
)

from .conftest import Harness, connect


def never_run(*args: Any) -> None:
    """Submitted only: the test answers for the scheduler."""


class ShelfEmpty(Exception):
    """A task's own exception type."""


async def submitted(h: Harness, *keys: str) -> list[Any]:
    """Futures for ``keys``, once the stub has their submits."""
    futures = [await resolve(h.client.submit(never_run, key=key)) for key in keys]
    await h.stub.until(lambda: set(keys) <= set(h.stub.stream.submitted_keys()), "the submits")
    return futures


async def test_a_small_result_comes_inline_and_a_large_one_is_fetched(h: Harness) -> None:
    small, large = await submitted(h, "small", "large")
    h.stub.results[(WORKER, "large")] = b"x" * 100
    h.stub.answer(finished("small", {"n": 1}), finished("large", inline=False, nbytes=123))
    assert await resolve(small.result()) == {"n": 1}
    assert await resolve(large.result()) == b"x" * 100
    assert h.stub.fetches == [(WORKER, "large")]
    assert h.stub.fetch_sizes == [123]  # the size the scheduler told, so a large one comes striped
    assert small.status == large.status == "finished"
    assert small.done() and large.done()
    assert await resolve(small.exception()) is None


async def test_a_result_is_fetched_from_a_holder_that_has_it(h: Harness) -> None:
    (future,) = await submitted(h, "k")
    h.stub.results[(WORKER, "k")] = 42
    h.stub.answer(finished("k", inline=False, addresses=("10.0.0.2:7000", WORKER)))
    assert await resolve(future.result()) == 42
    assert h.stub.fetches == [("10.0.0.2:7000", "k"), (WORKER, "k")]


async def test_a_holder_briefly_unreachable_is_tried_again_without_news(h: Harness) -> None:
    # bench-chaos: a worker frozen then woken, its result still where the
    # scheduler says; the client's first fetch failed and no update followed.
    (future,) = await submitted(h, "k")
    h.stub.answer(finished("k", inline=False))
    reachable = threading.Timer(0.3, h.stub.results.__setitem__, ((WORKER, "k"), 42))
    reachable.start()
    try:
        assert await resolve(future.result()) == 42
    finally:
        reachable.cancel()
    assert len(h.stub.fetches) >= 2 and set(h.stub.fetches) == {(WORKER, "k")}


async def test_news_of_the_same_holder_again_during_a_fetch_is_not_missed(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench-chaos: the holder was lost and came back with the result
    # (reclaimed): pending, then finished at the same address, both while the
    # client's fetch from it was failing.
    (future,) = await submitted(h, "k")
    fetch = h.stub.fetch

    async def slow_fetch(address: str, key: str, nbytes: int = 0) -> Any:
        await asyncio.sleep(0.3)
        return await fetch(address, key, nbytes)

    monkeypatch.setattr(h.stub, "fetch", slow_fetch)

    def lost_and_back() -> None:
        h.stub.answer(pending("k"))
        h.stub.results[(WORKER, "k")] = 7
        h.stub.answer(finished("k", inline=False))

    h.stub.answer(finished("k", inline=False))
    news = threading.Timer(0.1, lost_and_back)
    news.start()
    try:
        assert await resolve(future.result(timeout=4)) == 7
    finally:
        news.cancel()


async def test_awaiting_a_future_of_an_async_client_gives_its_result() -> None:
    stub = StubTransport()
    client = await connect(stub, "async")
    try:
        h = Harness(client, stub)
        (future,) = await submitted(h, "k")
        h.stub.answer(finished("k", "value"))
        assert await future == "value"
    finally:
        await client.close()


def nested(f: dict[str, Any]) -> Any:
    """Futures in lists, tuples and dicts, several levels deep, among plain values."""
    return {
        "a": [f["k0"], (f["k1"], f["k2"]), "plain"],
        "b": {"c": [f["k3"], 7, {"d": f["k4"]}], "e": (f["k5"],)},
        "f": [[f["k6"]], f["k7"], ((f["k8"], "x"), [f["k9"]])],
    }


async def test_gather_puts_every_result_of_a_nested_structure_in_its_own_place(
    h: Harness,
) -> None:
    keys = [f"k{i}" for i in range(10)]
    futures = dict(zip(keys, await submitted(h, *keys), strict=True))
    values = {key: f"value of {key}" for key in keys}
    # Answered out of order, in several messages; some inline, some to fetch.
    fetched = {"k1", "k4", "k6", "k9"}
    for key in fetched:
        h.stub.results[(WORKER, key)] = values[key]

    def update(key: str) -> pb.TaskUpdate:
        return finished(key, values[key], inline=key not in fetched)

    h.stub.answer(update("k5"), update("k2"), update("k9"))
    h.stub.answer(update("k7"), update("k0"))
    h.stub.answer(update("k4"), update("k6"), update("k1"), update("k8"), update("k3"))

    result = await resolve(h.client.gather(nested(futures)))
    assert result == nested(values)
    # The containers keep their types.
    assert type(result["a"][1]) is tuple and type(result["b"]["e"]) is tuple
    assert type(result["f"][2][0]) is tuple and type(result["f"][2][1]) is list
    # A flat list, and a single future, too.
    flat = await resolve(h.client.gather([futures[k] for k in reversed(keys)]))
    assert flat == [values[k] for k in reversed(keys)]
    assert await resolve(h.client.gather(futures["k3"])) == values["k3"]


async def test_gather_raises_the_first_error_it_meets(h: Harness) -> None:
    ok, bad = await submitted(h, "ok", "bad")
    h.stub.answer(finished("ok", 1), erred("bad", ErrorKind.TASK, "no", "builtins.KeyError"))
    with pytest.raises(KeyError):
        await resolve(h.client.gather([ok, [bad]]))


@pytest.mark.parametrize(
    ("kind", "raised"),
    [
        (ErrorKind.KILLED_WORKER, KilledWorker),
        (ErrorKind.NO_VALID_WORKER, NoValidWorkerError),
        (ErrorKind.MISSING_DEPENDENCY, MissingDependencyError),
        (ErrorKind.SCHEDULER_CONNECTION, SchedulerConnectionError),
        (ErrorKind.INVALID_TASK, ValueError),
    ],
)
async def test_an_error_raised_by_apportion_is_its_sdk_exception(
    h: Harness, kind: ErrorKind, raised: type[Exception]
) -> None:
    (future,) = await submitted(h, "k")
    h.stub.answer(erred("k", kind, "what apportion says", type_name="Whatever"))
    with pytest.raises(raised, match="what apportion says") as caught:
        await resolve(future.result())
    assert type(caught.value) is raised
    assert future.status == "error" and future.done()
    exc = await resolve(future.exception())
    assert type(exc) is raised and str(exc) == "what apportion says"


@pytest.mark.parametrize(
    ("type_name", "exception", "raised"),
    [
        # pickled: the very exception
        (f"{__name__}.ShelfEmpty", ShelfEmpty("shelf 7 is empty"), ShelfEmpty),
        # not pickled, but its type is found by name
        ("builtins.LookupError", None, LookupError),
        # neither: a TaskError that names it
        ("nowhere.ShelfEmpty", None, TaskError),
    ],
)
async def test_a_task_s_own_error_is_raised_with_its_type_and_remote_traceback(
    h: Harness, type_name: str, exception: BaseException | None, raised: type[Exception]
) -> None:
    (future,) = await submitted(h, "k")
    h.stub.answer(erred("k", ErrorKind.TASK, "shelf 7 is empty", type_name, exception))
    with pytest.raises(raised, match="shelf 7 is empty") as caught:
        await resolve(future.result())
    assert type(caught.value) is raised
    assert any("Remote traceback" in note for note in caught.value.__notes__)
    assert future.status == "error"


async def test_an_error_kind_from_a_newer_scheduler_is_a_task_error(h: Harness) -> None:
    (future,) = await submitted(h, "k")
    update = erred("k", ErrorKind.TASK, "something new", type_name="apportion.NewError")
    update.error.kind = 99  # type: ignore[assignment]
    h.stub.answer(update)
    with pytest.raises(TaskError, match=r"apportion\.NewError: something new"):
        await resolve(future.result())


async def test_a_cancelled_future_stays_cancelled_when_a_late_finish_comes(h: Harness) -> None:
    doomed, witness = await submitted(h, "doomed", "witness")
    await resolve(doomed.cancel())
    assert doomed.status == "cancelled"  # at once: the scheduler does not answer
    assert doomed.done()
    await h.stub.until(lambda: h.stub.stream.key_lists("cancel") == [["doomed"]], "the cancel")
    # The old task's answer, sent before the scheduler read the cancel.
    h.stub.answer(finished("doomed", 1), finished("witness", 2))
    assert await resolve(witness.result()) == 2  # so the late answer was read too
    assert doomed.status == "cancelled"
    with pytest.raises(FutureCancelledError, match="'doomed' was cancelled"):
        await resolve(doomed.result())


async def test_client_cancel_takes_many_futures(h: Harness) -> None:
    futures = await submitted(h, "a", "b", "c")
    await resolve(h.client.cancel(futures[:2]))
    assert [f.status for f in futures] == ["cancelled", "cancelled", "pending"]
    await h.stub.until(lambda: h.stub.stream.key_lists("cancel") == [["a", "b"]], "the cancel")


async def test_the_client_ignores_an_update_with_an_unknown_status(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    (future,) = await submitted(h, "done")
    h.stub.answer(finished("done", "r"))
    assert await resolve(future.result()) == "r"
    # Neither an unset status nor one from a newer scheduler makes it wait again.
    for status in (pb.TASK_STATUS_UNSPECIFIED, 99):
        with caplog.at_level(logging.WARNING, "client_sdk"):
            h.stub.answer(pb.TaskUpdate(key="done", status=status))  # type: ignore[arg-type]
            await h.stub.until(lambda s=status: f"unknown status {s}" in caplog.text, "the log")
        assert future.status == "finished" and future.done()
        assert await resolve(future.result(timeout=1)) == "r"


async def test_a_result_lost_and_made_again_is_waited_for(h: Harness) -> None:
    (future,) = await submitted(h, "k")
    h.stub.answer(finished("k", "first"))
    assert await resolve(future.result()) == "first"
    h.stub.answer(pending("k"))  # its holder was lost: being made again
    await h.stub.until(lambda: future.status == "pending", "pending again")
    assert not future.done()
    h.stub.answer(finished("k", "again"))
    assert await resolve(future.result()) == "again"


@pytest.mark.parametrize(
    "reason",
    # The second as the scheduler words an unknown name (bench-chaos found
    # one warning per task for it, after a scheduler restart).
    ["no worker offers TPU", "needs TPU, which no worker seen so far declares"],
)
async def test_why_a_task_waits_is_logged_once_per_reason(
    h: Harness, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    a, b = await submitted(h, "a", "b")
    with caplog.at_level(logging.WARNING, "client_sdk"):
        h.stub.answer(pending("a", f"task 'a': {reason}"))
        h.stub.answer(pending("b", f"task 'b': {reason}"), finished("a", 1))
        assert await resolve(a.result()) == 1
    waits = [r for r in caplog.records if reason in r.getMessage()]
    assert len(waits) == 1
    assert waits[0].levelno == logging.WARNING
    assert "it waits until a worker that fits joins" in waits[0].getMessage()
    assert b.status == "pending"
