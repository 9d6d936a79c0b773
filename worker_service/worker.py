"""A worker process: one stream to the scheduler, task threads, a result store.

The scheduler may assign a run to this worker's queue (``queued``): it holds
nothing until the worker's own ledger has room for it. Queued runs start in
the scheduler's order (highest priority, then deepest in its graph, then the
oldest), the first that fits, each as a run ends; one that has waited longer
than QUEUE_OVERTAKE_S lets nothing behind it start first. A task thread that
ends a run takes up the next queued run itself when it fits and its inputs
are here; the loop hears of both together. Each start of a queued run is
reported (``started``), after the report of the run whose end made room for
it: reports go in the order things happen here. A queued run fetches its
inputs from peers while it waits, so that it holds its resources for its own
work only.

Lifecycle: ``start()`` serves the Worker service (peers fetch results from
it), then connects to the scheduler and registers. If the stream breaks, the
worker waits for the tasks it was running to return (their results are now
orphans), drops its results, and registers again with backoff. ``close()``
stops taking work, closes the stream and the server; tasks still running in
threads are abandoned (Python threads cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from apportion_common import boundary, serialize
from apportion_common.grpc_server import ServingHealth, bind, make_server
from apportion_common.security import (
    TLS,
    UNAUTHENTICATED_EXIT_CODE,
    Authorizer,
    ClientSecurity,
    Role,
    ServerSecurity,
    token_digest,
)
from apportion_common.task_context import TaskContext, set_task_context
from apportion_common.transfer import ChannelPool, ResultUnavailable
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from .ledger import Ledger, OverCommitted
from .servicer import WorkerServicer, add_worker_service
from .store import ResultStore
from .threads import TaskThreads

log = logging.getLogger("worker_service")

WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name
MAX_BACKOFF_S = 5.0
#: Results up to this size travel with the report (and on to the waiting
#: client), sparing it one fetch per task; larger ones are fetched in chunks.
INLINE_RESULT_BYTES = 16 * 1024
#: Inputs one task fetches from peers at the same time.
MAX_CONCURRENT_FETCHES = 16
#: Inputs at most this large (as the scheduler announces them) that live on
#: one peer come in one FetchResults call rather than a stream each.
SMALL_FETCH_BYTES = 64 * 1024
#: Seconds the oldest queued run may be overtaken by later ones that fit
#: before it; after that, nothing behind it starts until it does.
QUEUE_OVERTAKE_S = 1.0
#: How long a busy worker's reports wait for others to travel with them. No-op
#: tasks on 2 cores (2 workers x 2 threads): one message per report, 4,400
#: tasks/s and 440 us of CPU per task across all processes; with 1 ms (and
#: deeper queues, see scheduler_service.policy) 9,300 tasks/s and 220 us.
REPORT_COALESCE_S = 0.001


@dataclass(slots=True)
class _Reports:
    finished: list[pb.TaskFinished] = field(default_factory=list)
    failed: list[pb.TaskFailed] = field(default_factory=list)
    missing: list[pb.TaskMissingInputs] = field(default_factory=list)
    started: list[pb.RunRef] = field(default_factory=list)
    heartbeat: bool = False

    def __bool__(self) -> bool:
        return bool(self.finished or self.failed or self.missing or self.started or self.heartbeat)


@dataclass(slots=True)
class _Queued:
    """An assignment waiting here for room, holding nothing."""

    assignment: pb.TaskAssignment
    resources: dict[str, float]
    since: float
    #: (-priority, -depth, arrival): queued runs start in this order, as the
    #: scheduler would have placed them
    rank: tuple[int, int, int]
    #: its inputs, fetched while it waits (None: all of them are local)
    inputs: asyncio.Task[_Inputs] | None = None


def _rank(queued: _Queued) -> tuple[int, int, int]:
    return queued.rank


_Inputs = tuple[dict[str, serialize.Frames], list[tuple[str, int]], list[pb.MissingInput]]


@dataclass(slots=True)
class _Taken:
    """A queued run a task thread started itself (see _run_in_thread)."""

    assignment: pb.TaskAssignment


@dataclass(slots=True)
class _Outcome:
    """What a task thread hands back to the loop."""

    assignment: pb.TaskAssignment
    ok: bool
    outcome: serialize.Frames | serialize.ErrorInfo
    duration: float
    #: (key, nbytes) of inputs fetched from peers for it
    fetched: list[tuple[str, int]]


class WorkerRefused(Exception):
    """The scheduler refused this worker for good (bad settings, wrong token).

    Not SystemExit inside the task: that would tear the event loop down
    mid-flight; :func:`run_worker` turns it into the exit status after closing.
    """

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"refused by the scheduler (exit status {exit_code})")
        self.exit_code = exit_code


def advertised_host(scheduler_address: str) -> str:
    """The local address that routes to the scheduler (what peers should dial)."""
    host = scheduler_address.rsplit(":", 1)[0].strip("[]")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP connect sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class Worker:
    def __init__(
        self,
        scheduler_address: str,
        *,
        resources: Mapping[str, float] | None = None,
        nthreads: int = 1,
        name: str | None = None,
        host: str | None = None,
        port: int = 0,
        token: str | None = None,
        tls: TLS | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.resources = dict(resources or {})
        self.nthreads = nthreads
        self.host = host or advertised_host(scheduler_address)
        self.port = port
        self._name = name
        self.store = ResultStore()
        self.ledger = Ledger(self.resources, nthreads)
        self._threads = TaskThreads(nthreads)
        # What this worker presents, to the scheduler and to peers it fetches from.
        self._credentials = ClientSecurity(token, tls)
        # What its own server demands: the worker token, and the client token
        # (by digest) once the scheduler has told us it (_trust_clients).
        self._authorizer = None if token is None else Authorizer({Role.WORKER: token_digest(token)})
        self._security = ServerSecurity(self._authorizer, tls)
        self._server = make_server(self._security.interceptors())
        add_worker_service(WorkerServicer(self.store), self._server)
        self._health = ServingHealth(self._server, [WORKER_SERVICE])
        self._peers = ChannelPool(self._credentials)
        #: each run that holds resources here, done once it has ended
        self._running: dict[int, asyncio.Future[None]] = {}
        #: runs still fetching inputs before they go to a thread
        self._fetching: dict[int, asyncio.Task[None]] = {}
        #: what the task threads did that the loop has not heard yet (_hand_back)
        self._done: list[_Outcome | _Taken] = []
        #: queued runs a task thread took up, until the loop hears it
        self._taken: set[int] = set()
        #: the ledger, the queue, _done and _taken: task threads take queued
        #: runs themselves (_run_in_thread)
        self._lock = threading.Lock()
        #: queued runs by run id, in the order they were assigned
        self._queue: dict[int, _Queued] = {}
        #: the same runs in the order they start in (_Queued.rank)
        self._queue_order: list[_Queued] = []
        self._arrivals = itertools.count()
        self._cancelled: set[int] = set()
        self._reports = _Reports()
        self._wake_writer = asyncio.Event()
        #: ends a report's wait for company early: the worker ran out of work
        self._flush_reports = asyncio.Event()
        self._registered = asyncio.Event()
        self._stopping = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self.worker_id = 0
        #: (key, incarnation, nbytes) of results kept from a previous session
        self._held: list[tuple[str, int, int]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        return self._name or self.address

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.port = bind(self._server, self.host, self.port, self._security.credentials())
        self._security.warn_if_exposed(self.host, "this worker", log)
        await self._server.start()
        await self._health.set(True)
        self._main = asyncio.create_task(self._connect_forever())

    async def wait_registered(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout)

    async def close(self) -> None:
        self._stopping.set()
        self._clear_queue()
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        for task in [*self._fetching.values(), *self._running.values()]:
            task.cancel()
        await asyncio.gather(
            *self._fetching.values(), *self._running.values(), return_exceptions=True
        )
        await self._health.set(False)
        await self._server.stop(0.5)
        await self._peers.close()
        self._threads.shutdown()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------- connection

    async def _connect_forever(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                await self._session()
                backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and not self._registered.is_set():
                    # Its registration (settings) was refused: it would be again.
                    log.error("the scheduler refused this worker: %s", exc.details())
                    raise WorkerRefused(2) from None
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # The same credentials would be refused again: stop here.
                    log.error(
                        "the scheduler %s refused this worker (UNAUTHENTICATED: %s); "
                        "start it with the worker token: --token or APPORTION_TOKEN",
                        self.scheduler_address,
                        exc.details(),
                    )
                    raise WorkerRefused(UNAUTHENTICATED_EXIT_CODE) from None
                log.warning(
                    "scheduler %s unreachable (%s: %s); retrying in %.1fs",
                    self.scheduler_address,
                    exc.code().name,
                    exc.details(),
                    backoff,
                )
            self._registered.clear()
            await self._orphan_everything()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _orphan_everything(self) -> None:
        """After losing the scheduler: let running code return (its resources
        stay held until then), forget the reports the old stream never carried,
        and keep the results made here: registering again offers them, and the
        scheduler takes back those it still needs (a restart loses no work)."""
        self._clear_queue()  # never started: the scheduler places them again
        self._hand_back()  # runs a task thread took up just before count as running
        running = list(self._running.values())
        if running:
            log.info("waiting for %d running task(s) before registering again", len(running))
            await asyncio.gather(*running, return_exceptions=True)
        self._held = self.store.keep_only_own()
        self._reports = _Reports()
        self._cancelled.clear()

    async def _session(self) -> None:
        async with self._credentials.aio_channel(self.scheduler_address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            call = stub.WorkerStream(metadata=self._credentials.metadata)
            await call.write(
                pb.WorkerToScheduler(
                    register=pb.RegisterWorker(
                        name=self.name,
                        address=self.address,
                        nthreads=self.nthreads,
                        resources=self.resources,
                        pid=os.getpid(),
                        held=[
                            pb.HeldResult(key=key, incarnation=incarnation, nbytes=nbytes)
                            for key, incarnation, nbytes in self._held
                        ],
                    )
                )
            )
            first = await call.read()
            if first is grpc.aio.EOF:
                raise ConnectionError("the scheduler closed the stream before registering us")
            assert isinstance(first, pb.SchedulerToWorker)
            self.worker_id = first.registered.worker_id
            self._trust_clients(first.registered)
            interval = first.registered.heartbeat_interval_s or 2.0
            log.info(
                "registered with %s as worker %d (%s)",
                self.scheduler_address,
                self.worker_id,
                self.address,
            )
            self._registered.set()
            writer = asyncio.create_task(self._write_reports(call))
            heartbeat = asyncio.create_task(self._heartbeat(interval))
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        log.warning("the scheduler closed our stream")
                        return
                    assert isinstance(msg, pb.SchedulerToWorker)
                    self._on_instructions(msg.instructions)
            finally:
                writer.cancel()
                heartbeat.cancel()
                await asyncio.gather(writer, heartbeat, return_exceptions=True)
                call.cancel()

    def _trust_clients(self, registered: pb.WorkerRegistered) -> None:
        """Accept the scheduler's clients at FetchResult by the digest of their token.

        No digest: the scheduler lets clients in without a token, so a token
        here would protect nothing they could not already get through it.
        """
        if self._authorizer is not None:
            self._authorizer.set_role(Role.CLIENT, registered.client_token_sha256 or None)

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._reports.heartbeat = True
            self._wake_writer.set()

    async def _write_reports(self, call: Any) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            if not self._reports:
                continue
            if self._busy():
                # More reports are on their way: let them travel together.
                # Each message costs both ends tens of microseconds of CPU
                # whatever it carries; an idle worker reports at once, and
                # one that runs out of work meanwhile stops waiting.
                self._flush_reports.clear()
                timer = asyncio.get_running_loop().call_later(
                    REPORT_COALESCE_S, self._flush_reports.set
                )
                await self._flush_reports.wait()
                timer.cancel()
                self._wake_writer.clear()
            reports, self._reports = self._reports, _Reports()
            await call.write(
                pb.WorkerToScheduler(
                    reports=pb.WorkerReports(
                        finished=reports.finished,
                        failed=reports.failed,
                        missing_inputs=reports.missing,
                        heartbeat=reports.heartbeat,
                        started=reports.started,
                    )
                )
            )

    def _on_instructions(self, instructions: pb.WorkerInstructions) -> None:
        # A malformed instruction is logged and skipped: it must neither crash
        # the worker nor get into its ledger.
        if instructions.HasField("declared"):
            try:
                declared = boundary.check_amounts(
                    instructions.declared.amounts, "WorkerInstructions.declared"
                )
            except boundary.WireError as exc:
                log.error("ignoring a declaration from the scheduler: %s", exc)
            else:
                self.resources = declared
                with self._lock:
                    self.ledger.declare(self.resources)
                log.info("now declaring %s", self.resources)
        for ref in instructions.release:
            self.store.release(ref.key, ref.run_id)
        for ref in instructions.cancel:
            with self._lock:
                running = ref.run_id in self._running or ref.run_id in self._taken
                queued = None if running else self._dequeue(ref.run_id)
            if running:
                self._cancelled.add(ref.run_id)
            elif queued is not None:
                # Dropped unstarted; reported as a cancelled run is.
                self._drop_prefetch(queued)
                error = serialize.error_info(asyncio.CancelledError("cancelled"))
                self._fail(queued.assignment, error)
        for i, assignment in enumerate(instructions.assign):
            try:
                boundary.check_assignment(assignment, f"WorkerInstructions.assign[{i}]")
            except boundary.WireError as exc:
                log.error("skipping a malformed assignment: %s", exc)
                if assignment.run_id >= 1 and 0 < len(assignment.key) <= boundary.MAX_KEY_LENGTH:
                    # Report it, so the scheduler frees the run's lease and
                    # the submitter hears why.
                    self._fail(assignment, serialize.error_info(exc))
                continue
            run_id = assignment.run_id
            if run_id in self._running or run_id in self._queue or run_id in self._taken:
                log.error("skipping run %d: it is here already", assignment.run_id)
                continue
            resources = dict(assignment.resources)
            if not assignment.queued:
                self._start(assignment, resources)
            elif not self.ledger.could_ever_fit(resources):
                # The scheduler queued it here for good: it would never start.
                self._fail(
                    assignment,
                    serialize.error_info(
                        OverCommitted(
                            f"run {assignment.run_id} needs more than this worker declares"
                        )
                    ),
                )
            else:
                loop = asyncio.get_running_loop()
                rank = (-assignment.priority, -assignment.depth, next(self._arrivals))
                queued = _Queued(assignment, resources, loop.time(), rank)
                if any(self.store.get(item.key) is None for item in assignment.inputs):
                    queued.inputs = asyncio.create_task(self._gather_inputs(assignment))
                with self._lock:
                    self._queue[assignment.run_id] = queued
                    bisect.insort(self._queue_order, queued, key=_rank)
        self._start_queued()

    def _clear_queue(self) -> None:
        with self._lock:
            dropped, self._queue = self._queue, {}
            self._queue_order = []
        for queued in dropped.values():
            if queued.inputs is not None:
                queued.inputs.cancel()

    def _drop_prefetch(self, queued: _Queued) -> None:
        """A queued run that will not start here: stop fetching its inputs and
        drop the copies fetched for it alone (the scheduler never heard of them)."""
        prefetch = queued.inputs
        if prefetch is None:
            return
        if not prefetch.done():
            prefetch.cancel()
            return  # what it stored so far stays until the worker re-registers
        if not prefetch.cancelled() and prefetch.exception() is None:
            for key, _ in prefetch.result()[1]:
                self.store.release(key, 0)

    # ------------------------------------------------------------ running

    def _start(self, a: pb.TaskAssignment, resources: dict[str, float]) -> None:
        """A run assigned to start at once: take its resources here and start
        it (or refuse it, should the scheduler's books and ours disagree)."""
        try:
            with self._lock:
                self.ledger.acquire(a.run_id, resources)
        except OverCommitted as exc:
            self._fail(a, serialize.error_info(exc))
            return
        self._launch(a, resources)

    def _launch(
        self,
        a: pb.TaskAssignment,
        resources: dict[str, float],
        prefetch: asyncio.Task[_Inputs] | None = None,
    ) -> None:
        """A run that holds its resources here: to a task thread, or first
        to fetch its inputs."""
        if a.queued:
            self._reports.started.append(pb.RunRef(key=a.key, run_id=a.run_id))
            self._wake_writer.set()
        loop = asyncio.get_running_loop()
        self._running[a.run_id] = loop.create_future()
        values = None if prefetch is not None else self._local_inputs(a)
        if values is not None:
            # Everything at hand (the common case): straight to a thread, no
            # asyncio task, and runs that end together wake the loop once.
            # No-op tasks on 2 x 2 threads, interleaved runs: with a task and
            # an executor future per run (each ending in its own wake-up) the
            # workers spent 115-155 us of CPU per task; this way 95-111 us.
            self._threads.submit(self._run_in_thread, loop, a, values, resources, [])
        else:
            self._fetching[a.run_id] = asyncio.create_task(
                self._fetch_then_run(a, resources, prefetch)
            )

    def _start_queued(self) -> None:
        """Start queued runs that fit now: in order, the first that fits, until
        none does. One that has waited QUEUE_OVERTAKE_S blocks those behind it
        (it would starve behind a stream of smaller ones).

        What the task threads did is taken in the same hold of the lock as
        each pick and reported first: a run a thread ended may have freed the
        room the pick takes, and the scheduler must hear of that end before
        it hears of this start."""
        while True:
            with self._lock:
                done = self._take_done()
                chosen = self._next_queued()
                if chosen is not None:
                    self._dequeue(chosen.assignment.run_id)
                    self.ledger.acquire(chosen.assignment.run_id, chosen.resources)
            self._apply_done(done)
            if chosen is None:
                return
            self._launch(chosen.assignment, chosen.resources, chosen.inputs)

    def _dequeue(self, run_id: int) -> _Queued | None:
        """(Holding _lock.) Take a run out of the queue."""
        queued = self._queue.pop(run_id, None)
        if queued is not None:
            self._queue_order.remove(queued)
        return queued

    def _next_queued(self) -> _Queued | None:
        """(Holding _lock.) The queued run to start next, if one fits now."""
        now = time.monotonic()  # the loop's clock too (queued.since)
        for queued in self._queue_order:
            if self.ledger.fits(queued.resources):
                return queued
            if now - queued.since >= QUEUE_OVERTAKE_S:
                return None
        return None

    def _take_queued(self) -> tuple[_Queued, _Inputs] | None:
        """(Holding _lock, in a task thread.) Take the next queued run, with
        its inputs, if it fits now and every input is here (or was fetched
        for it); else None, and the loop starts it when it next looks."""
        if self._stopping.is_set():
            return None
        queued = self._next_queued()
        if queued is None:
            return None
        prefetch = queued.inputs
        if prefetch is None:
            values = self._local_inputs(queued.assignment)
            if values is None:
                return None
            inputs: _Inputs = (values, [], [])
        else:
            # Reading a finished task's result is safe from any thread.
            if not prefetch.done() or prefetch.cancelled() or prefetch.exception() is not None:
                return None
            inputs = prefetch.result()
            if inputs[2]:
                return None  # some are missing: the loop reports that
        run_id = queued.assignment.run_id
        self._dequeue(run_id)
        self.ledger.acquire(run_id, queued.resources)
        self._taken.add(run_id)
        return queued, inputs

    def _local_inputs(self, a: pb.TaskAssignment) -> dict[str, serialize.Frames] | None:
        """The run's inputs if this worker holds every one, else None."""
        values: dict[str, serialize.Frames] = {}
        for item in a.inputs:
            local = self.store.get(item.key)
            if local is None:
                return None
            values[item.key] = local
        return values

    async def _fetch_then_run(
        self,
        a: pb.TaskAssignment,
        resources: dict[str, float],
        prefetch: asyncio.Task[_Inputs] | None,
    ) -> None:
        """A run whose inputs are not all here: get them, then to a thread."""
        handed_over = False
        try:
            if prefetch is not None:
                values, fetched, missing = await prefetch
            else:
                values, fetched, missing = await self._gather_inputs(a)
            if missing:
                self._reports.missing.append(
                    pb.TaskMissingInputs(key=a.key, run_id=a.run_id, inputs=missing)
                )
            elif a.run_id in self._cancelled:
                self._fail(a, serialize.error_info(asyncio.CancelledError("cancelled")))
            else:
                loop = asyncio.get_running_loop()
                self._threads.submit(self._run_in_thread, loop, a, values, resources, fetched)
                handed_over = True
        finally:
            self._fetching.pop(a.run_id, None)
            if not handed_over:
                self._end(a)
                self._start_queued()
                self._wake_writer.set()

    def _run_in_thread(
        self,
        loop: asyncio.AbstractEventLoop,
        a: pb.TaskAssignment,
        values: dict[str, serialize.Frames],
        resources: dict[str, float],
        fetched: list[tuple[str, int]],
    ) -> None:
        """In a task thread: run it, give back what it held, then take up the
        next queued run that fits and has its inputs here, without waiting
        for the loop (which hears of both, batched with whatever else the
        threads did meanwhile: one wake-up for all)."""
        while True:
            ok, outcome, duration = self._execute(a.key, a.payload, values, resources)
            with self._lock:
                self.ledger.release(a.run_id)
                was_empty = not self._done
                self._done.append(_Outcome(a, ok, outcome, duration, fetched))
                taken = self._take_queued()
                if taken is not None:
                    self._done.append(_Taken(taken[0].assignment))
            if was_empty:
                with contextlib.suppress(RuntimeError):  # the loop has closed: the worker is gone
                    loop.call_soon_threadsafe(self._hand_back)
            if taken is None:
                return
            a, resources = taken[0].assignment, taken[0].resources
            values, fetched, _ = taken[1]

    def _hand_back(self) -> None:
        """On the loop: report what the task threads did, then start what
        now fits (_start_queued takes their news first)."""
        self._start_queued()
        self._wake_writer.set()

    def _take_done(self) -> list[_Outcome | _Taken]:
        """(Holding _lock.) What the task threads did since the last call."""
        done, self._done = self._done, []
        self._taken.difference_update(
            item.assignment.run_id for item in done if isinstance(item, _Taken)
        )
        return done

    def _busy(self) -> bool:
        """Runs are going on here or waiting in the queue (more reports soon)."""
        return bool(self._running or self._queue or self._taken)

    def _apply_done(self, done: list[_Outcome | _Taken]) -> None:
        """Report, in the order they happened, the runs threads ended and the
        queued runs they took up."""
        if not done:
            return
        loop = asyncio.get_running_loop()
        for item in done:
            if isinstance(item, _Taken):
                a = item.assignment
                self._reports.started.append(pb.RunRef(key=a.key, run_id=a.run_id))
                self._running[a.run_id] = loop.create_future()
            else:
                self._report(item)
                self._finish(item.assignment)
        self._wake_writer.set()
        if not self._busy():
            self._flush_reports.set()

    def _report(self, done: _Outcome) -> None:
        a, outcome = done.assignment, done.outcome
        if a.run_id in self._cancelled:
            self._fail(a, serialize.error_info(asyncio.CancelledError("cancelled")))
        elif done.ok:
            assert isinstance(outcome, serialize.Frames)
            self.store.put(a.key, a.run_id, outcome, a.incarnation)
            inline = not outcome.buffers and outcome.nbytes <= INLINE_RESULT_BYTES
            self._reports.finished.append(
                pb.TaskFinished(
                    key=a.key,
                    run_id=a.run_id,
                    nbytes=outcome.nbytes,
                    fetched_keys=[k for k, _ in done.fetched],
                    fetched_nbytes=[n for _, n in done.fetched],
                    inline_result=outcome.pickled if inline else b"",
                    duration_s=done.duration,
                )
            )
        else:
            assert isinstance(outcome, serialize.ErrorInfo)
            self._fail(a, outcome)

    def _end(self, a: pb.TaskAssignment) -> None:
        """The run never reached a thread: give back what it held."""
        with self._lock:
            self.ledger.release(a.run_id)
        self._finish(a)

    def _finish(self, a: pb.TaskAssignment) -> None:
        """The run has ended and its resources are back in the ledger."""
        self._cancelled.discard(a.run_id)
        ended = self._running.pop(a.run_id, None)
        if ended is not None and not ended.done():
            ended.set_result(None)

    def _fail(self, a: pb.TaskAssignment, error: serialize.ErrorInfo) -> None:
        self._reports.failed.append(
            pb.TaskFailed(
                key=a.key,
                run_id=a.run_id,
                error=pb.TaskError(
                    type_name=error.type_name,
                    message=error.message,
                    traceback=error.traceback,
                    exception=error.exception,
                ),
            )
        )
        self._wake_writer.set()

    async def _gather_inputs(self, a: pb.TaskAssignment) -> _Inputs:
        values: dict[str, serialize.Frames] = {}
        fetched: list[tuple[str, int]] = []
        missing: list[pb.MissingInput] = []
        remote: dict[str, pb.InputLocation] = {}
        for item in a.inputs:
            local = self.store.get(item.key)
            if local is not None:
                values[item.key] = local
            else:
                remote.setdefault(item.key, item)
        if not remote:
            return values, fetched, missing
        together = await self._fetch_small_together(a.key, remote.values())
        for key, small in together.items():
            del remote[key]
            self.store.put(key, 0, small)
            values[key] = small
            fetched.append((key, small.nbytes))
        # The rest fetched side by side, a few at a time: one after another,
        # the seed pipeline's aggregate waited a round trip per input (200
        # inputs: 120-150 ms; side by side 55-100 ms, measured on 2 busy cores).
        limit = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)

        async def fetch(item: pb.InputLocation) -> tuple[serialize.Frames | None, list[str]]:
            tried: list[str] = []
            async with limit:
                for address in item.addresses:
                    if address != self.address:  # our own copy would have been local
                        try:
                            return await self._peers.fetch(address, item.key), tried
                        except ResultUnavailable as exc:
                            log.warning("task %s: input %s", a.key, exc)
                    tried.append(address)
            return None, tried

        outcomes = await asyncio.gather(*(fetch(item) for item in remote.values()))
        for key, (data, tried) in zip(remote, outcomes, strict=True):
            if data is None:
                missing.extend(pb.MissingInput(key=key, address=t) for t in tried or [""])
            else:
                self.store.put(key, 0, data)
                values[key] = data
                fetched.append((key, data.nbytes))
        return values, fetched, missing

    async def _fetch_small_together(
        self, task_key: str, inputs: Iterable[pb.InputLocation]
    ) -> dict[str, serialize.Frames]:
        """Small inputs that live on the same peer, fetched in one round trip
        per peer (FetchResults); what does not come back this way is fetched
        one by one after (another holder, a result larger than announced)."""
        by_peer: dict[str, list[str]] = {}
        for item in inputs:
            if item.nbytes <= SMALL_FETCH_BYTES:
                peer = next((a for a in item.addresses if a != self.address), None)
                if peer is not None:
                    by_peer.setdefault(peer, []).append(item.key)
        groups = [(peer, keys) for peer, keys in by_peer.items() if len(keys) > 1]
        if not groups:
            return {}

        async def fetch(peer: str, keys: list[str]) -> dict[str, serialize.Frames]:
            try:
                return await self._peers.fetch_small(peer, keys, SMALL_FETCH_BYTES)
            except ResultUnavailable as exc:
                log.warning("task %s: inputs %s", task_key, exc)
                return {}

        found: dict[str, serialize.Frames] = {}
        for part in await asyncio.gather(*(fetch(peer, keys) for peer, keys in groups)):
            found.update(part)
        return found

    def _execute(
        self,
        key: str,
        payload: bytes,
        inputs: dict[str, serialize.Frames],
        resources: dict[str, float],
    ) -> tuple[bool, serialize.Frames | serialize.ErrorInfo, float]:
        """Runs in a pool thread: unpickle, call, pickle; also returns how many
        seconds that took (the scheduler sizes queues from it). Never raises."""
        began = time.perf_counter()
        ok, outcome = self._call(key, payload, inputs, resources)
        return ok, outcome, time.perf_counter() - began

    def _call(
        self,
        key: str,
        payload: bytes,
        inputs: dict[str, serialize.Frames],
        resources: dict[str, float],
    ) -> tuple[bool, serialize.Frames | serialize.ErrorInfo]:
        try:
            fn, args, kwargs = serialize.loads(payload)
        except BaseException as exc:  # a garbage payload must not kill the worker
            return False, _wrapped(exc, f"cannot unpickle the function of task {key!r}")
        try:
            if inputs:
                values = {k: serialize.loads(v) for k, v in inputs.items()}
                args = serialize.substitute_inputs(args, values)
                kwargs = serialize.substitute_inputs(kwargs, values)
            set_task_context(TaskContext(key, self.address, self.name, resources))
            try:
                result = fn(*args, **kwargs)
            finally:
                set_task_context(None)
        except BaseException as exc:  # the task's own error, reported with its type
            return False, serialize.error_info(exc)
        try:
            return True, serialize.dumps_result(result)
        except BaseException as exc:
            return False, _wrapped(
                exc,
                f"the result of task {key!r} (a {type(result).__qualname__}) cannot be pickled",
                serialize.SerializationError,
            )


def _wrapped(
    exc: BaseException, message: str, kind: type[Exception] = serialize.SerializationError
) -> serialize.ErrorInfo:
    wrapper = kind(f"{message}: {type(exc).__name__}: {exc}")
    wrapper.__cause__ = exc
    info = serialize.error_info(wrapper)
    return info


async def run_worker(
    scheduler_address: str,
    *,
    resources: Mapping[str, float],
    nthreads: int,
    name: str | None,
    host: str | None = None,
    port: int = 0,
    handle_signals: bool = True,
    token: str | None = None,
    tls: TLS | None = None,
) -> None:
    """Run one worker until SIGINT/SIGTERM."""
    from apportion_common.grpc_server import install_stop_signals

    worker = Worker(
        scheduler_address,
        resources=resources,
        nthreads=nthreads,
        name=name,
        host=host,
        port=port,
        token=token,
        tls=tls,
    )
    await worker.start()
    print(f"apportion worker {worker.name} serving on {worker.address}", flush=True)
    stop = asyncio.Event()
    if handle_signals:
        install_stop_signals(stop)
    assert worker._main is not None
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopper, worker._main}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    await worker.close()
    if worker._main in done and not stop.is_set():
        refused = worker._main.exception()
        if isinstance(refused, WorkerRefused):
            # Only now, with everything closed: the log line said why, no traceback.
            raise SystemExit(refused.exit_code)
        worker._main.result()  # re-raise why the worker gave up
