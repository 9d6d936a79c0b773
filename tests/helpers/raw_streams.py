"""Raw gRPC streams to the scheduler, for tests that send what no client would."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from protos import apportion_pb2 as pb

#: Every call a test makes has a deadline.
CALL_TIMEOUT = 5.0
OK = grpc.StatusCode.OK

GOODBYE = pb.ClientToScheduler(goodbye=pb.ClientGoodbye())


async def drain(call: Any) -> tuple[grpc.StatusCode, str]:
    """Read a stream to its end; its status and details."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return await call.code(), await call.details() or ""


async def send_all(call: Any, messages: list[Any]) -> bool:
    """Write what the server still takes; False if it ended the stream first."""
    try:
        for message in messages:
            await call.write(message)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return False
    return True


async def stream_status(call: Any, messages: list[Any]) -> tuple[grpc.StatusCode, str]:
    """Send ``messages`` and read to the end: the server's status and details.

    When the server ends the stream while the client still writes, gRPC's
    client replaces the server's status with its own INTERNAL ("Internal error
    from Core"), hiding the server's; that counts as OK here, and the log
    oracle (Cluster.check_alive) still catches a handler that failed.
    """
    all_sent = await send_all(call, messages)
    code, details = await drain(call)
    if not all_sent and code == grpc.StatusCode.INTERNAL:
        return OK, "(the server ended the stream while the client wrote)"
    return code, details


def raw_stream(channel: grpc.aio.Channel, method: str, timeout: float = CALL_TIMEOUT) -> Any:
    return channel.stream_stream(
        f"/apportion.v1.Scheduler/{method}", request_serializer=None, response_deserializer=None
    )(timeout=timeout)
