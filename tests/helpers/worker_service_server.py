"""An in-process Worker service (FetchResult, ShareResult, FetchResults) on
port 0 over a store the test fills."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from apportion_common.grpc_server import make_server
from worker_service.servicer import WorkerServicer, add_worker_service
from worker_service.store import ResultStore


@contextlib.asynccontextmanager
async def serving(store: ResultStore) -> AsyncIterator[str]:
    """``store`` served on 127.0.0.1, port 0; yields the address, stops the server after."""
    server = make_server()
    add_worker_service(WorkerServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
