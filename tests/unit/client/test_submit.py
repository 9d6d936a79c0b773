"""What a submit sends: the spec, its options, and the futures in its
arguments as dependencies; the scheduler's calls through the transport."""

from __future__ import annotations

from typing import Any

import pytest

from apportion_common import serialize
from apportion_common.serialize import InputRef
from client_sdk import SchedulerConnectionError, annotate
from protos import apportion_pb2 as pb
from tests.helpers.stub_transport import StubTransport, resolve

from .conftest import Harness, connect


def inc(x: int) -> int:
    return x + 1


def combine(parts: list[Any], extra: dict[str, Any] | None = None) -> int:
    return 0


async def test_submit_sends_the_spec_and_the_future_is_pending_until_answered(h: Harness) -> None:
    a, b, c, d = [await resolve(h.client.submit(inc, i, key=f"in-{i}")) for i in range(4)]
    future = await resolve(
        h.client.submit(
            combine,
            [a, (b, {"x": c})],
            extra={"y": d},
            resources={"GPU": 1, "MEMORY": "2GB"},
            retries=2,
            priority=5,
            key="out",
        )
    )
    await h.stub.until(lambda: "out" in h.stub.stream.submitted_keys(), "the submit")

    (spec,) = [s for s in h.stub.stream.submitted() if s.key == "out"]
    assert dict(spec.resources) == {"GPU": 1.0, "MEMORY": 2e9}
    assert list(spec.dependencies) == ["in-0", "in-1", "in-2", "in-3"]
    assert (spec.retries, spec.priority) == (2, 5)
    fn, args, kwargs = serialize.loads(spec.payload)
    assert fn.__name__ == "combine"
    # Each future's place in the arguments holds a reference to its result.
    assert args == ([InputRef("in-0"), (InputRef("in-1"), {"x": InputRef("in-2")})],)
    assert kwargs == {"extra": {"y": InputRef("in-3")}}
    # No answer came: every future is pending.
    for f in (a, b, c, d, future):
        assert f.status == "pending"
        assert not f.done()
    with pytest.raises(TimeoutError):
        await resolve(future.result(timeout=0.05))


async def test_a_set_of_futures_are_dependencies_too(h: Harness) -> None:
    a = await resolve(h.client.submit(inc, 1, key="a"))
    await resolve(h.client.submit(combine, [frozenset({a})], key="b"))
    await h.stub.until(lambda: "b" in h.stub.stream.submitted_keys(), "the submit")
    (spec,) = [s for s in h.stub.stream.submitted() if s.key == "b"]
    assert list(spec.dependencies) == ["a"]


async def test_map_sends_its_tasks_in_one_message(h: Harness) -> None:
    futures = await resolve(h.client.map(inc, range(50), resources={"GPU": 0.5}))
    await h.stub.until(lambda: len(h.stub.stream.submitted()) == 50, "50 tasks")
    assert len(h.stub.stream.of_kind("submit")) == 1
    specs = h.stub.stream.submitted()
    assert [s.key for s in specs] == [f.key for f in futures]
    assert len({f.key for f in futures}) == 50  # a new task each
    assert all(dict(s.resources) == {"GPU": 0.5} for s in specs)
    assert [serialize.loads(s.payload)[1] for s in specs] == [(i,) for i in range(50)]


async def test_map_keys_given_as_a_prefix_or_a_list(h: Harness) -> None:
    named = await resolve(h.client.map(inc, [1, 2], key="step"))
    listed = await resolve(h.client.map(inc, [1, 2], key=["x", "y"]))
    assert [f.key for f in named] == ["step-0", "step-1"]
    assert [f.key for f in listed] == ["x", "y"]
    with pytest.raises(ValueError, match="2 keys for 3 tasks"):
        h.client.map(inc, [1, 2, 3], key=["x", "y"])


async def test_annotate_blocks_merge_and_an_explicit_resources_replaces(h: Harness) -> None:
    with annotate(resources={"GPU": 1}, priority=3), annotate(resources={"MEMORY": 2}):
        merged = await resolve(h.client.submit(inc, 1, key="merged"))
        replaced = await resolve(h.client.submit(inc, 2, key="replaced", resources={"CPU": 1}))
    plain = await resolve(h.client.submit(inc, 3, key="plain"))
    keys = {f.key for f in (merged, replaced, plain)}
    await h.stub.until(lambda: keys <= set(h.stub.stream.submitted_keys()), "the submits")
    specs = {s.key: s for s in h.stub.stream.submitted()}
    assert dict(specs["merged"].resources) == {"GPU": 1, "MEMORY": 2}
    assert specs["merged"].priority == 3
    assert dict(specs["replaced"].resources) == {"CPU": 1}
    assert dict(specs["plain"].resources) == {}
    assert specs["plain"].priority == 0


async def test_a_key_submitted_again_is_the_same_task(h: Harness) -> None:
    first = await resolve(h.client.submit(inc, 1, key="same"))
    second = await resolve(h.client.submit(inc, 1, key="same"))
    await resolve(h.client.submit(inc, 2, key="after"))
    await h.stub.until(lambda: "after" in h.stub.stream.submitted_keys(), "the submits")
    assert h.stub.stream.submitted_keys() == ["same", "after"]
    assert first.key == second.key == "same"


async def test_bad_options_are_refused_at_submit(h: Harness) -> None:
    with pytest.raises(ValueError, match="retries must be >= 0"):
        h.client.submit(inc, 1, retries=-1)
    with pytest.raises(ValueError, match="allow_other_workers=True needs workers"):
        h.client.submit(inc, 1, allow_other_workers=True)
    with pytest.raises(TypeError, match="needs a callable"):
        h.client.submit(42)  # type: ignore[arg-type]


async def test_a_future_of_another_client_is_refused(h: Harness, mode: str) -> None:
    other = await connect(StubTransport(), mode)
    try:
        theirs = await resolve(other.submit(inc, 1))
        with pytest.raises(ValueError, match="belongs to another client"):
            h.client.submit(inc, theirs)
    finally:
        await resolve(other.close())


async def test_the_scheduler_s_unary_calls_go_through_the_transport(h: Harness) -> None:
    h.stub.cluster_state.workers.add(
        name="w",
        address="10.0.0.9:7000",
        nthreads=2,
        resources={"GPU": 2},
        running=1,
        memory_limit=4_000_000_000,
        memory=120_000_000,
        spilled_bytes=5_000,
        paused=True,
    )
    h.stub.cluster_state.task_counts["running"] = 1
    assert await resolve(h.client.scheduler_info()) == {
        "address": "stub:1",
        "dashboard_address": "",
        "workers": {
            "10.0.0.9:7000": {
                "name": "w",
                "nthreads": 2,
                "resources": {"GPU": 2.0},
                "used_resources": {},
                "running": 1,
                "queued": 0,
                "draining": False,
                "resources_text": {},
                "gpus": [],
                "memory_limit": 4_000_000_000,
                "memory": 120_000_000,
                "spilled_bytes": 5_000,
                "paused": True,
            }
        },
        "tasks": {"running": 1},
    }
    entry = await resolve(h.client.set_resources("w", {"GPU": "4", "MEMORY": "64 GiB", "X": 2}))
    assert (entry["name"], entry["resources"]) == ("w", {"GPU": 4.0, "MEMORY": 64 * 2**30, "X": 2})
    (asked,) = [r for r in h.stub.requests if isinstance(r, pb.SetWorkerResourcesRequest)]
    # What was written as text goes as written, for status to show back.
    assert dict(asked.resources_text) == {"GPU": "4", "MEMORY": "64GiB"}
    future = await resolve(h.client.submit(inc, 1, key="k"))
    assert await resolve(h.client.explain(future)) == "task 'k' is waiting for the test"
    assert await resolve(h.client.explain("k")) == "task 'k' is waiting for the test"


async def test_a_refused_connect_fails_the_client_itself(mode: str) -> None:
    stub = StubTransport()
    stub.refusal = SchedulerConnectionError("the scheduler at stub:1 refused this client")
    with pytest.raises(SchedulerConnectionError, match="refused this client"):
        await connect(stub, mode)
    assert stub.closed
    assert not stub.streams
