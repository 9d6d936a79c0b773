"""The scheduler's unary calls for operators and clients: cluster state,
set-resources, explain, retire, uploaded files, restart, shutdown and logs.

A mixin of :class:`~.servicer.SchedulerServicer`: it reads the state and
dispatches events as the streams do, and holds no state of its own beyond
the files kept for workers that join later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc

from apportion_common.logring import LogRing, kept_lines
from apportion_common.logs_pb import lines_wanted, logs_reply
from apportion_common.uploads import UploadError, check_upload
from protos import apportion_pb2 as pb

from . import wire
from .commands import Command, RetireWorker
from .events import (
    Event,
    RestartAsked,
    RetirementAsked,
    WorkerId,
    WorkerResourcesChanged,
)
from .inspection import WorkerSnapshot
from .state import ClusterState

log = logging.getLogger("scheduler_service")

#: How long Restart waits for the workers to come back when not told.
DEFAULT_RESTART_TIMEOUT_S = 60.0


class OperatorCalls:
    state: ClusterState
    _address: Callable[[], str]
    _worker_handlers: dict[WorkerId, asyncio.Task[object]]
    #: where the dashboard listens, host:port ("" when it does not)
    dashboard_address: str
    #: files uploaded (name -> contents, in upload order), sent to each worker that joins
    uploads: dict[str, bytes]
    #: set by Shutdown: the scheduler's process stops once it is
    shutdown_asked: asyncio.Event
    #: set each time a worker registers (Restart waits for them)
    worker_joined: asyncio.Event
    #: whose lines GetLogs answers (None: the process's ring)
    log_ring: LogRing | None

    def dispatch(self, event: Event) -> None:
        raise NotImplementedError  # the servicer's

    def send_to_workers(self, make: Callable[[WorkerId], Command]) -> None:
        raise NotImplementedError  # the servicer's

    async def SetWorkerResources(
        self,
        request: pb.SetWorkerResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.SetWorkerResourcesReply:
        try:
            name, resources, written = wire.set_resources_from_pb(request)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        worker = self.state.find_worker(name)
        if worker is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {name!r}")
        assert worker is not None
        log.info("worker %s now declares %s", worker.name, dict(request.resources))
        self.dispatch(WorkerResourcesChanged(worker.worker_id, resources, written))
        snapshot = self.state.snapshot()
        info = next(w for w in snapshot.workers if w.worker_id == worker.worker_id)
        return pb.SetWorkerResourcesReply(worker=wire.worker_info_to_pb(info))

    async def RetireWorkers(
        self, request: pb.RetireWorkersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RetireWorkersReply:
        """Drain the workers named (see scheduler_service.retirement) and answer
        once they are gone, or at the timeout with those still draining."""
        try:
            names, timeout = wire.retire_workers_from_pb(request)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        asked: list[WorkerSnapshot] = []
        for name in names:
            worker = self.state.find_worker(name)
            if worker is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {name!r}")
            assert worker is not None
            asked.append(self._snapshot_of(worker.worker_id))
        ids = tuple(dict.fromkeys(w.worker_id for w in asked))
        log.info("retiring %s", ", ".join(w.name for w in asked))
        self.dispatch(RetirementAsked(ids))
        # A worker is gone once its stream's handler has ended (it left).
        streams = [self._worker_handlers[i] for i in ids if i in self._worker_handlers]
        if streams:
            await asyncio.wait(streams, timeout=timeout)
        reply = pb.RetireWorkersReply()
        for snapshot in {w.worker_id: w for w in asked}.values():
            if snapshot.worker_id in self.state.workers:
                reply.draining.append(wire.worker_info_to_pb(self._snapshot_of(snapshot.worker_id)))
            else:
                reply.retired.append(wire.worker_info_to_pb(snapshot))
        return reply

    def _snapshot_of(self, worker_id: WorkerId) -> WorkerSnapshot:
        return next(w for w in self.state.snapshot().workers if w.worker_id == worker_id)

    async def ExplainTask(
        self, request: pb.ExplainTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ExplainTaskReply:
        try:
            key = wire.check_key(request.key, "ExplainTaskRequest.key")
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ExplainTaskReply(explanation=self.state.explain(key))

    async def GetClusterState(
        self, request: pb.GetClusterStateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ClusterState:
        return wire.cluster_state_to_pb(
            self._address(), self.state.snapshot(), self.dashboard_address
        )

    async def UploadFile(
        self, request: pb.UploadFileRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UploadFileReply:
        """Keep the file for workers that join from now on (the client sends it
        to the current ones itself, to hear whether it imports there)."""
        try:
            filename = check_upload(request.filename, len(request.data))
        except UploadError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.uploads.pop(filename, None)  # a new version goes last, after what it imports
        self.uploads[filename] = bytes(request.data)
        log.info("keeping %s (%d bytes) for workers that join", filename, len(request.data))
        return pb.UploadFileReply()

    async def Restart(
        self, request: pb.RestartRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RestartReply:
        timeout = request.timeout_s
        if not (math.isfinite(timeout) and timeout >= 0):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"RestartRequest.timeout_s must be >= 0 seconds, not {timeout}",
            )
        before = set(self.state.workers)
        log.info("restarting: every task cancelled, %d worker(s) restarted", len(before))
        self.dispatch(RestartAsked())
        deadline = time.monotonic() + (timeout or DEFAULT_RESTART_TIMEOUT_S)
        while True:
            self.worker_joined.clear()
            if sum(1 for w in self.state.workers if w not in before) >= len(before):
                break
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self.worker_joined.wait(), max(remaining, 0))
            except TimeoutError:
                break
        workers = [wire.worker_info_to_pb(w) for w in self.state.snapshot().workers]
        return pb.RestartReply(workers=workers)

    async def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ShutdownReply:
        """Tell every worker to exit (not to be restarted), then stop."""
        log.info("shutting down: %d worker(s), then the scheduler", len(self.state.workers))
        self.send_to_workers(RetireWorker)
        self.shutdown_asked.set()
        return pb.ShutdownReply()

    async def GetLogs(
        self, request: pb.GetLogsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetLogsReply:
        return logs_reply(kept_lines(self.log_ring, lines_wanted(request)))
