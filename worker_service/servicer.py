"""The Worker gRPC service: peers and clients fetch results from here.

FetchResult's chunks leave already serialized (:func:`apportion_common.transfer.chunks`
encodes them with one copy of the data, where protobuf takes two), so the
service is registered by :func:`add_worker_service` with a pass-through
serializer for that stream instead of the generated ``add_WorkerServicer_to_server``.
The wire format is the same ``apportion.v1.ResultChunk``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import grpc

from apportion_common import shm
from apportion_common.boundary import WireError, check_count, check_key
from apportion_common.frames import Frames
from apportion_common.logring import LogRing, kept_lines
from apportion_common.logs_pb import lines_wanted, logs_reply
from apportion_common.services import add_service
from apportion_common.transfer import (
    BATCH_FETCH_MAX_KEYS,
    BATCH_FETCH_REPLY_BYTES,
    CHUNK_BYTES,
    NOTHING_TO_MAP,
    chunk_head,
    chunks,
)
from apportion_common.uploads import UploadError
from protos import apportion_pb2 as pb

from .execute import run_function
from .store import ResultStore
from .uploads import Uploads
from .wire import error_to_pb

WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name
#: How long a shared segment's name waits for the peer to map it: a peer that
#: neither maps it nor goes away must not keep it past this.
SHARE_HOLD_S = 60.0

log = logging.getLogger("worker_service")


class WorkerServicer:
    def __init__(
        self, store: ResultStore, uploads: Uploads | None = None, log_ring: LogRing | None = None
    ) -> None:
        self._store = store
        self._uploads = uploads or Uploads()
        #: whose lines GetLogs answers (None: the process's ring, which
        #: ``apportion worker`` installs; no lines without one)
        self._log_ring = log_ring

    async def RunFunction(
        self, request: pb.RunFunctionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RunFunctionReply:
        """``client.run``: in a thread of its own, beside the task threads."""
        outcome = await asyncio.to_thread(run_function, request.payload)
        if isinstance(outcome, bytes):
            return pb.RunFunctionReply(result=outcome)
        return pb.RunFunctionReply(error=error_to_pb(outcome))

    async def UploadFile(
        self, request: pb.UploadFileRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UploadFileReply:
        try:
            await asyncio.to_thread(self._uploads.add, request.filename, bytes(request.data))
        except UploadError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.UploadFileReply()

    async def GetLogs(
        self, request: pb.GetLogsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetLogsReply:
        return logs_reply(kept_lines(self._log_ring, lines_wanted(request)))

    async def _get(self, key: str) -> Frames | None:
        """``key``'s result, read back in a thread if it was spilled to disk."""
        if self._store.is_spilled(key):
            return await asyncio.to_thread(self._store.get, key)
        return self._store.get(key)

    async def _stored(
        self, key: str, what: str, context: grpc.aio.ServicerContext[object, object]
    ) -> Frames:
        """The result stored under ``key``; else the call ends (a bad key, none here)."""
        try:
            check_key(key, what)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        data = await self._get(key)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no result for {key!r} here")
        assert data is not None  # abort raises
        return data

    async def FetchResult(
        self, request: pb.FetchResultRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[bytes]:
        """Serialized ``ResultChunk`` messages (see :func:`add_worker_service`)."""
        spilled = self._store.open_spilled(request.key)
        if spilled is not None:
            # From the file a chunk at a time: serving a spilled result must
            # not bring it back into memory (the worker ran short of it).
            async for chunk in _file_chunks(spilled, request.stripe, request.stripes):
                yield chunk
            return
        data = await self._stored(request.key, "FetchResultRequest.key", context)
        for chunk in chunks(data, stripe=request.stripe, stripes=request.stripes):
            yield chunk

    async def ShareResult(
        self,
        requests: AsyncIterator[pb.ShareRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.ShareReply]:
        """A result's shared-memory segment named to a peer on this host: the
        one it was written into as it was made (kept until it is released),
        else one written now, whose name goes when the stream ends, however."""
        request = await anext(aiter(requests), None)
        if request is None:
            return
        key = request.key
        if self._store.is_spilled(key):
            # Streamed from its file instead: a segment would bring it back into memory.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOTHING_TO_MAP)
        data = await self._stored(key, "ShareRequest.key", context)
        published = self._store.segment(key)
        if published is not None:
            yield pb.ShareReply(segment=published.name, nbytes=published.nbytes, kept=True)
            await _peer_mapped(requests, key)
            return
        if all(data.readonly):
            # Only bytes-like buffers, which the peer must copy out again:
            # through a segment that is two copies into fresh memory, slower
            # than the stream's one (measured); arrays it maps uncopied.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOTHING_TO_MAP)
        # In a thread: copying a large value must not stall the event loop.
        writing = asyncio.ensure_future(asyncio.to_thread(shm.Segment.write, data))
        try:
            segment = await asyncio.shield(writing)
        except asyncio.CancelledError:
            # The peer went away mid-write: the thread still finishes, then
            # its segment goes (removing it now would race its creation).
            writing.add_done_callback(_remove_made_segment)
            raise
        except shm.SharedMemoryUnavailable as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        try:
            yield pb.ShareReply(segment=segment.name, nbytes=segment.nbytes)
            await _peer_mapped(requests, key)
        finally:
            segment.remove()

    async def FetchResults(
        self, request: pb.FetchResultsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.FetchResultsReply:
        """The small ones of many results at once; the caller fetches the
        others (not here, too large, or past the reply's size) one by one."""
        try:
            check_count(request.keys, BATCH_FETCH_MAX_KEYS, "FetchResultsRequest.keys")
            keys = [
                check_key(k, f"FetchResultsRequest.keys[{i}]") for i, k in enumerate(request.keys)
            ]
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = pb.FetchResultsReply()
        room = BATCH_FETCH_REPLY_BYTES
        for key in keys:
            nbytes = self._store.nbytes(key)
            if nbytes is None or nbytes > request.max_bytes:
                continue
            if nbytes > room:
                break
            data = await self._get(key)
            if data is None:
                continue
            room -= data.nbytes
            reply.results.add(key=key, data=b"".join(data.segments()))
        return reply


async def _file_chunks(fd: int, stripe: int, stripes: int) -> AsyncIterator[bytes]:
    """A spilled result's ``ResultChunk`` messages, read from its file (open on
    ``fd``, closed at the end) in a thread a chunk at a time."""
    try:
        total = os.fstat(fd).st_size
        step = max(stripes, 1) * CHUNK_BYTES
        for start in range(stripe * CHUNK_BYTES, total, step):
            length = min(CHUNK_BYTES, total - start)
            data = await asyncio.to_thread(os.pread, fd, length, start)
            yield chunk_head(total, start, len(data), stripes > 1) + data
    finally:
        os.close(fd)


async def _peer_mapped(requests: AsyncIterator[pb.ShareRequest], key: str) -> None:
    """Until the peer ends its side of the stream (it has mapped the segment), or
    :data:`SHARE_HOLD_S`: a peer that neither maps it nor goes away must not
    keep a segment written for it."""
    try:
        async with asyncio.timeout(SHARE_HOLD_S):
            async for _ in requests:
                pass  # the peer has nothing more to say
    except TimeoutError:
        log.warning("a peer did not map the segment for %r within %.0fs", key, SHARE_HOLD_S)


def _remove_made_segment(writing: asyncio.Future[shm.Segment]) -> None:
    if not writing.cancelled() and writing.exception() is None:
        writing.result().remove()


def _serialized(message: bytes) -> bytes:
    return message


def add_worker_service(servicer: WorkerServicer, server: grpc.aio.Server) -> None:
    """Register ``apportion.v1.Worker`` as the generated code would, but with
    FetchResult's responses passed through as the bytes they already are."""
    add_service(server, servicer, pb, "Worker", {"FetchResult": _serialized})
