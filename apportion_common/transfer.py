"""Moving results between processes: chunked streams over the Worker service.

Results are pickled values (:class:`~apportion_common.serialize.Frames`: a pickle
plus its large buffers, uncopied) kept by the worker that made (or fetched)
them. They travel as a stream of chunks, so a value far larger than gRPC's
message limit moves without any single large message. The sender cuts chunks
with memoryview slices; the receiver reads each chunk's bytes in place and
copies every byte once, into the value's own buffer. A peer on the same host
takes the value through shared memory instead (:meth:`ChannelPool.share`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine, Iterator
from typing import Any

import grpc

from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from . import shm
from .frames import Assembler, Frames
from .security import ClientSecurity

CHUNK_BYTES = 1024 * 1024
FETCH_RESULT = "/apportion.v1.Worker/FetchResult"
#: FetchResults: the most keys one request may name, and the most result
#: bytes one reply carries (well under the message limit).
BATCH_FETCH_MAX_KEYS = 10_000
BATCH_FETCH_REPLY_BYTES = 4 * 1024 * 1024


#: Values at least this large come over STRIPES connections at once: one
#: HTTP/2 connection carries a bulk stream well below what the link and the
#: two processes can (its flow-control window and one socket's wakeups).
STRIPE_MIN_BYTES = 8 * 1024 * 1024
STRIPES = 2
#: A stripe's channel gets subchannels of its own, so its own TCP connection
#: (channels with equal arguments would share one).
_OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


#: ShareResult's answer for a value with nothing a peer could map: stream it.
NOTHING_TO_MAP = "nothing in this value to map: fetch it with FetchResult"


class ResultUnavailable(LookupError):
    """The result could not be fetched from that address (gone, or never there)."""


class NotShared(ResultUnavailable):
    """The holder streams this value rather than share it (nothing to map)."""


def chunks(
    data: Frames | bytes | bytearray,
    chunk_bytes: int = CHUNK_BYTES,
    stripe: int = 0,
    stripes: int = 1,
) -> Iterator[bytes]:
    """``data``'s wire form as serialized ResultChunk messages of ``chunk_bytes`` each.

    The messages are encoded here, not by protobuf: building a ResultChunk
    copies its ``data`` in, and serializing copies it again. Here each chunk
    is cut from the stored buffers with memoryview slices and copied once,
    next to its few header bytes, into the ``bytes`` gRPC sends.

    With ``stripes`` > 1 only chunks ``stripe``, ``stripe + stripes``, ...
    come, each carrying its offset (the other streams carry the rest).
    """
    segments = data.segments() if isinstance(data, Frames) else [data]
    views = [memoryview(s).cast("B") for s in segments]
    total = sum(v.nbytes for v in views)
    if total == 0:
        if stripe == 0:
            yield b""  # an empty ResultChunk: total_size 0, no data
        return
    striped = stripes > 1
    starts = [0]
    for view in views:
        starts.append(starts[-1] + view.nbytes)
    first = 0  # the first view a chunk may start in: chunks come in order
    for start in range(stripe * chunk_bytes, total, max(stripes, 1) * chunk_bytes):
        end = min(start + chunk_bytes, total)
        while starts[first + 1] <= start:
            first += 1
        pieces: list[memoryview] = []
        i = first
        while i < len(views) and starts[i] < end:
            lo, hi = max(start, starts[i]) - starts[i], min(end, starts[i + 1]) - starts[i]
            if hi > lo:
                pieces.append(views[i][lo:hi])
            i += 1
        yield b"".join([chunk_head(total, start, end - start, striped), *pieces])


def chunk_head(total: int, start: int, length: int, striped: bool) -> bytes:
    """The bytes of a serialized ResultChunk before its ``length`` data bytes,
    those at ``start`` of a ``total``-byte wire form (see :func:`chunks`)."""
    offset_field = b"\x18" + _encode_varint(start) if striped else b""
    return b"\x08" + _encode_varint(total) + offset_field + b"\x12" + _encode_varint(length)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("a ResultChunk with a broken varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def chunk_view(raw: bytes) -> tuple[int, int, memoryview]:
    """``(total_size, offset, data)`` of a serialized ResultChunk, ``data`` as
    a view into ``raw``.

    protobuf's parser copies ``data`` (a MiB per chunk) into the message, and
    reading it copies again; this reads the same wire format
    (https://protobuf.dev/programming-guides/encoding/) and copies nothing.
    Unknown fields are skipped, as protobuf would.
    """
    view = memoryview(raw)
    total, offset, data, pos, end = 0, 0, view[0:0], 0, len(raw)
    while pos < end:
        tag, pos = _varint(raw, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(raw, pos)
            if number == 1:
                total = value
            elif number == 3:
                offset = value
        elif wire_type == 2:
            length, pos = _varint(raw, pos)
            if pos + length > end:
                raise ValueError("a ResultChunk cut short")
            if number == 2:
                data = view[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"a ResultChunk with wire type {wire_type}")
    if pos > end:
        raise ValueError("a ResultChunk cut short")
    return total, offset, data


class _InOrder:
    """Chunks from striped streams fed to an :class:`Assembler` in offset
    order; one that comes early waits, as gRPC's own buffer (uncopied)."""

    def __init__(self) -> None:
        self.assembler: Assembler | None = None
        self.next = 0
        self._early: dict[int, memoryview] = {}

    def take(self, total: int, offset: int, data: memoryview) -> None:
        if self.assembler is None:
            self.assembler = Assembler(total)
        elif total != self.assembler.total:
            raise ValueError("chunks that disagree on the value's size")
        if offset + data.nbytes > total:
            raise ValueError(f"a chunk at {offset} past the {total} bytes announced")
        if offset != self.next:
            if offset < self.next or offset in self._early:
                raise ValueError(f"the chunk at {offset} twice")
            self._early[offset] = data
            return
        self._feed(data)
        while (early := self._early.pop(self.next, None)) is not None:
            self._feed(early)

    def _feed(self, data: memoryview) -> None:
        assert self.assembler is not None
        self.assembler.feed(data)
        self.next += data.nbytes


class ChannelPool:
    """One channel per peer address (and per extra stripe), reused for every fetch.

    ``security``: the token (a worker's, or a client's) and TLS each fetch presents.
    """

    def __init__(self, security: ClientSecurity | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._security = security or ClientSecurity()

    def stub(self, address: str) -> pb_grpc.WorkerStub:
        return pb_grpc.WorkerStub(self._channel(address))

    def _channel(self, address: str, stripe: int = 0) -> grpc.aio.Channel:
        name = address if stripe == 0 else f"{address}#{stripe}"
        channel = self._channels.get(name)
        if channel is None:
            extra = _OWN_CONNECTION if stripe else ()
            channel = self._channels[name] = self._security.aio_channel(address, extra)
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def keep_only(self, addresses: Collection[str]) -> None:
        """Close the channels to every peer not in ``addresses`` (peers that
        left): a long-lived pool must not keep one per peer it ever met."""
        gone = [name for name in self._channels if name.partition("#")[0] not in addresses]
        for name in gone:
            channel = self._channels.pop(name, None)
            if channel is not None:
                await channel.close()

    async def fetch_small(
        self, address: str, keys: list[str], max_bytes: int, timeout: float | None = None
    ) -> dict[str, Frames]:
        """Those of ``keys`` whose results the worker at ``address`` holds and
        are at most ``max_bytes``, in one round trip (FetchResults) rather than
        a stream each (an aggregate's many small inputs would wait a round trip
        apiece); the missing ones are for the caller to fetch."""
        try:
            reply = await self.stub(address).FetchResults(
                pb.FetchResultsRequest(keys=keys, max_bytes=max_bytes), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise ResultUnavailable(
                f"{len(keys)} results from {address}: {exc.code().name}: {exc.details()}"
            ) from None
        wanted = set(keys)
        found: dict[str, Frames] = {}
        for result in reply.results:
            if result.key not in wanted:
                continue  # not asked for: a confused peer's, ignored
            try:
                found[result.key] = Frames.parse([result.data])
            except ValueError as exc:
                raise ResultUnavailable(f"{result.key!r} from {address}: {exc}") from None
        return found

    async def share(self, address: str, key: str) -> Frames:
        """The result of ``key`` from the worker at ``address``, on this host,
        through a shared-memory segment it names (Worker/ShareResult), mapped
        here: see :mod:`apportion_common.shm`."""
        call = self.stub(address).ShareResult()
        try:
            await call.write(pb.ShareRequest(key=key))
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise ResultUnavailable(f"{key!r} from {address}: no segment named")
            assert isinstance(reply, pb.ShareReply)
            # In a thread: reading a large bytes value must not stall the loop.
            frames = await asyncio.to_thread(
                shm.read, reply.segment, reply.nbytes, remove=not reply.kept
            )
            await call.done_writing()  # mapped: the holder may drop a name made for us
        except grpc.aio.AioRpcError as exc:
            if (
                exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                and exc.details() == NOTHING_TO_MAP
            ):
                raise NotShared(f"{key!r} from {address}: {NOTHING_TO_MAP}") from None
            raise ResultUnavailable(
                f"{key!r} from {address} in shared memory: {exc.code().name}: {exc.details()}"
            ) from None
        except shm.SharedMemoryUnavailable as exc:
            call.cancel()
            raise ResultUnavailable(f"{key!r} from {address} in shared memory: {exc}") from None
        except BaseException:
            call.cancel()
            raise
        return frames

    async def fetch(
        self, address: str, key: str, timeout: float | None = None, nbytes: int = 0
    ) -> Frames:
        """The pickled result of ``key`` from the worker at ``address``;
        ``nbytes``: its size where known (a large value comes striped over
        :data:`STRIPES` connections).

        Each chunk is copied as it arrives (a view into gRPC's own buffer)
        into the value's buffers (:class:`~apportion_common.frames.Assembler`):
        one copy of each byte after gRPC's.
        """
        stripes = STRIPES if nbytes >= STRIPE_MIN_BYTES else 1
        order = _InOrder()
        calls = [
            self._channel(address, i).unary_stream(
                FETCH_RESULT,
                request_serializer=pb.FetchResultRequest.SerializeToString,
                response_deserializer=chunk_view,
            )(pb.FetchResultRequest(key=key, stripe=i, stripes=stripes), timeout=timeout)
            for i in range(stripes)
        ]

        async def drain(call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
            async for total, offset, data in call:
                order.take(total, offset if stripes > 1 else order.next, data)

        try:
            if stripes == 1:
                await drain(calls[0])
            else:
                await _all_or_none([drain(call) for call in calls])
        except grpc.aio.AioRpcError as exc:
            raise ResultUnavailable(
                f"{key!r} from {address}: {exc.code().name}: {exc.details()}"
            ) from None
        except ValueError as exc:
            raise ResultUnavailable(f"{key!r} from {address}: {exc}") from None
        finally:
            for call in calls:
                call.cancel()  # a no-op on a finished call; stops the others on a failure
        assembler = order.assembler
        if assembler is None or assembler.received != assembler.total:
            raise ResultUnavailable(f"{key!r} from {address}: the stream ended early")
        try:
            return assembler.frames()
        except ValueError as exc:
            raise ResultUnavailable(f"{key!r} from {address}: {exc}") from None


async def _all_or_none(steps: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``steps`` side by side; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if (exc := task.exception()) is not None:
            raise exc
