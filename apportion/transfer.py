"""Moving results between processes: chunked streams over the Worker service.

Results are pickled bytes kept by the worker that made (or fetched) them.
They travel as a stream of chunks, so a value far larger than gRPC's message
limit moves without any single large message, and the receiver assembles it
into one preallocated buffer instead of joining copies.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from .grpc_server import insecure_channel

CHUNK_BYTES = 1024 * 1024


class ResultUnavailable(LookupError):
    """The result could not be fetched from that address (gone, or never there)."""


def chunks(data: bytes | bytearray) -> Iterator[pb.ResultChunk]:
    view = memoryview(data)
    total = len(view)
    if total == 0:
        yield pb.ResultChunk(total_size=0, data=b"")
        return
    for start in range(0, total, CHUNK_BYTES):
        yield pb.ResultChunk(total_size=total, data=bytes(view[start : start + CHUNK_BYTES]))


class ChannelPool:
    """One channel per peer address, reused for every fetch."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> pb_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = insecure_channel(address)
        return pb_grpc.WorkerStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def fetch(self, address: str, key: str, timeout: float | None = None) -> bytearray:
        """The pickled result of ``key`` from the worker at ``address``."""
        buffer: bytearray | None = None
        offset = 0
        try:
            call = self.stub(address).FetchResult(pb.FetchResultRequest(key=key), timeout=timeout)
            async for chunk in call:
                if buffer is None:
                    buffer = bytearray(chunk.total_size)
                end = offset + len(chunk.data)
                if end > len(buffer):
                    raise ResultUnavailable(f"{key!r} from {address}: more bytes than announced")
                buffer[offset:end] = chunk.data
                offset = end
        except grpc.aio.AioRpcError as exc:
            raise ResultUnavailable(
                f"{key!r} from {address}: {exc.code().name}: {exc.details()}"
            ) from None
        if buffer is None or offset != len(buffer):
            raise ResultUnavailable(f"{key!r} from {address}: the stream ended early")
        return buffer
