"""Running one worker process from the command line: start, serve, stop on
a signal, drain on SIGTERM, and the status to exit with."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import Any

from apportion_common.gpus import GpuDevice
from apportion_common.grpc_server import install_stop_signals
from apportion_common.security import TLS

from .memory import MemoryFractions
from .retiring import DEFAULT_DRAIN_TIMEOUT_S, drain
from .stream import WorkerRefused
from .worker import INVARIANT_EXIT_CODE, Worker


async def run_worker(
    scheduler_address: str,
    *,
    resources: Mapping[str, float],
    resources_text: Mapping[str, str] | None = None,
    nthreads: int,
    name: str | None,
    host: str | None = None,
    port: int = 0,
    handle_signals: bool = True,
    token: str | None = None,
    tls: TLS | None = None,
    validate: bool = False,
    shared_memory: bool = True,
    death_timeout: float | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
    gpus: Sequence[GpuDevice] = (),
    isolate_gpu_tasks: bool = False,
    memory_limit: int = 0,
    memory: MemoryFractions | None = None,
    local_directory: str | None = None,
) -> int:
    """Run one worker until it is retired or restarted (returns the status to
    exit with), or SIGINT (stop now), or SIGTERM (drain for at most
    ``drain_timeout`` seconds, then stop). With
    ``validate``, a broken invariant ends the process with status
    :data:`INVARIANT_EXIT_CODE`."""
    worker = Worker(
        scheduler_address,
        resources=resources,
        resources_text=resources_text,
        nthreads=nthreads,
        name=name,
        host=host,
        port=port,
        token=token,
        tls=tls,
        validate=validate,
        shared_memory=shared_memory,
        death_timeout=death_timeout,
        gpus=gpus,
        isolate_gpu_tasks=isolate_gpu_tasks,
        memory_limit=memory_limit,
        memory=memory,
        local_directory=local_directory,
    )
    # Carrying on with broken books would hide the fault.
    worker.on_broken = lambda: os._exit(INVARIANT_EXIT_CODE)
    await worker.start()
    print(f"apportion worker {worker.name} serving on {worker.address}", flush=True)
    stop, drain_asked = asyncio.Event(), asyncio.Event()
    if handle_signals:
        install_stop_signals(stop, drain_asked if drain_timeout > 0 else None)
    assert worker._main is not None
    stopped = asyncio.create_task(stop.wait())
    asked = asyncio.create_task(drain_asked.wait())
    retired = asyncio.create_task(worker.retiring.retired.wait())
    waits: set[asyncio.Task[Any]] = {stopped, asked, retired}
    done, _ = await asyncio.wait({*waits, worker._main}, return_when=asyncio.FIRST_COMPLETED)
    if asked in done and not done & {stopped, retired, worker._main}:
        drained = asyncio.create_task(drain(worker.retiring, drain_timeout))
        waits.add(drained)
        done, _ = await asyncio.wait(
            {stopped, retired, drained, worker._main}, return_when=asyncio.FIRST_COMPLETED
        )
    for waiting in waits:
        waiting.cancel()
    await worker.close()
    if worker._main in done and not stop.is_set():
        refused = worker._main.exception()
        if isinstance(refused, WorkerRefused):
            # Only now, with everything closed: the log line said why, no traceback.
            raise SystemExit(refused.exit_code)
        worker._main.result()  # re-raise why the worker gave up
    return worker.retiring.exit_code
