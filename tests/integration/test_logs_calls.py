"""Scheduler/GetLogs and Worker/GetLogs in-process on port 0, in raw
protobuf: each answers the newest lines of its ring, oldest first, and none
without one."""

from __future__ import annotations

import logging

from apportion_common.grpc_server import insecure_channel, make_server
from apportion_common.logring import LogRing
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from scheduler_service import SchedulerServer
from worker_service.servicer import WorkerServicer, add_worker_service
from worker_service.store import ResultStore


def ring_with(*messages: str) -> LogRing:
    ring = LogRing(3)
    record_of = logging.getLogger("test_logs_calls").makeRecord
    for message in messages:
        ring.handle(record_of("test_logs_calls", logging.INFO, __file__, 1, message, (), None))
    return ring


def texts(reply: pb.GetLogsReply) -> list[str]:
    return [line.text.rsplit(": ", 1)[-1] for line in reply.lines]


async def test_the_scheduler_answers_its_rings_newest_lines(
    scheduler_server: SchedulerServer,
) -> None:
    async with insecure_channel(scheduler_server.address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        assert texts(await stub.GetLogs(pb.GetLogsRequest())) == []  # no ring: no lines
        scheduler_server.servicer.log_ring = ring_with("a", "b", "c", "d")
        assert texts(await stub.GetLogs(pb.GetLogsRequest())) == ["b", "c", "d"]
        assert texts(await stub.GetLogs(pb.GetLogsRequest(n=2))) == ["c", "d"]
        assert texts(await stub.GetLogs(pb.GetLogsRequest(n=0))) == []
        (line,) = (await stub.GetLogs(pb.GetLogsRequest(n=1))).lines
        assert line.level == "INFO" and " INFO test_logs_calls: d" in line.text


async def test_a_worker_answers_its_rings_newest_lines() -> None:
    server = make_server()
    add_worker_service(WorkerServicer(ResultStore(), log_ring=ring_with("x", "y")), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.WorkerStub(channel)
            assert texts(await stub.GetLogs(pb.GetLogsRequest())) == ["x", "y"]
            assert texts(await stub.GetLogs(pb.GetLogsRequest(n=1))) == ["y"]
    finally:
        await server.stop(0)
