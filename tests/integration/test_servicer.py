"""The scheduler and worker gRPC services in-process on port 0, spoken to in raw protobuf.

Bad input gets a clear error naming what was wrong, and the scheduler stays up.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from apportion_common import serialize
from apportion_common.grpc_server import insecure_channel
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from scheduler_service import SchedulerServer
from worker_service import Worker


def register(name: str = "w", resources: dict[str, float] | None = None, nthreads: int = 1):
    return pb.WorkerToScheduler(
        register=pb.RegisterWorker(
            name=name,
            address=f"127.0.0.1:{9000 + nthreads}",
            nthreads=nthreads,
            resources=resources or {},
        )
    )


async def workers_seen(address: str) -> list[pb.WorkerInfo]:
    async with insecure_channel(address) as channel:
        state = await pb_grpc.SchedulerStub(channel).GetClusterState(pb.GetClusterStateRequest())
        return list(state.workers)


async def test_register_then_assignment_batch(scheduler_server: SchedulerServer) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        worker = stub.WorkerStream()
        await worker.write(register(resources={"GPU": 2}, nthreads=4))
        first = await worker.read()
        assert first.registered.worker_id >= 1

        client = stub.ClientStream()
        await client.write(pb.ClientToScheduler(hello=pb.ClientHello(client_id="c1")))
        payload = serialize.dump_call(abs, (-1,), {})
        specs = [pb.TaskSpec(key=f"t{i}", payload=payload, resources={"GPU": 1}) for i in range(3)]
        await client.write(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=specs)))
        msg = await asyncio.wait_for(worker.read(), 10)
        # Only two fit in GPU=2, and both arrive in one batch.
        assert [a.key for a in msg.instructions.assign] == ["t0", "t1"]
        workers = await workers_seen(scheduler_server.address)
        assert dict(workers[0].used_resources) == {"GPU": 2.0}

        first_run = msg.instructions.assign[0]
        await worker.write(
            pb.WorkerToScheduler(
                reports=pb.WorkerReports(
                    finished=[pb.TaskFinished(key="t0", run_id=first_run.run_id, nbytes=3)]
                )
            )
        )
        update = await asyncio.wait_for(client.read(), 10)
        assert update.updates[0].key == "t0"
        assert update.updates[0].status == pb.TASK_STATUS_FINISHED
        msg = await asyncio.wait_for(worker.read(), 10)
        assert [a.key for a in msg.instructions.assign] == ["t2"]
        worker.cancel()
        client.cancel()


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        (pb.WorkerToScheduler(reports=pb.WorkerReports(heartbeat=True)), "RegisterWorker"),
        (register(resources={"GPU": math.nan}), "GPU"),
        (register(resources={"GPU": -1}), "GPU"),
        (register(resources={"": 1}), "name is empty"),
        (register(nthreads=0), "nthreads"),
    ],
)
async def test_bad_registration_is_refused_by_name(
    scheduler_server: SchedulerServer, message: pb.WorkerToScheduler, detail: str
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        call = pb_grpc.SchedulerStub(channel).WorkerStream()
        await call.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in info.value.details()
    assert await workers_seen(scheduler_server.address) == []


async def test_bad_task_is_refused_alone(scheduler_server: SchedulerServer) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        client = pb_grpc.SchedulerStub(channel).ClientStream()
        await client.write(pb.ClientToScheduler(hello=pb.ClientHello(client_id="c1")))
        payload = serialize.dump_call(abs, (-1,), {})
        await client.write(
            pb.ClientToScheduler(
                submit=pb.SubmitTasks(
                    tasks=[
                        pb.TaskSpec(key="bad", payload=payload, resources={"GPU": math.inf}),
                        pb.TaskSpec(key="good", payload=payload),
                    ]
                )
            )
        )
        updates: dict[str, pb.TaskUpdate] = {}
        while len(updates) < 2:  # both may come in one batch, or in two
            msg = await asyncio.wait_for(client.read(), 10)
            updates.update({u.key: u for u in msg.updates})
        bad = updates["bad"]
        assert bad.status == pb.TASK_STATUS_ERROR
        assert "GPU" in bad.error.message and "finite" in bad.error.message
        # "good" was accepted: it waits (no workers), and the client is told why.
        assert updates["good"].status == pb.TASK_STATUS_PENDING
        assert "no workers are connected" in updates["good"].waiting_reason
        client.cancel()


async def test_garbage_bytes_on_a_stream_leave_the_scheduler_up(
    scheduler_server: SchedulerServer,
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        raw = channel.stream_stream(
            "/apportion.v1.Scheduler/WorkerStream",
            request_serializer=None,
            response_deserializer=None,
        )
        call = raw()
        await call.write(b"\xff\xff\xff\x00garbage")
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(call.read(), 10)
    # Still serving, still accepting workers.
    async with insecure_channel(scheduler_server.address) as channel:
        worker = pb_grpc.SchedulerStub(channel).WorkerStream()
        await worker.write(register())
        assert (await worker.read()).registered.worker_id >= 1
        worker.cancel()


async def test_worker_serves_results_in_chunks_and_refuses_unknown_keys(
    scheduler_server: SchedulerServer,
) -> None:
    async with Worker(scheduler_server.address, nthreads=1) as worker:
        await worker.wait_registered(10)
        data = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a chunk multiple
        worker.store.put("k", 1, data)
        async with insecure_channel(worker.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            chunks = [c async for c in stub.FetchResult(pb.FetchResultRequest(key="k"))]
            assert len(chunks) == 4
            assert b"".join(c.data for c in chunks) == data
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in stub.FetchResult(pb.FetchResultRequest(key="nope"))]
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "nope" in info.value.details()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/apportion.v1.Scheduler/ExplainTask", "apportion.v1.ExplainTaskRequest"),
        ("/apportion.v1.Scheduler/SetWorkerResources", "apportion.v1.SetWorkerResourcesRequest"),
        ("/apportion.v1.Scheduler/RetireWorkers", "apportion.v1.RetireWorkersRequest"),
    ],
)
async def test_a_unary_request_that_does_not_parse_is_refused_by_name(
    scheduler_server: SchedulerServer, method: str, message: str
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{message} could not be parsed" in (info.value.details() or "")
        # The scheduler carries on.
        state = await pb_grpc.SchedulerStub(channel).GetClusterState(
            pb.GetClusterStateRequest(), timeout=10
        )
        assert state.address == scheduler_server.address


@pytest.mark.parametrize(
    ("request_", "code", "says"),
    [
        (pb.RetireWorkersRequest(), grpc.StatusCode.INVALID_ARGUMENT, "name at least one"),
        (
            pb.RetireWorkersRequest(workers=["w"], timeout_s=math.nan),
            grpc.StatusCode.INVALID_ARGUMENT,
            "timeout_s",
        ),
        (pb.RetireWorkersRequest(workers=["nope"]), grpc.StatusCode.NOT_FOUND, "no worker 'nope'"),
    ],
)
async def test_retire_workers_refuses_what_it_cannot_do_by_name(
    scheduler_server: SchedulerServer,
    request_: pb.RetireWorkersRequest,
    code: grpc.StatusCode,
    says: str,
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.SchedulerStub(channel).RetireWorkers(request_, timeout=10)
    assert info.value.code() == code and says in (info.value.details() or "")


async def test_amounts_as_written_go_from_the_worker_to_status_and_follow_a_change(
    scheduler_server: SchedulerServer,
) -> None:
    resources = {"MEMORY": 100e9, "GPU": 2.0}
    written = {"MEMORY": "100GB", "GPU": "2"}
    async with Worker(
        scheduler_server.address, nthreads=1, resources=resources, resources_text=written
    ) as worker:
        await worker.wait_registered(10)
        (seen,) = await workers_seen(scheduler_server.address)
        assert dict(seen.resources_text) == written
        async with insecure_channel(scheduler_server.address) as channel:
            reply = await pb_grpc.SchedulerStub(channel).SetWorkerResources(
                pb.SetWorkerResourcesRequest(
                    worker=worker.name,
                    resources={"MEMORY": 100e9, "GPU": 4},
                    resources_text={"GPU": "4"},
                )
            )
        # GPU as newly written; MEMORY unchanged keeps its text.
        assert dict(reply.worker.resources_text) == {"MEMORY": "100GB", "GPU": "4"}
        for _ in range(100):  # the worker hears the new amounts on its stream
            if worker.resources.get("GPU") == 4:
                break
            await asyncio.sleep(0.05)
        # It keeps only the text that still reads as what it declares: a
        # registration after a broken stream says nothing stale.
        assert worker.resources_text == {"MEMORY": "100GB"}
