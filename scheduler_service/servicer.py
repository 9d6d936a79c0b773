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
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import grpc

from apportion_common.logring import LogRing
from apportion_common.serialize import ErrorInfo
from apportion_common.status import ErrorKind, TaskStatus
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from . import wire
from .commands import (
    JOURNAL_COMMANDS,
    Command,
    NotifyClient,
    RetireWorker,
    UploadFiles,
)
from .dashboard.activity import RunActivity
from .events import (
    ClientDisconnected,
    ClientId,
    ClientJoined,
    ClientLeft,
    Event,
    HeldResult,
    KeysReleased,
    RetirementAsked,
    StateRecovered,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksForgotten,
    TasksSubmitted,
    Tick,
    WorkerId,
    WorkerJoined,
    WorkerLeft,
)
from .journal import Journal
from .liveness import Liveness
from .operator_calls import OperatorCalls
from .policy import SchedulingPolicy
from .state import ClusterState, InvariantError

log = logging.getLogger("scheduler_service")

#: How often the clock reaches the state machine: the resolution of waiting times.
TICK_INTERVAL_S = 0.25
#: Tasks of one SubmitTasks message handed to the state machine at a time.
SUBMIT_CHUNK = 128
#: How long a re-registering worker's old stream has to end.
STALE_STREAM_WAIT_S = 5.0

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


class SchedulerServicer(OperatorCalls, pb_grpc.SchedulerServicer):
    def __init__(
        self,
        address: Callable[[], str],
        validate: bool = False,
        on_invariant_error: Callable[[], None] | None = None,
        policy: SchedulingPolicy | None = None,
        worker_ttl: float = 5.0,
        journal: Journal | None = None,
    ) -> None:
        # Incarnations start at a random point: a result a worker kept from an
        # earlier lifetime of this scheduler never matches a new task's.
        self.state = ClusterState(policy, incarnation_base=secrets.randbits(62))
        self.state.journaling = journal is not None
        self._journal = journal
        self._liveness = Liveness(worker_ttl)
        self._address = address
        # Check the books after every event; on in tests, off in production.
        self._validate = validate
        self._on_invariant_error = on_invariant_error
        self._worker_outboxes: dict[WorkerId, Outbox[Command]] = {}
        self._client_outboxes: dict[ClientId, Outbox[NotifyClient]] = {}
        # The handler task of each stream, to end one from outside: a silent
        # worker (its writes may be stuck on a full window), or a client's old
        # stream when it reconnects before the scheduler noticed the break.
        self._worker_handlers: dict[WorkerId, asyncio.Task[object]] = {}
        self._client_handlers: dict[ClientId, asyncio.Task[object]] = {}
        self._silenced: set[WorkerId] = set()
        self._worker_ids = itertools.count(1)
        #: SHA-256 of the client token, told to each worker so that it accepts
        #: clients' result fetches without holding their secret (security.py);
        #: empty when clients need no token.
        self.client_token_sha256 = b""
        #: SHA-256 of this process's own secret, told to each worker: it
        #: accepts it for GetLogs only (the dashboard's log pages); empty: none.
        self.scheduler_token_sha256 = b""
        self.uploads: dict[str, bytes] = {}
        self.shutdown_asked = asyncio.Event()
        self.worker_joined = asyncio.Event()
        self.dashboard_address = ""
        #: told of every batch of events and the commands they made, when set
        #: (the dashboard's counters and task stream)
        self.activity: RunActivity | None = None
        #: Whose lines GetLogs answers (None: the process's ring, which
        #: ``apportion scheduler`` installs; no lines without one).
        self.log_ring: LogRing | None = None

    def recover(self) -> int:
        """Rebuild the journal's tasks (at startup); returns how many."""
        if self._journal is None:
            return 0
        tasks = self._journal.load()
        if tasks:
            self.dispatch(StateRecovered(tasks, time.monotonic()))
        self._journal.commit()
        return len(tasks)

    # ------------------------------------------------------------ routing

    def dispatch(self, event: Event) -> None:
        self.dispatch_all((event,))

    def send_to_workers(self, make: Callable[[WorkerId], Command]) -> None:
        """The command ``make(worker_id)`` to every connected worker."""
        for worker_id, outbox in self._worker_outboxes.items():
            outbox.put(make(worker_id))

    def dispatch_all(self, events: tuple[Event, ...]) -> None:
        """Hand ``events`` to the state machine together (one placement pass)
        and route the commands that come back."""
        cmds = self.state.handle_all(events)
        if self.activity is not None:
            self.activity.observe(events, cmds, time.monotonic())
        for cmd in cmds:
            if isinstance(cmd, NotifyClient):
                client_box = self._client_outboxes.get(cmd.client_id)
                if client_box is not None:
                    client_box.put(cmd)
            elif isinstance(cmd, JOURNAL_COMMANDS):
                # Emitted only when there is a journal (state.journaling).
                assert self._journal is not None
                self._journal.record(cmd)
            else:
                worker_box = self._worker_outboxes.get(cmd.worker_id)
                if worker_box is not None:
                    worker_box.put(cmd)
        if self._validate:
            try:
                self.state.validate()
            except InvariantError:
                # The books are wrong: carrying on would hide the fault.
                log.critical("scheduler invariant broken after %r", events, exc_info=True)
                if self._on_invariant_error is None:
                    raise
                self._on_invariant_error()

    async def keep_time(self, interval: float = TICK_INTERVAL_S) -> None:
        """Feed the clock to the state machine (it never reads one itself)."""
        while True:
            now = time.monotonic()
            self.dispatch(Tick(now))
            for worker_id in self._liveness.expired(now, interval):
                self._silence(worker_id)
            await asyncio.sleep(interval)

    def _silence(self, worker_id: WorkerId) -> None:
        """Declare a worker that has said nothing for the ttl lost: end its
        stream (its late reports go nowhere) and re-place its tasks."""
        self._liveness.forget(worker_id)
        handler = self._worker_handlers.get(worker_id)
        if handler is None:
            return
        log.warning(
            "worker %d sent nothing for %.1fs (worker ttl); declaring it lost",
            worker_id,
            self._liveness.ttl,
        )
        self._silenced.add(worker_id)
        handler.cancel()

    # ------------------------------------------------------------ workers

    # read/write style (context.read/write), not the iterator style the stubs assume
    async def WorkerStream(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.WorkerToScheduler, pb.SchedulerToWorker],
    ) -> None:
        try:
            first = await wire.read_message(context)
            if first is grpc.aio.EOF:
                return
            assert isinstance(first, pb.WorkerToScheduler)
            if first.WhichOneof("kind") != "register":
                raise wire.WireError("the first message must be a RegisterWorker")
            reg = first.register
            registration = wire.registration_from_pb(reg)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        name, address = registration.name, registration.address
        taken = self.state.worker_named(name)
        same_process = (
            taken is not None
            and reg.pid
            and (taken.address, taken.pid)
            == (
                address,
                reg.pid,
            )
        )
        # One told to exit (retired, restarted) whose stream has not ended yet
        # gives its name up to the process that replaces it.
        replaced = taken is not None and taken.told_to_retire
        if taken is not None and not same_process and not replaced:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"the worker name {name!r} is taken by the worker at {taken.address} "
                f"(pid {taken.pid}); give this one another --name",
            )
        if taken is not None and (same_process or replaced):
            # The same process again, before its old stream was seen to end.
            await self._drop_stale_stream(taken.worker_id)
        resources = registration.resources
        worker_id = next(self._worker_ids)
        outbox: Outbox[Command] = Outbox()
        self._worker_outboxes[worker_id] = outbox
        log.info(
            "worker %s joined from %s (%d threads, %s)",
            name,
            address,
            reg.nthreads,
            dict(reg.resources),
        )
        if self.uploads:
            # Before anything the join brings: its tasks may import them.
            outbox.put(UploadFiles(worker_id, tuple(self.uploads.items())))
        held = tuple(HeldResult(h.key, h.incarnation, h.nbytes) for h in reg.held)
        self._liveness.heard(worker_id, time.monotonic())
        handler = asyncio.current_task()
        assert handler is not None
        self._worker_handlers[worker_id] = handler
        # Joined before it hears "registered": once the worker says it is
        # registered, the scheduler lists it. Its first assignments wait in
        # the outbox until the acknowledgement is written.
        self.dispatch(
            WorkerJoined(
                worker_id,
                name,
                address,
                reg.nthreads,
                resources,
                held,
                reg.pid,
                registration.host_id,
                registration.resources_text,
                registration.gpus,
                registration.memory_limit,
            )
        )
        self.worker_joined.set()
        if self.shutdown_asked.is_set():
            outbox.put(RetireWorker(worker_id))  # joined as everything stops: stop too
        reader: asyncio.Task[None] | None = None
        try:
            await context.write(
                pb.SchedulerToWorker(
                    registered=pb.WorkerRegistered(
                        worker_id=worker_id,
                        heartbeat_interval_s=self._liveness.heartbeat_interval,
                        client_token_sha256=self.client_token_sha256,
                        scheduler_token_sha256=self.scheduler_token_sha256,
                    )
                )
            )
            reader = asyncio.create_task(self._read_worker(worker_id, context, outbox))
            while True:
                cmds = await outbox.take_all()
                if outbox.closed:
                    break
                await context.write(wire.worker_batch_to_pb(cmds))
        except asyncio.CancelledError:
            if worker_id not in self._silenced:
                raise
            handler.uncancel()
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(
                f"declared lost: nothing heard for {self._liveness.ttl:g}s; register again"
            )
        finally:
            if reader is not None:
                reader.cancel()
            del self._worker_outboxes[worker_id]
            del self._worker_handlers[worker_id]
            self._silenced.discard(worker_id)
            self._liveness.forget(worker_id)
            log.info("worker %s (%s) left", name, address)
            self.dispatch(WorkerLeft(worker_id))

    async def _drop_stale_stream(self, worker_id: WorkerId) -> None:
        """End a worker's old stream (its process registers again) and wait
        until it has left, so one process never counts twice."""
        handler = self._worker_handlers.get(worker_id)
        if handler is None:
            return
        self._silenced.add(worker_id)
        handler.cancel()
        await asyncio.wait({handler}, timeout=STALE_STREAM_WAIT_S)

    async def _read_worker(
        self,
        worker_id: WorkerId,
        context: grpc.aio.ServicerContext[pb.WorkerToScheduler, pb.SchedulerToWorker],
        outbox: Outbox[Command],
    ) -> None:
        try:
            while True:
                msg = await wire.read_message(context)
                if msg is grpc.aio.EOF:
                    return
                self._liveness.heard(worker_id, time.monotonic())
                assert isinstance(msg, pb.WorkerToScheduler)
                if msg.WhichOneof("kind") != "reports":
                    kind = msg.WhichOneof("kind") or "unset (or unknown to this scheduler)"
                    raise wire.WireError(
                        f"WorkerToScheduler.kind after registering must be reports, not {kind}"
                    )
                self._apply_reports(worker_id, msg.reports)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        except Exception as exc:
            _refuse_stream(context, f"worker {worker_id}", exc)
        finally:
            outbox.close()

    def _apply_reports(self, worker_id: WorkerId, reports: pb.WorkerReports) -> None:
        """Check the whole batch, then apply it: a bad report (WireError) closes
        the stream before any of the batch changes the books.

        Runs that ended go first, then queued runs that started: whatever
        order they happened in on the worker, a start never finds the
        capacity here still taken by a run that ended before it."""
        wire.check_report_counts(reports)
        events: list[TaskFinished | TaskErred | TaskMissingInputs] = [
            *(
                wire.finished_from_pb(worker_id, done, f"WorkerReports.finished[{i}]")
                for i, done in enumerate(reports.finished)
            ),
            *(
                wire.erred_from_pb(worker_id, failed, f"WorkerReports.failed[{i}]")
                for i, failed in enumerate(reports.failed)
            ),
            *(
                wire.missing_from_pb(worker_id, missing, f"WorkerReports.missing_inputs[{i}]")
                for i, missing in enumerate(reports.missing_inputs)
            ),
        ]
        started = [
            wire.started_from_pb(worker_id, ref, f"WorkerReports.started[{i}]")
            for i, ref in enumerate(reports.started)
        ]
        worker = self.state.workers.get(worker_id)
        runs = worker.runs if worker is not None else {}
        queued = worker.queued if worker is not None else {}
        for event in (*events, *started):
            # A report ends the run it names; the run must be of the task it
            # names too, or ending it would free a lease the task still holds.
            run = runs.get(event.run_id) or queued.get(event.run_id)
            if run is not None and run.key != event.key:
                raise wire.WireError(
                    f"a report names run {event.run_id} of task {event.key!r}, "
                    f"but that run is of task {run.key!r}"
                )
        more: list[Event] = []
        acquired = wire.acquired_from_pb(worker_id, reports)
        if acquired is not None:
            more.append(acquired)
        gpu_use = wire.gpu_use_from_pb(worker_id, reports)
        if gpu_use is not None:
            more.append(gpu_use)
        memory = wire.memory_from_pb(worker_id, reports)
        if memory is not None:
            more.append(memory)
        if reports.retire_me:
            log.info("worker %d asks to retire (SIGTERM): draining it", worker_id)
            more.append(RetirementAsked((worker_id,)))
        self.dispatch_all((*events, *started, *more))

    # ------------------------------------------------------------ clients

    async def ClientStream(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.ClientToScheduler, pb.SchedulerToClient],
    ) -> None:
        try:
            first = await wire.read_message(context)
            if first is grpc.aio.EOF:
                return
            assert isinstance(first, pb.ClientToScheduler)
            if first.WhichOneof("kind") != "hello":
                raise wire.WireError("the first message must be a ClientHello")
            client_id, resume = wire.client_id_from_pb(first.hello)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        previous = self._client_handlers.get(client_id)
        if previous is not None:
            # The client reconnected before this side noticed its old stream
            # break: the new stream takes over (the old one ends quietly).
            log.info("client %s reconnected; closing its previous stream", client_id)
            previous.cancel()
            await asyncio.gather(previous, return_exceptions=True)
        handler = asyncio.current_task()
        assert handler is not None
        self._client_handlers[client_id] = handler
        outbox: Outbox[NotifyClient] = Outbox()
        self._client_outboxes[client_id] = outbox
        self.dispatch(ClientJoined(client_id, resume))
        said_goodbye = asyncio.Event()
        reader = asyncio.create_task(self._read_client(client_id, context, outbox, said_goodbye))
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
            if self._client_handlers.get(client_id) is handler:
                del self._client_handlers[client_id]
                del self._client_outboxes[client_id]
                if said_goodbye.is_set():
                    self.dispatch(ClientLeft(client_id))
                else:
                    # Broken, not closed: keep its tasks for the grace period.
                    self.dispatch(ClientDisconnected(client_id, time.monotonic()))

    async def _read_client(
        self,
        client_id: ClientId,
        context: grpc.aio.ServicerContext[pb.ClientToScheduler, pb.SchedulerToClient],
        outbox: Outbox[NotifyClient],
        said_goodbye: asyncio.Event,
    ) -> None:
        try:
            while True:
                msg = await wire.read_message(context)
                if msg is grpc.aio.EOF:
                    # Ended without a goodbye: a dead process's socket closes
                    # like this too, so it counts as a broken link.
                    return
                assert isinstance(msg, pb.ClientToScheduler)
                kind = msg.WhichOneof("kind")
                if kind == "goodbye":
                    said_goodbye.set()
                    return
                if kind == "submit":
                    await self._submit(client_id, msg.submit, outbox)
                elif kind == "cancel":
                    keys = wire.check_keys(msg.cancel.keys, "ClientToScheduler.cancel.keys")
                    self.dispatch(TasksCancelled(client_id, keys))
                elif kind == "release":
                    keys = wire.check_keys(msg.release.keys, "ClientToScheduler.release.keys")
                    self.dispatch(KeysReleased(client_id, keys))
                elif kind == "fire_and_forget":
                    keys = wire.check_keys(
                        msg.fire_and_forget.keys, "ClientToScheduler.fire_and_forget.keys"
                    )
                    self.dispatch(TasksForgotten(client_id, keys))
                else:
                    raise wire.WireError(
                        "ClientToScheduler.kind must be submit, cancel, release, "
                        "fire_and_forget or goodbye, not "
                        f"{kind or 'unset (or unknown to this scheduler)'}"
                    )
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        except Exception as exc:
            _refuse_stream(context, f"client {client_id}", exc)
        finally:
            outbox.close()

    async def _submit(
        self, client_id: ClientId, batch: pb.SubmitTasks, outbox: Outbox[NotifyClient]
    ) -> None:
        """Accept a batch of tasks, SUBMIT_CHUNK at a time: between chunks the
        writers send what was placed so far, so the first tasks start while
        the rest are still being read (a big batch, as the seed pipeline's,
        arrives in one message)."""
        wire.check_count(batch.tasks, wire.MAX_ITEMS_PER_MESSAGE, "SubmitTasks.tasks")
        tasks = batch.tasks
        for start in range(0, len(tasks), SUBMIT_CHUNK):
            if start:
                await asyncio.sleep(0)
            self._accept(client_id, tasks[start : start + SUBMIT_CHUNK], outbox)

    def _accept(
        self,
        client_id: ClientId,
        specs: Iterable[pb.TaskSpec],
        outbox: Outbox[NotifyClient],
    ) -> None:
        accepted = []
        for spec in specs:
            try:
                accepted.append(wire.submission_from_pb(spec))
            except wire.WireError as exc:
                # Refuse this task alone, telling the one who sent it why.
                outbox.put(
                    NotifyClient(
                        client_id,
                        spec.key,
                        TaskStatus.ERROR,
                        error=ErrorInfo("ValueError", str(exc), kind=ErrorKind.INVALID_TASK),
                    )
                )
        if accepted:
            self.dispatch(TasksSubmitted(client_id, tuple(accepted)))


def _refuse_stream(
    context: grpc.aio.ServicerContext[object, object], who: str, exc: Exception
) -> None:
    """Say why a worker's or client's stream ends over what it sent (called
    while ``exc`` is handled); the handler then ends the stream with this status."""
    if isinstance(exc, wire.WireError):  # a message that breaks the protocol: tell the sender
        log.warning("%s: %s; closing its stream", who, exc)
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(str(exc))
    else:  # our own failure on a message: logged whole, the sender hears only its type
        log.exception("%s: bad message; closing its stream", who)
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details(f"the scheduler failed on a message: {type(exc).__name__}")
