"""Log lines (:mod:`apportion_common.logring`) as ``apportion.v1`` messages,
both ways: what ``Scheduler/GetLogs`` and ``Worker/GetLogs`` answer and what
the client reads of them; and :class:`WorkerLogReader`, the scheduler's
dashboard asking workers for theirs."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import grpc

from protos import apportion_pb2 as pb

from .logring import LogLine, LogsUnavailable
from .security import ClientSecurity
from .transfer import ChannelPool

#: Characters one GetLogs reply carries at most (the newest lines that fit),
#: well under gRPC's message limit whatever ring size is set.
MAX_REPLY_CHARS = 64 * 1024 * 1024


def logs_request(n: int | None) -> pb.GetLogsRequest:
    """Ask for the newest ``n`` lines (None: all kept)."""
    if n is None:
        return pb.GetLogsRequest()
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a whole number >= 0 or None, not {n!r}")
    return pb.GetLogsRequest(n=min(n, 2**32 - 1))


def lines_wanted(request: pb.GetLogsRequest) -> int | None:
    return request.n if request.HasField("n") else None


def logs_reply(lines: Sequence[LogLine]) -> pb.GetLogsReply:
    """The newest of ``lines`` that fit in :data:`MAX_REPLY_CHARS`, oldest first."""
    room, first = MAX_REPLY_CHARS, len(lines)
    while first > 0 and len(lines[first - 1].text) <= room:
        first -= 1
        room -= len(lines[first].text)
    return pb.GetLogsReply(
        lines=[pb.LogLine(level=line.level, text=line.text) for line in lines[first:]]
    )


def lines_from_pb(reply: pb.GetLogsReply) -> list[LogLine]:
    return [LogLine(line.level, line.text) for line in reply.lines]


class WorkerLogReader:
    """Workers' newest lines (``Worker/GetLogs``), over one channel per
    worker, presenting ``security`` (the scheduler's own secret and TLS files)."""

    def __init__(self, security: ClientSecurity) -> None:
        self._pool = ChannelPool(security)

    async def read(self, address: str, n: int | None, timeout: float) -> list[LogLine]:
        """The newest ``n`` lines of the worker at ``address``; LogsUnavailable
        says why not (no answer within ``timeout`` seconds, refused, gone)."""
        try:
            reply = await self._pool.stub(address).GetLogs(logs_request(n), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise LogsUnavailable(f"no answer within {timeout:g} s", timed_out=True) from None
            raise LogsUnavailable(f"{exc.code().name}: {exc.details()}") from None
        return lines_from_pb(reply)

    async def keep_only(self, addresses: Collection[str]) -> None:
        """Close the channels to workers not in ``addresses`` (those that left)."""
        await self._pool.keep_only(addresses)

    async def close(self) -> None:
        await self._pool.close()
