"""The grpc.aio servicer: protobuf in, events to the state machine, commands out.

Each worker and each client holds one bidirectional stream. A reader task
turns incoming messages into events; the handler's own loop drains an
:class:`Outbox` and writes whatever accumulated as one batched message, so a
burst of commands costs one write, and reading never waits on writing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from apportion.resources import from_quanta
from apportion.serialize import ErrorInfo
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from . import wire
from .events import (
    AssignTask,
    CancelRun,
    ClientId,
    ClientJoined,
    ClientLeft,
    ClientUpdate,
    Command,
    DeclareResources,
    Event,
    KeysReleased,
    ReleaseData,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksSubmitted,
    Tick,
    WorkerId,
    WorkerJoined,
    WorkerLeft,
    WorkerResourcesChanged,
)
from .policy import SchedulingPolicy
from .state import ClusterState, InvariantError

log = logging.getLogger("scheduler_service")

HEARTBEAT_INTERVAL_S = 2.0
#: How often the clock reaches the state machine: the resolution of waiting times.
TICK_INTERVAL_S = 0.25

T = TypeVar("T")


class Outbox(Generic[T]):
    """Items for one stream, flushed together by that stream's writer."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._wake = asyncio.Event()
        self.closed = False

    def put(self, item: T) -> None:
        self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def take_all(self) -> list[T]:
        await self._wake.wait()
        self._wake.clear()
        items, self._items = self._items, []
        return items


class SchedulerServicer(pb_grpc.SchedulerServicer):
    def __init__(
        self,
        address: Callable[[], str],
        validate: bool = False,
        on_invariant_error: Callable[[], None] | None = None,
        policy: SchedulingPolicy | None = None,
    ) -> None:
        self.state = ClusterState(policy)
        self._address = address
        # Check the books after every event; on in tests, off in production.
        self._validate = validate
        self._on_invariant_error = on_invariant_error
        self._worker_outboxes: dict[WorkerId, Outbox[Command]] = {}
        self._client_outboxes: dict[ClientId, Outbox[ClientUpdate]] = {}
        self._worker_ids = itertools.count(1)

    # ------------------------------------------------------------ routing

    def dispatch(self, event: Event) -> None:
        for cmd in self.state.handle(event):
            if isinstance(cmd, ClientUpdate):
                client_box = self._client_outboxes.get(cmd.client_id)
                if client_box is not None:
                    client_box.put(cmd)
            else:
                worker_box = self._worker_outboxes.get(cmd.worker_id)
                if worker_box is not None:
                    worker_box.put(cmd)
        if self._validate:
            try:
                self.state.validate()
            except InvariantError:
                # The books are wrong: carrying on would hide the fault.
                log.critical("scheduler invariant broken after %r", event, exc_info=True)
                if self._on_invariant_error is None:
                    raise
                self._on_invariant_error()

    async def keep_time(self, interval: float = TICK_INTERVAL_S) -> None:
        """Feed the clock to the state machine (it never reads one itself)."""
        while True:
            self.dispatch(Tick(time.monotonic()))
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ workers

    # read/write style (context.read/write), not the iterator style the stubs assume
    async def WorkerStream(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.WorkerToScheduler, pb.SchedulerToWorker],
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        assert isinstance(first, pb.WorkerToScheduler)
        if first.WhichOneof("kind") != "register":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a RegisterWorker"
            )
        reg = first.register
        try:
            address = wire.check_key(reg.address, "worker address")
            if not 1 <= reg.nthreads <= wire.MAX_NTHREADS:
                raise wire.WireError(f"nthreads must be 1..{wire.MAX_NTHREADS}, not {reg.nthreads}")
            resources = wire.wire_resources(reg.resources, f"worker {reg.name or address}")
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        worker_id = next(self._worker_ids)
        name = reg.name or address
        outbox: Outbox[Command] = Outbox()
        self._worker_outboxes[worker_id] = outbox
        await context.write(
            pb.SchedulerToWorker(
                registered=pb.WorkerRegistered(
                    worker_id=worker_id, heartbeat_interval_s=HEARTBEAT_INTERVAL_S
                )
            )
        )
        log.info(
            "worker %s joined from %s (%d threads, %s)",
            name,
            address,
            reg.nthreads,
            dict(reg.resources),
        )
        self.dispatch(WorkerJoined(worker_id, name, address, reg.nthreads, resources))
        reader = asyncio.create_task(self._read_worker(worker_id, context, outbox))
        try:
            while True:
                cmds = await outbox.take_all()
                if outbox.closed:
                    break
                await context.write(_worker_batch(cmds))
        finally:
            reader.cancel()
            del self._worker_outboxes[worker_id]
            log.info("worker %s (%s) left", name, address)
            self.dispatch(WorkerLeft(worker_id))

    async def _read_worker(
        self,
        worker_id: WorkerId,
        context: grpc.aio.ServicerContext[pb.WorkerToScheduler, pb.SchedulerToWorker],
        outbox: Outbox[Command],
    ) -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                assert isinstance(msg, pb.WorkerToScheduler)
                if msg.WhichOneof("kind") != "reports":
                    log.warning(
                        "worker %d sent %s after registering; closing its stream",
                        worker_id,
                        msg.WhichOneof("kind"),
                    )
                    return
                self._apply_reports(worker_id, msg.reports)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        except Exception:
            log.exception("worker %d: bad message; closing its stream", worker_id)
        finally:
            outbox.close()

    def _apply_reports(self, worker_id: WorkerId, reports: pb.WorkerReports) -> None:
        for done in reports.finished:
            fetched = tuple(zip(done.fetched_keys, done.fetched_nbytes, strict=False))
            self.dispatch(
                TaskFinished(
                    worker_id, done.key, done.run_id, done.nbytes, fetched, done.inline_result
                )
            )
        for failed in reports.failed:
            self.dispatch(
                TaskErred(worker_id, failed.key, failed.run_id, wire.error_from_pb(failed.error))
            )
        for missing in reports.missing_inputs:
            pairs = tuple((i.key, i.address) for i in missing.inputs)
            self.dispatch(TaskMissingInputs(worker_id, missing.key, missing.run_id, pairs))

    # ------------------------------------------------------------ clients

    async def ClientStream(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.ClientToScheduler, pb.SchedulerToClient],
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        assert isinstance(first, pb.ClientToScheduler)
        if first.WhichOneof("kind") != "hello" or not first.hello.client_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a ClientHello"
            )
        client_id = first.hello.client_id
        if client_id in self._client_outboxes:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"client {client_id} is connected")
        outbox: Outbox[ClientUpdate] = Outbox()
        self._client_outboxes[client_id] = outbox
        self.dispatch(ClientJoined(client_id))
        reader = asyncio.create_task(self._read_client(client_id, context, outbox))
        try:
            while True:
                updates = await outbox.take_all()
                if outbox.closed:
                    break
                await context.write(
                    pb.SchedulerToClient(updates=[wire.update_to_pb(u) for u in updates])
                )
        finally:
            reader.cancel()
            del self._client_outboxes[client_id]
            self.dispatch(ClientLeft(client_id))

    async def _read_client(
        self,
        client_id: ClientId,
        context: grpc.aio.ServicerContext[pb.ClientToScheduler, pb.SchedulerToClient],
        outbox: Outbox[ClientUpdate],
    ) -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                assert isinstance(msg, pb.ClientToScheduler)
                kind = msg.WhichOneof("kind")
                if kind == "submit":
                    self._submit(client_id, msg.submit, outbox)
                elif kind == "cancel":
                    self.dispatch(TasksCancelled(client_id, tuple(msg.cancel.keys)))
                elif kind == "release":
                    self.dispatch(KeysReleased(client_id, tuple(msg.release.keys)))
                else:
                    log.warning("client %s sent %s; ignored", client_id, kind)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        except Exception:
            log.exception("client %s: bad message; closing its stream", client_id)
        finally:
            outbox.close()

    def _submit(
        self, client_id: ClientId, batch: pb.SubmitTasks, outbox: Outbox[ClientUpdate]
    ) -> None:
        accepted = []
        for spec in batch.tasks:
            try:
                accepted.append(wire.submission_from_pb(spec))
            except wire.WireError as exc:
                # Refuse this task alone, telling the one who sent it why.
                outbox.put(
                    ClientUpdate(
                        client_id,
                        spec.key,
                        "error",
                        error=ErrorInfo("builtins.ValueError", str(exc), "", b""),
                    )
                )
        if accepted:
            self.dispatch(TasksSubmitted(client_id, tuple(accepted)))

    # ------------------------------------------------------------- unary

    async def SetWorkerResources(
        self,
        request: pb.SetWorkerResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.SetWorkerResourcesReply:
        worker = self.state.find_worker(request.worker)
        if worker is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {request.worker!r}")
        assert worker is not None
        try:
            resources = wire.wire_resources(request.resources, f"worker {worker.name}")
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("worker %s now declares %s", worker.name, dict(request.resources))
        self.dispatch(WorkerResourcesChanged(worker.worker_id, resources))
        snapshot = self.state.snapshot()
        info = next(w for w in snapshot.workers if w.worker_id == worker.worker_id)
        return pb.SetWorkerResourcesReply(worker=wire.worker_info_to_pb(info))

    async def ExplainTask(
        self, request: pb.ExplainTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ExplainTaskReply:
        return pb.ExplainTaskReply(explanation=self.state.explain(request.key))

    async def GetClusterState(
        self, request: pb.GetClusterStateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ClusterState:
        return wire.cluster_state_to_pb(self._address(), self.state.snapshot())


def _worker_batch(cmds: list[Command]) -> pb.SchedulerToWorker:
    instructions = pb.WorkerInstructions()
    for cmd in cmds:
        if isinstance(cmd, AssignTask):
            instructions.assign.append(wire.assignment_to_pb(cmd))
        elif isinstance(cmd, CancelRun):
            instructions.cancel.append(pb.RunRef(key=cmd.key, run_id=cmd.run_id))
        elif isinstance(cmd, ReleaseData):
            instructions.release.append(pb.RunRef(key=cmd.key, run_id=cmd.run_id))
        elif isinstance(cmd, DeclareResources):
            # Present even when empty: a worker told to declare nothing must
            # hear it (an empty map alone would leave the field unset).
            instructions.declared.SetInParent()
            instructions.declared.amounts.update(from_quanta(cmd.resources))
    return pb.SchedulerToWorker(instructions=instructions)
