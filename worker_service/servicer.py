"""The Worker gRPC service: peers and clients fetch results from here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from apportion.transfer import chunks
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from .store import ResultStore


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, store: ResultStore) -> None:
        self._store = store

    async def FetchResult(
        self, request: pb.FetchResultRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ResultChunk]:
        data = self._store.get(request.key)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no result for {request.key!r} here")
            return
        for chunk in chunks(data):
            yield chunk
