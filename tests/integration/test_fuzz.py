"""Hypothesis throws random bytes and mutated messages at every gRPC surface.

A scheduler (the ``scheduler_server`` fixture: it checks its books after every
event) and one real in-process Worker connected to it, both on port 0, take
random bytes, byte-mutated valid messages and well-formed messages with wild
field values on the scheduler's WorkerStream, ClientStream, GetClusterState,
SetWorkerResources and ExplainTask, and on the worker's FetchResult. Every
call has a deadline.

The oracle: each status is one the protocol means (OK; INVALID_ARGUMENT naming
the field; NOT_FOUND for an unknown worker or result). UNKNOWN, an exception
nobody expected, is allowed only where gRPC itself cannot parse a unary
request's bytes, before any of our code runs. After each example the
scheduler answers health, its books validate and it logged no error; after
the last one a real task from a real Client runs on the worker and every used
resource is back to exactly zero.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion_common import serialize
from apportion_common.grpc_server import insecure_channel
from client_sdk import Client
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from scheduler_service import SchedulerServer
from tests.helpers.raw_streams import (
    CALL_TIMEOUT,
    GOODBYE,
    drain,
    raw_stream,
    send_all,
    stream_status,
)
from worker_service import Worker
from worker_service import wire as worker_wire

#: Examples per test: a few seconds in all on 2 cores. Raise it for a longer
#: hunt: APPORTION_FUZZ_EXAMPLES=2000 pytest tests/integration/test_fuzz.py
EXAMPLES = int(os.environ.get("APPORTION_FUZZ_EXAMPLES", "150"))
#: deadline is per example: each call's own is 5 s, and a busy CI machine
#: must not turn a slow example into a failure.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=20_000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
#: Stands for the real worker's name in generated requests.
REAL_WORKER = "<the real worker>"
STORED_KEY = "stored-result"

VALID_PAYLOAD = serialize.dump_call(abs, (-1,), {})

# ---------------------------------------------------------------- strategies

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
KEYS = st.one_of(st.sampled_from(["", " ", "a", "b", "k" * 1025]), TEXT)
NAMES = st.one_of(st.sampled_from(["GPU", "FUZZ", "", " ", "n" * 300]), TEXT)
AMOUNTS = st.one_of(st.floats(), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, 1e18, 1e19, 1e300]))
RESOURCES = st.dictionaries(NAMES, AMOUNTS, max_size=3)
ADDRESSES = st.one_of(
    st.sampled_from(["127.0.0.1:1", "", "host", "h:0", "[::1]:5", "[::1]", "h:99999", "a b:1"]),
    TEXT,
)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
BLOBS = st.binary(max_size=64)

REGISTER = st.builds(
    pb.RegisterWorker, name=TEXT, address=ADDRESSES, nthreads=U32, resources=RESOURCES, pid=U32
)
ERRORS = st.builds(pb.TaskError, type_name=TEXT, message=TEXT, traceback=TEXT, exception=BLOBS)


def reports(keys: st.SearchStrategy[str], run_ids: st.SearchStrategy[int]) -> Any:
    finished = st.builds(
        pb.TaskFinished,
        key=keys,
        run_id=run_ids,
        nbytes=U64,
        fetched_keys=st.lists(keys, max_size=3),
        fetched_nbytes=st.lists(U64, max_size=3),
        inline_result=BLOBS,
    )
    failed = st.builds(pb.TaskFailed, key=keys, run_id=run_ids, error=ERRORS)
    missing = st.builds(
        pb.TaskMissingInputs,
        key=keys,
        run_id=run_ids,
        inputs=st.lists(st.builds(pb.MissingInput, key=keys, address=ADDRESSES), max_size=3),
    )
    return st.builds(
        pb.WorkerReports,
        finished=st.lists(finished, max_size=3),
        failed=st.lists(failed, max_size=2),
        missing_inputs=st.lists(missing, max_size=2),
        heartbeat=st.booleans(),
    )


WORKER_MESSAGES = st.one_of(
    st.builds(pb.WorkerToScheduler, register=REGISTER),
    st.builds(pb.WorkerToScheduler, reports=reports(KEYS, st.one_of(st.integers(0, 20), U64))),
    st.just(pb.WorkerToScheduler()),
)

SPECS = st.builds(
    pb.TaskSpec,
    key=KEYS,
    payload=st.one_of(BLOBS, st.just(VALID_PAYLOAD)),
    resources=RESOURCES,
    dependencies=st.lists(KEYS, max_size=3),
    priority=I64,
    retries=st.one_of(st.integers(0, 2), U32),
    workers=st.lists(ADDRESSES, max_size=2),
    allow_other_workers=st.booleans(),
)
CLIENT_MESSAGES = st.one_of(
    st.builds(
        pb.ClientToScheduler,
        submit=st.builds(pb.SubmitTasks, tasks=st.lists(SPECS, max_size=4)),
    ),
    st.builds(pb.ClientToScheduler, cancel=st.builds(pb.KeyList, keys=st.lists(KEYS, max_size=3))),
    st.builds(pb.ClientToScheduler, release=st.builds(pb.KeyList, keys=st.lists(KEYS, max_size=3))),
    st.builds(pb.ClientToScheduler, hello=st.builds(pb.ClientHello, client_id=KEYS)),
    st.just(pb.ClientToScheduler()),
    st.just(pb.ClientToScheduler(goodbye=pb.ClientGoodbye())),
)


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy[Any]) -> bytes:
    """A valid message's bytes with a few bytes flipped, inserted, dropped or cut."""
    data = bytearray(draw(messages).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "insert" or not data:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "flip":
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)


def frames(messages: st.SearchStrategy[Any]) -> Any:
    """What one stream carries: raw bytes, mutated messages and valid ones."""
    one = st.one_of(
        st.binary(max_size=128),
        mutated(messages),
        messages.map(lambda m: m.SerializeToString()),
    )
    return st.lists(one, min_size=1, max_size=4)


# ------------------------------------------------------------------ fixtures


@dataclass
class Cluster:
    server: SchedulerServer
    worker: Worker
    channel: grpc.aio.Channel
    worker_channel: grpc.aio.Channel
    caplog: pytest.LogCaptureFixture

    async def check_alive(self) -> None:
        """After each example: both answer health; the books and the log are clean."""
        for channel in (self.channel, self.worker_channel):
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        self.server.servicer.state.validate()
        self.worker.state.validate()
        assert self.worker.broken is None
        errors = [
            r.getMessage()
            for r in self.caplog.records
            if r.levelno >= logging.ERROR and unexpected(r)
        ]
        assert not errors, errors


def unexpected(record: logging.LogRecord) -> bool:
    """An error log no bad input should cause: any from our services, and any
    exception gRPC caught escaping a handler (requests that do not parse are
    refused by apportion_common.services before gRPC would log one)."""
    return record.name.startswith(("scheduler_service", "worker_service", "grpc"))


async def real_task_runs(server: SchedulerServer, worker: Worker) -> None:
    """A real Client's task completes on the worker and every lease is returned."""
    async with insecure_channel(server.address) as channel:
        # The fuzz may have changed what the worker declares: declare GPU again.
        await pb_grpc.SchedulerStub(channel).SetWorkerResources(
            pb.SetWorkerResourcesRequest(worker=worker.name, resources={"GPU": 2}),
            timeout=CALL_TIMEOUT,
        )
    async with Client(server.address, asynchronous=True) as client:
        future = await client.submit(abs, -7, resources={"GPU": 1})
        assert await asyncio.wait_for(future.result(), 15) == 7
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        held = {
            w.name: (w.running, w.used)
            for w in server.servicer.state.snapshot().workers
            if w.running or any(w.used.values())
        }
        if not held:
            break
        assert asyncio.get_running_loop().time() < deadline, f"still held: {held}"
        await asyncio.sleep(0.05)
    server.servicer.state.validate()
    assert worker.state.ledger.used() == {}


@pytest.fixture
async def cluster(
    scheduler_server: SchedulerServer, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Cluster]:
    async with Worker(
        scheduler_server.address, nthreads=2, resources={"GPU": 2}, validate=True
    ) as worker:
        await worker.wait_registered(10)
        worker.store.put(STORED_KEY, 0, b"x" * 100)
        async with (
            insecure_channel(scheduler_server.address) as channel,
            insecure_channel(worker.address) as worker_channel,
        ):
            yield Cluster(scheduler_server, worker, channel, worker_channel, caplog)
        await real_task_runs(scheduler_server, worker)


# --------------------------------------------------------------------- tests


@FUZZ
@given(data=frames(WORKER_MESSAGES))
async def test_bytes_on_the_worker_stream(cluster: Cluster, data: list[bytes]) -> None:
    call = raw_stream(cluster.channel, "WorkerStream")
    code, details = await stream_status(call, data)
    assert code in (OK, INVALID), (code, details)
    await cluster.check_alive()


@FUZZ
@given(data=frames(CLIENT_MESSAGES))
async def test_bytes_on_the_client_stream(cluster: Cluster, data: list[bytes]) -> None:
    call = raw_stream(cluster.channel, "ClientStream")
    code, details = await stream_status(call, data)
    assert code in (OK, INVALID), (code, details)
    await cluster.check_alive()


@FUZZ
@given(hello=KEYS, messages=st.lists(CLIENT_MESSAGES, max_size=4))
async def test_client_messages_with_wild_fields(
    cluster: Cluster, hello: str, messages: list[pb.ClientToScheduler]
) -> None:
    call = pb_grpc.SchedulerStub(cluster.channel).ClientStream(timeout=CALL_TIMEOUT)
    hello_message = pb.ClientToScheduler(hello=pb.ClientHello(client_id=hello))
    code, details = await stream_status(call, [hello_message, *messages])
    assert code in (OK, INVALID), (code, details)
    if code == INVALID:
        assert details  # it names what was wrong
    await cluster.check_alive()


@FUZZ
@given(data=st.data())
async def test_reports_about_real_runs(cluster: Cluster, data: st.DataObject) -> None:
    """A worker that gets real assignments and reports on them wildly: wrong
    keys for real run ids, real keys for other runs, bad fields."""
    stub = pb_grpc.SchedulerStub(cluster.channel)
    client = stub.ClientStream(timeout=CALL_TIMEOUT)
    worker = stub.WorkerStream(timeout=CALL_TIMEOUT)
    try:
        await client.write(pb.ClientToScheduler(hello=pb.ClientHello(client_id="fuzz-client")))
        first = pb.TaskSpec(key="first", payload=VALID_PAYLOAD, resources={"FUZZ": 1})
        second = pb.TaskSpec(
            key="second", payload=VALID_PAYLOAD, resources={"FUZZ": 1}, dependencies=["first"]
        )
        await client.write(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=[first, second])))
        register = pb.RegisterWorker(name="fuzz", address="127.0.0.1:1", nthreads=2)
        register.resources["FUZZ"] = 1
        await worker.write(pb.WorkerToScheduler(register=register))
        assert (await worker.read()).HasField("registered")
        assigned = (await worker.read()).instructions.assign
        assert [a.key for a in assigned] == ["first"]
        run_id = assigned[0].run_id

        # Run ids as offsets from the real one, so that the same choices
        # replay as the same example (run ids grow from example to example).
        keys = st.one_of(st.sampled_from(["first", "second"]), KEYS)
        run_ids = st.one_of(st.integers(-1, 1).map(lambda d: run_id + d), st.just(0), U64)
        batches = data.draw(st.lists(reports(keys, run_ids), min_size=1, max_size=3))
        messages = [pb.WorkerToScheduler(reports=r) for r in batches]
        code, details = await stream_status(worker, messages)
        assert code in (OK, INVALID), (code, details)
        # A goodbye: its tasks go at once (a plain end of stream would keep
        # them for the client grace period, into the next example).
        await send_all(client, [GOODBYE])
        await drain(client)
    finally:
        # A failed example must not leave its streams (and their tasks) behind.
        worker.cancel()
        client.cancel()
    await cluster.check_alive()


UNARY = st.one_of(
    st.tuples(st.just("GetClusterState"), st.just(pb.GetClusterStateRequest())),
    st.tuples(
        st.just("SetWorkerResources"),
        st.builds(
            pb.SetWorkerResourcesRequest,
            worker=st.one_of(st.just(REAL_WORKER), KEYS),
            resources=RESOURCES,
        ),
    ),
    st.tuples(st.just("ExplainTask"), st.builds(pb.ExplainTaskRequest, key=KEYS)),
)


@FUZZ
@given(call=UNARY, how=st.sampled_from(["as is", "mutated", "random"]), noise=st.binary())
async def test_unary_calls(cluster: Cluster, call: tuple[str, Any], how: str, noise: bytes) -> None:
    method, request = call
    if isinstance(request, pb.SetWorkerResourcesRequest) and request.worker == REAL_WORKER:
        request.worker = cluster.worker.name
    raw = request.SerializeToString()
    if how == "mutated":
        raw = bytes(b ^ n for b, n in zip(raw, noise, strict=False)) + raw[len(noise) :]
    elif how == "random":
        raw = noise
    unary = cluster.channel.unary_unary(
        f"/apportion.v1.Scheduler/{method}", request_serializer=None, response_deserializer=None
    )
    try:
        await unary(raw, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in (INVALID, NOT_FOUND), (code, details)
    await cluster.check_alive()


@FUZZ
@given(
    key=st.one_of(st.just(STORED_KEY), KEYS),
    how=st.sampled_from(["as is", "random"]),
    noise=st.binary(),
)
async def test_fetch_result_on_the_worker(
    cluster: Cluster, key: str, how: str, noise: bytes
) -> None:
    raw = pb.FetchResultRequest(key=key).SerializeToString() if how == "as is" else noise
    fetch = cluster.worker_channel.unary_stream(
        "/apportion.v1.Worker/FetchResult", request_serializer=None, response_deserializer=None
    )
    call = fetch(raw, timeout=CALL_TIMEOUT)
    code, details = await drain(call)
    if code == OK:
        request = pb.FetchResultRequest.FromString(raw)
        assert request.key == STORED_KEY
    else:
        assert code in (INVALID, NOT_FOUND), (code, details)
    await cluster.check_alive()


#: Inputs are fetched only from loopback (a name would be looked up in DNS).
LOOPBACK = st.sampled_from(["127.0.0.1:1", "[::1]:2", "", "h:0", "nowhere", "127.0.0.1:99999"])
ASSIGNMENTS = st.builds(
    pb.TaskAssignment,
    key=KEYS,
    run_id=st.one_of(st.integers(0, 5), U64),
    payload=st.one_of(BLOBS, st.just(VALID_PAYLOAD)),
    resources=RESOURCES,
    inputs=st.lists(
        st.builds(pb.InputLocation, key=KEYS, addresses=st.lists(LOOPBACK, max_size=2)),
        max_size=2,
    ),
)
REFS = st.builds(pb.RunRef, key=KEYS, run_id=st.one_of(st.integers(0, 5), U64))


@pytest.fixture
async def lone_worker() -> AsyncIterator[Worker]:
    """A worker that is never connected: its instructions come from the test."""
    worker = Worker("127.0.0.1:1", nthreads=2, resources={"GPU": 2}, validate=True)
    try:
        yield worker
        assert worker.broken is None
    finally:
        await worker.close()


@FUZZ
@given(
    assign=st.lists(ASSIGNMENTS, max_size=3),
    cancel=st.lists(REFS, max_size=2),
    release=st.lists(REFS, max_size=2),
    declared=st.one_of(st.none(), RESOURCES),
)
async def test_instructions_to_a_worker(
    lone_worker: Worker,
    assign: list[pb.TaskAssignment],
    cancel: list[pb.RunRef],
    release: list[pb.RunRef],
    declared: dict[str, float] | None,
) -> None:
    """Whatever the instructions, the worker neither crashes nor over-runs its
    ledger, and every run it started ends and gives its lease back."""
    instructions = pb.WorkerInstructions(assign=assign, cancel=cancel, release=release)
    if declared is not None:
        instructions.declared.SetInParent()
        instructions.declared.amounts.update(declared)
    lone_worker.on_instructions(worker_wire.instructions_from_pb(instructions))
    lone_worker.state.validate()
    await asyncio.wait_for(
        asyncio.gather(*lone_worker._running.values(), return_exceptions=True), CALL_TIMEOUT
    )
    assert not lone_worker._running
    assert lone_worker.state.ledger.held == {}
    # Every report it would send back names a usable key and run.
    for failed in lone_worker._link.reports.failed:
        assert 0 < len(failed.key) <= 1024 and failed.run_id >= 1
    lone_worker._link.reports = type(lone_worker._link.reports)()
