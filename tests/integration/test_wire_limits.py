"""What the fuzz found, and the wire's limits, as plain regression tests: a
bad report, stream message or unary field is refused naming what was wrong,
only the offending stream closes, an oversize message is refused, and the
scheduler and the worker carry on."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apportion_common import serialize
from apportion_common.grpc_server import insecure_channel
from client_sdk import Client
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from scheduler_service import SchedulerServer
from tests.helpers.raw_streams import CALL_TIMEOUT, drain, raw_stream, stream_status
from worker_service import Worker
from worker_service import wire as worker_wire

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
VALID_PAYLOAD = serialize.dump_call(abs, (-1,), {})


_names = itertools.count(1)  # worker names are unique among connected workers


async def register_worker(stub: pb_grpc.SchedulerStub, resources: dict[str, float]) -> Any:
    call = stub.WorkerStream(timeout=CALL_TIMEOUT)
    register = pb.RegisterWorker(name=f"raw-{next(_names)}", address="127.0.0.1:1", nthreads=2)
    register.resources.update(resources)
    await call.write(pb.WorkerToScheduler(register=register))
    assert (await call.read()).HasField("registered")
    return call


async def test_a_report_naming_another_tasks_run_closes_the_stream(
    scheduler_server: SchedulerServer,
) -> None:
    """Found by the fuzz: a report for run R under the key of another task
    ended R's lease while R's task stayed processing, with no lease (the books
    broke). Now the run must be of the task the report names."""
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        client = stub.ClientStream(timeout=CALL_TIMEOUT)
        await client.write(pb.ClientToScheduler(hello=pb.ClientHello(client_id="c")))
        specs = [
            pb.TaskSpec(key=k, payload=VALID_PAYLOAD, resources={"FUZZ": 1}) for k in ("a", "b")
        ]
        await client.write(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=specs)))
        worker = await register_worker(stub, {"FUZZ": 1})
        (run,) = (await worker.read()).instructions.assign
        other = "b" if run.key == "a" else "a"
        finished = pb.TaskFinished(key=other, run_id=run.run_id, nbytes=1)
        await worker.write(pb.WorkerToScheduler(reports=pb.WorkerReports(finished=[finished])))
        code, details = await drain(worker)
        assert code == INVALID
        assert f"run {run.run_id} of task {other!r}" in details and repr(run.key) in details
        scheduler_server.servicer.state.validate()
        # The stream is gone, so is its worker; its run goes back to waiting.
        assert scheduler_server.servicer.state.tasks[run.key].state != "processing"
        client.cancel()


@pytest.mark.parametrize(
    ("finished", "detail"),
    [
        (pb.TaskFinished(key="a", run_id=1, fetched_keys=["x"]), "fetched_nbytes"),
        (pb.TaskFinished(key="a", run_id=0), "run_id"),
        (pb.TaskFinished(key="", run_id=1), "key"),
        (pb.TaskFinished(key="a", run_id=1, inline_result=b"x" * (2 << 20)), "inline_result"),
        (pb.TaskFinished(key="a", run_id=1, duration_s=float("nan")), "duration_s"),
        (pb.TaskFinished(key="a", run_id=1, duration_s=-1.0), "duration_s"),
        (
            pb.TaskFinished(key="a", run_id=1, fetched_keys=["a"], fetched_nbytes=[1]),
            "the finished task itself",
        ),
    ],
)
async def test_a_bad_report_closes_that_stream_alone(
    scheduler_server: SchedulerServer, finished: pb.TaskFinished, detail: str
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        bystander = await register_worker(stub, {})
        worker = await register_worker(stub, {})
        await worker.write(pb.WorkerToScheduler(reports=pb.WorkerReports(finished=[finished])))
        code, details = await drain(worker)
        assert code == INVALID
        assert details.startswith("WorkerReports.finished[0]") and detail in details
        # The scheduler and the other worker's stream carry on.
        state = await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=CALL_TIMEOUT)
        assert len(state.workers) == 1
        beat = pb.WorkerToScheduler(reports=pb.WorkerReports(heartbeat=True))
        await bystander.write(beat)
        bystander.cancel()


@pytest.mark.parametrize(
    ("method", "frames", "detail"),
    [
        ("WorkerStream", [b"\xff\xff\xff\x00"], "could not be parsed"),
        (
            "WorkerStream",
            [
                pb.WorkerToScheduler(
                    register=pb.RegisterWorker(address="127.0.0.1:1", nthreads=1)
                ).SerializeToString(),
                b"\xff\xff\xff\x00",
            ],
            "could not be parsed",
        ),
        (
            "WorkerStream",
            [
                pb.WorkerToScheduler(
                    register=pb.RegisterWorker(address="127.0.0.1:1", nthreads=1)
                ).SerializeToString(),
                b"",
            ],
            "WorkerToScheduler.kind",
        ),
        (
            "WorkerStream",
            [pb.WorkerToScheduler(register=pb.RegisterWorker(address="no-port", nthreads=1))],
            "address",
        ),
        ("ClientStream", [b"\xff\xff\xff\x00"], "could not be parsed"),
        ("ClientStream", [pb.ClientToScheduler(hello=pb.ClientHello())], "client_id"),
        (
            "ClientStream",
            [pb.ClientToScheduler(hello=pb.ClientHello(client_id="c")).SerializeToString(), b""],
            "ClientToScheduler.kind",
        ),
        (
            "ClientStream",
            [
                pb.ClientToScheduler(hello=pb.ClientHello(client_id="c")),
                pb.ClientToScheduler(cancel=pb.KeyList(keys=["ok", ""])),
            ],
            "cancel.keys[1]",
        ),
    ],
)
async def test_a_bad_stream_message_gets_invalid_argument_naming_it(
    scheduler_server: SchedulerServer, method: str, frames: list[Any], detail: str
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        call = raw_stream(channel, method)
        raw = [f if isinstance(f, bytes) else f.SerializeToString() for f in frames]
        # The bad frame is the last: once it is written the server answers
        # (no half-close here, whose race with the answer could hide it).
        for frame in raw:
            await call.write(frame)
        code, details = await drain(call)
        assert code == INVALID, (code, details)
        assert detail in details
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    scheduler_server.servicer.state.validate()


async def test_unary_calls_refuse_bad_fields(scheduler_server: SchedulerServer) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        worker = await register_worker(stub, {"GPU": 1})
        cases = [
            (stub.ExplainTask, pb.ExplainTaskRequest(key=""), INVALID, "ExplainTaskRequest.key"),
            (stub.ExplainTask, pb.ExplainTaskRequest(key="k" * 1025), INVALID, "longer"),
            (
                stub.SetWorkerResources,
                pb.SetWorkerResourcesRequest(worker="raw", resources={"GPU": float("nan")}),
                INVALID,
                "resources['GPU']: Input should be a finite number",
            ),
            # A bad request is refused as such even when it names no worker.
            (
                stub.SetWorkerResources,
                pb.SetWorkerResourcesRequest(worker="nobody", resources={" ": 1}),
                INVALID,
                "the name is blank",
            ),
            (
                stub.SetWorkerResources,
                pb.SetWorkerResourcesRequest(worker="nobody", resources={"GPU": 1}),
                NOT_FOUND,
                "nobody",
            ),
        ]
        for method, request, code, detail in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await method(request, timeout=CALL_TIMEOUT)
            assert info.value.code() == code
            assert detail in (info.value.details() or "")
        state = await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=CALL_TIMEOUT)
        assert dict(state.workers[0].resources) == {"GPU": 1}
        worker.cancel()


async def test_a_message_over_the_receive_limit_is_refused_and_the_scheduler_carries_on(
    scheduler_server: SchedulerServer,
) -> None:
    """gRPC refuses a message over the server's receive limit (256 MiB) before
    any of our code runs: the sender gets RESOURCE_EXHAUSTED."""
    from apportion_common.grpc_server import MAX_MESSAGE_BYTES

    # A channel that would send it (ours refuse to, at the same limit).
    async with grpc.aio.insecure_channel(
        scheduler_server.address, options=[("grpc.max_send_message_length", -1)]
    ) as big:
        # Moving 256 MiB takes a while on a busy machine: a generous deadline.
        call = raw_stream(big, "ClientStream", timeout=60)
        hello = pb.ClientToScheduler(hello=pb.ClientHello(client_id="big")).SerializeToString()
        # One submit whose payload alone is over the limit.
        spec = pb.TaskSpec(key="big", payload=bytes(MAX_MESSAGE_BYTES))
        huge = pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=[spec])).SerializeToString()
        del spec
        code, details = await stream_status(call, [hello, huge])
        del huge
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "larger than max" in details
    async with insecure_channel(scheduler_server.address) as channel:
        worker = await register_worker(pb_grpc.SchedulerStub(channel), {})
        worker.cancel()
    scheduler_server.servicer.state.validate()


async def test_the_worker_refuses_a_bad_fetch_and_skips_a_bad_assignment(
    scheduler_server: SchedulerServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Worker(
        scheduler_server.address, nthreads=1, resources={"GPU": 1}, validate=True
    ) as worker:
        await worker.wait_registered(10)
        async with insecure_channel(worker.address) as channel:
            fetch = pb_grpc.WorkerStub(channel).FetchResult
            for key, detail in [("", "is empty"), ("k" * 1025, "is longer than 1024")]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    _ = [c async for c in fetch(pb.FetchResultRequest(key=key), timeout=5)]
                assert info.value.code() == INVALID
                assert f"FetchResultRequest.key {detail}" in (info.value.details() or "")

        # Instructions the scheduler could not have meant: logged and skipped,
        # never run, never in the ledger.
        bad = pb.TaskAssignment(key="bad", run_id=7, payload=VALID_PAYLOAD)
        bad.resources["GPU"] = float("nan")
        no_run = pb.TaskAssignment(key="no-run", run_id=0, payload=VALID_PAYLOAD)
        declared = pb.ResourceAmounts()
        declared.amounts["GPU"] = -1
        batch = pb.WorkerInstructions(assign=[bad, no_run], declared=declared)
        worker.on_instructions(worker_wire.instructions_from_pb(batch))
        assert worker.state.ledger.used() == {} and not worker._running
        assert worker.resources == {"GPU": 1}
        messages = [r.getMessage() for r in caplog.records if r.name == "worker_service"]
        assert any("assign[0]: resources['GPU']" in m for m in messages), messages
        assert any("assign[1]: run_id" in m for m in messages), messages
        assert any("declared" in m for m in messages), messages
        # The one with a usable key and run is reported failed, so a scheduler
        # that did send it would free its lease.
        assert [f.key for f in worker._link.reports.failed] == ["bad"]
        assert "resources['GPU']" in worker._link.reports.failed[0].error.message

        # And the worker still runs real work.
        async with Client(scheduler_server.address, asynchronous=True) as client:
            future = await client.submit(abs, -5, resources={"GPU": 1})
            assert await asyncio.wait_for(future.result(), 15) == 5


async def _register(stub: pb_grpc.SchedulerStub, name: str, address: str, pid: int) -> Any:
    call = stub.WorkerStream(timeout=CALL_TIMEOUT)
    register = pb.RegisterWorker(name=name, address=address, nthreads=1, pid=pid)
    await call.write(pb.WorkerToScheduler(register=register))
    return call


async def test_a_name_taken_by_another_worker_is_refused_naming_it(
    scheduler_server: SchedulerServer,
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        first = await _register(stub, "gpu-1", "127.0.0.1:7001", 11)
        assert (await first.read()).HasField("registered")
        for address, pid in (("127.0.0.1:7002", 12), ("127.0.0.1:7001", 12), ("127.0.0.1:7001", 0)):
            second = await _register(stub, "gpu-1", address, pid)
            code, details = await drain(second)
            assert code == grpc.StatusCode.ALREADY_EXISTS
            assert "'gpu-1' is taken" in details and "127.0.0.1:7001" in details
        state = await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=CALL_TIMEOUT)
        assert [(w.name, w.address) for w in state.workers] == [("gpu-1", "127.0.0.1:7001")]
        first.cancel()


async def test_the_same_process_registering_again_replaces_its_stale_stream(
    scheduler_server: SchedulerServer,
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        old = await _register(stub, "w", "127.0.0.1:7001", 11)
        assert (await old.read()).HasField("registered")
        again = await _register(stub, "w", "127.0.0.1:7001", 11)
        assert (await again.read()).HasField("registered")
        code, _ = await drain(old)
        assert code == grpc.StatusCode.UNAVAILABLE  # the stale stream was ended
        state = await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=CALL_TIMEOUT)
        assert [w.name for w in state.workers] == ["w"]
        scheduler_server.servicer.state.validate()
        again.cancel()
