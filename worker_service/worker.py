"""A worker process: what the scheduler says, through the state machine, into task threads.

The parts, each in its own module: :mod:`.stream` talks to the scheduler
(:class:`~.stream.SchedulerLink`); :mod:`.state` decides which runs hold
leases and start (:class:`~.state.WorkerState`, pure); :mod:`.inputs` fetches
inputs from peers; :mod:`.execute` runs task code in the task threads
(:mod:`.threads`); :mod:`.store` keeps results, which peers and clients fetch
from this worker's own server (:mod:`.servicer`). This module wires them:
each instruction becomes a stimulus of the state machine, and each run it
starts goes to a task thread (first fetching its inputs when they are not
here).

The state machine is shared with the task threads under one lock: a thread
that ends a run gives its lease back and, in the same hold of the lock, takes
up the next queued run that now fits and has its inputs here, without a round
trip through the loop; the loop hears of both afterwards, batched with
whatever else the threads did meanwhile. Reports go in the order things
happened here: a start is never reported before the end that made its room,
because every stimulus on the loop first hears what the threads did.

Lifecycle: ``start()`` serves the Worker service (peers fetch results from
it), then connects to the scheduler and registers. If the stream breaks, the
worker waits for the tasks it was running to return, keeps the results it
made, and registers again with backoff, offering them. ``close()`` stops
taking work, closes the stream and the server; tasks still running in threads
are abandoned (Python threads cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from apportion_common import boundary, serialize, shm
from apportion_common.gpus import GpuDevice
from apportion_common.grpc_server import ServingHealth, bind, make_server
from apportion_common.host import advertised_host, host_id
from apportion_common.process_memory import Resident
from apportion_common.resources import matching_spellings, to_quanta
from apportion_common.security import (
    TLS,
    Authorizer,
    ClientSecurity,
    Role,
    ServerSecurity,
    token_digest,
)
from apportion_common.serialize import Frames
from apportion_common.task_context import TaskContext
from apportion_common.transfer import ChannelPool

from . import wire
from .assignment import Assignment
from .execute import Outcome, execute
from .inputs import SHARE_MIN_BYTES, InputFetcher, Inputs, local_inputs
from .isolated import IsolatedRunner
from .ledger import OverCommitted
from .memory import MemoryFractions, MemoryPolicy
from .monitor import MemoryMonitor
from .retiring import RESTART_EXIT_CODE, Retiring
from .servicer import WORKER_SERVICE, WorkerServicer, add_worker_service
from .spill import SpillDirectory, remove_orphans
from .state import GPU, InvariantError, Refused, WorkerState
from .store import ResultStore
from .stream import SchedulerLink
from .threads import TaskThreads
from .uploads import Uploads

log = logging.getLogger("worker_service")

#: Results up to this size travel with the report (and on to the waiting
#: client), sparing it one fetch per task; larger ones are fetched in chunks.
INLINE_RESULT_BYTES = 16 * 1024
#: The exit status of a worker whose books broke (with validation on).
INVARIANT_EXIT_CODE = 70

T = TypeVar("T")


@dataclass(slots=True)  # not frozen: one is made per run (see Assignment)
class _Ran:
    """A task thread ran ``assignment``; its lease is back in the books."""

    assignment: Assignment
    outcome: Outcome
    #: (key, nbytes) of inputs fetched from peers for it
    fetched: list[tuple[str, int]]
    #: the scheduler cancelled it while it ran: reported as cancelled
    cancelled: bool


@dataclass(slots=True)  # not frozen: one is made per run (see Assignment)
class _Began:
    """A queued run started when a thread's run ended: that thread runs it
    (``in_thread``), or the loop launches it."""

    assignment: Assignment
    in_thread: bool


def _cancelled_error() -> serialize.ErrorInfo:
    return serialize.error_info(asyncio.CancelledError("cancelled"))


class Worker:
    def __init__(
        self,
        scheduler_address: str,
        *,
        resources: Mapping[str, float] | None = None,
        resources_text: Mapping[str, str] | None = None,
        nthreads: int = 1,
        name: str | None = None,
        host: str | None = None,
        port: int = 0,
        token: str | None = None,
        tls: TLS | None = None,
        validate: bool = False,
        shared_memory: bool = True,
        death_timeout: float | None = None,
        gpus: Sequence[GpuDevice] = (),
        isolate_gpu_tasks: bool = False,
        memory_limit: int = 0,
        memory: MemoryFractions | None = None,
        local_directory: str | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.resources = dict(resources or {})
        #: the amounts as the user wrote them (MEMORY="100GB"), told the scheduler
        self.resources_text = matching_spellings(self.resources, resources_text or {})
        self.nthreads = nthreads
        self.host = host or advertised_host(scheduler_address)
        self.port = port
        self._name = name
        #: the GPUs this process may use (GPU=auto); none: GPU is just a number
        self.gpus = tuple(gpus)
        #: run every task that holds a GPU in a child process seeing only its own
        self.isolate_gpu_tasks = isolate_gpu_tasks
        #: bytes of memory this process may use (0: none); not the MEMORY resource
        self.memory_limit = memory_limit
        self.local_directory = local_directory
        self._spill_dir = SpillDirectory(local_directory)
        self.store = ResultStore(self._spill_dir)
        #: the run queue and the ledger; shared with the task threads under _lock
        self.state = WorkerState(to_quanta(self.resources), nthreads, [g.id for g in self.gpus])
        #: child processes for tasks that must see only their own GPUs
        self._isolated = IsolatedRunner(max_per_pool=nthreads)
        self._lock = threading.Lock()
        #: what the task threads did that the loop has not heard yet
        self._news: list[_Ran | _Began] = []
        #: check the state machine after every stimulus (tests; costs time)
        self._validate = validate
        #: set when validation found a fault (the worker exits on it when run
        #: from the command line: see run_worker)
        self.broken: InvariantError | None = None
        self.on_broken: Callable[[], None] | None = None
        self._threads = TaskThreads(nthreads)
        # What this worker presents, to the scheduler and to peers it fetches from.
        credentials = ClientSecurity(token, tls)
        # What its own server demands: the worker token, and the client token
        # (by digest) once the scheduler has told us it (on_registered).
        self._authorizer = None if token is None else Authorizer({Role.WORKER: token_digest(token)})
        self._security = ServerSecurity(self._authorizer, tls)
        self._server = make_server(self._security.interceptors())
        #: files clients uploaded for tasks to import
        self.uploads = Uploads()
        add_worker_service(WorkerServicer(self.store, self.uploads), self._server)
        self._health = ServingHealth(self._server, [WORKER_SERVICE])
        self._peers = ChannelPool(credentials)
        #: registered: peers with the same id take large results through
        #: shared memory ("": this worker neither gives nor takes that way)
        self.host_id = host_id() if shared_memory and shm.available() else ""
        self._fetcher = InputFetcher(self.store, self._peers, self.address, bool(self.host_id))
        #: other workers on this host, as the scheduler last said: large results
        #: go into shared memory as they are made only while there are some
        self.host_peers = 0
        self._link = SchedulerLink(scheduler_address, credentials, self, death_timeout)
        self.retiring = Retiring(self.store, self._fetcher, self._link)
        #: each run holding a lease here, on the loop's side: done once it ended
        self._running: dict[int, asyncio.Future[None]] = {}
        #: runs fetching their inputs before they go to a thread
        self._fetching: dict[int, asyncio.Task[None]] = {}
        #: queued runs' inputs, fetched while they wait
        self._prefetches: dict[int, asyncio.Task[Inputs]] = {}
        self._stopping = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        #: (key, incarnation, nbytes) of results kept from a previous session
        self._held: list[tuple[str, int, int]] = []
        policy = MemoryPolicy(memory_limit, memory)
        self.memory = MemoryMonitor(policy, self.store, Resident(), self._pause, self._link)
        self._monitoring: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        return self._name or self.address

    @property
    def worker_id(self) -> int:
        return self._link.worker_id

    @property
    def busy(self) -> bool:
        return self.state.busy

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self.host_id:
            shm.remove_orphans()  # of workers on this host killed before they could
        remove_orphans(self.local_directory)  # spilled by workers killed, the same way
        self.port = bind(self._server, self.host, self.port, self._security.credentials())
        self._fetcher.own_address = self.address
        self._security.warn_if_exposed(self.host, "this worker", log)
        await self._server.start()
        await self._health.set(True)
        self._monitoring = asyncio.create_task(self.memory.run())
        self._main = asyncio.create_task(self._link.run_forever(self._stopping))

    async def wait_registered(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._link.registered.wait(), timeout)

    async def close(self) -> None:
        self._stopping.set()
        self._drop_queue()
        for ongoing in (self._main, self._monitoring):
            if ongoing is not None:
                ongoing.cancel()
                await asyncio.gather(ongoing, return_exceptions=True)
        for task in [*self._fetching.values(), *self._running.values()]:
            task.cancel()
        await asyncio.gather(
            *self._fetching.values(), *self._running.values(), return_exceptions=True
        )
        await self.retiring.close()
        await self._health.set(False)
        await self._server.stop(0.5)
        await self._peers.close()
        self._threads.shutdown()
        self._isolated.shutdown()
        self.store.clear()  # its shared-memory segments and spill files with it
        self._spill_dir.close()
        self.uploads.close()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------- the link's calls (LinkOwner)

    def registration_held(self) -> list[tuple[str, int, int]]:
        return self._held

    def on_registered(self, client_token_sha256: bytes, scheduler_token_sha256: bytes) -> None:
        """Accept the scheduler's clients at FetchResult by the digest of their
        token, and the scheduler's own secret at GetLogs (its dashboard's).

        No client digest: the scheduler lets clients in without a token, so a
        token here would protect nothing they could not already get through it.
        """
        if self._authorizer is not None:
            self._authorizer.set_role(Role.CLIENT, client_token_sha256 or None)
            # No scheduler digest (an older scheduler): no one gets in that way.
            if scheduler_token_sha256:
                self._authorizer.set_role(Role.SCHEDULER, scheduler_token_sha256)
            else:
                self._authorizer.forget_role(Role.SCHEDULER)
        self.retiring.registered()
        self.memory.resend()  # a paused worker must not be sent work
        if self.state.devices is not None:
            # A scheduler that has just met us knows no holders yet: tell it.
            with self._lock:
                self.state.devices.changed = True
                self._tell_devices()

    async def orphan_everything(self) -> None:
        """After losing the scheduler: let running code return (its resources
        stay held until then) and keep the results made here: registering
        again offers them, and the scheduler takes back those it still needs
        (a restart loses no work)."""
        self._drop_queue()  # never started: the scheduler places them again
        self._hear_threads()  # runs a thread took up just before count as running
        running = list(self._running.values())
        if running:
            log.info("waiting for %d running task(s) before registering again", len(running))
            await asyncio.gather(*running, return_exceptions=True)
        self._held = self.store.keep_only_own()

    def on_instructions(self, instructions: wire.Instructions) -> None:
        # A malformed instruction is logged and skipped: it must neither crash
        # the worker nor get into its ledger.
        if instructions.declared_refused:
            log.error(
                "ignoring a declaration from the scheduler: %s", instructions.declared_refused
            )
        if instructions.host_peers is not None and self.host_id:
            self.host_peers = instructions.host_peers
        # Here, before the batch's assignments: their tasks may import them.
        self.uploads.add_from_scheduler(instructions.files)
        for item in instructions.replicate:
            self.retiring.replicate(item)
        if instructions.retire:
            log.info("drained: retiring")
            self.retiring.retired.set()
        if instructions.restart:
            log.info("restarting, as the scheduler asks")
            self.retiring.exit_code = RESTART_EXIT_CODE
            self.retiring.retired.set()
        declared = instructions.declared
        if declared is not None:
            self.resources = declared
            self.resources_text = matching_spellings(declared, self.resources_text)
            log.info("now declaring %s", self.resources)
            for started in self._stimulus(self.state.declare, to_quanta(declared)):
                self._launch(started)
        for key, run_id in instructions.release:
            self.store.release(key, run_id)
        for run_id in instructions.cancel:
            dropped = self._stimulus(self.state.cancel, run_id)
            if dropped is not None:
                # Dropped unstarted; reported as a cancelled run is.
                self._drop_prefetch(dropped.run_id)
                self._report_failure(dropped, _cancelled_error())
        for a in instructions.assign:
            if isinstance(a, wire.Malformed):
                log.error("skipping a malformed assignment: %s", a.reason)
                if a.run_id:
                    error = serialize.error_info(boundary.WireError(a.reason))
                    self._link.reports.failed.append(wire.Failed(a.key, a.run_id, error))
                    self._link.wake()
            else:
                self._assign(a)

    # ------------------------------------------------------------ stimuli

    def _stimulus(self, stimulus: Callable[..., T], *args: object) -> T:
        """Apply a stimulus on the loop: first hear what the threads did (their
        ends may have made the room this takes), then the stimulus itself."""
        with self._lock:
            news, self._news = self._news, []
            outcome = stimulus(*args)
            if self._validate:
                self._check()
            self._tell_devices()
        self._hear(news)
        return outcome

    def _tell_devices(self) -> None:
        """(Holding _lock.) Queued runs that took their lease but wait for a
        device have started, as far as the scheduler's books go; and the
        scheduler shows which task holds which GPU."""
        state = self.state
        if state.started_waiting:
            self._link.reports.started += [(a.key, a.run_id) for a in state.started_waiting]
            state.started_waiting = []
            self._link.wake()
        if state.devices is not None and state.devices.changed:
            state.devices.changed = False
            self._link.reports.gpu_use = state.devices.holders()
            self._link.wake()

    def _check(self) -> None:
        """(Holding _lock.) The state machine's invariants, after a stimulus."""
        try:
            self.state.validate()
        except InvariantError as exc:
            log.critical("worker invariant broken: %s", exc)
            self.broken = exc
            if self.on_broken is not None:
                self.on_broken()

    def _assign(self, a: Assignment) -> None:
        admitted = self._stimulus(self.state.assign, a)
        if isinstance(admitted, Refused):
            if admitted.report:
                self._report_failure(a, serialize.error_info(OverCommitted(admitted.reason)))
            else:
                log.error("skipping run %d: %s", a.run_id, admitted.reason)
        elif admitted is not None:
            self._launch(admitted)
        elif any(item.key not in self.store for item in a.inputs):
            # Queued: fetch its inputs while it waits, so that it holds its
            # resources for its own work only.
            self._prefetches[a.run_id] = asyncio.create_task(self._fetcher.gather(a))

    def _pause(self, paused: bool) -> None:
        """Memory crossed the pause fraction: start nothing new, or resume."""
        for started in self._stimulus(self.state.pause, paused):
            self._launch(started)

    def _drop_queue(self) -> None:
        with self._lock:
            dropped = self.state.drop_queue()
        for a in dropped:
            prefetch = self._prefetches.pop(a.run_id, None)
            if prefetch is not None:
                prefetch.cancel()

    def _drop_prefetch(self, run_id: int) -> None:
        """A queued run that will not start here: stop fetching its inputs."""
        prefetch = self._prefetches.pop(run_id, None)
        if prefetch is None:
            return
        if not prefetch.done():
            prefetch.cancel()
            return  # what it stored so far stays until the worker re-registers
        if not prefetch.cancelled() and prefetch.exception() is None:
            self._announce_copies(prefetch.result().fetched)

    def _announce_copies(self, fetched: list[tuple[str, int]]) -> None:
        """Inputs fetched for a run that ended unreported: the scheduler, told of
        them as copies taken, releases them with their key (none stays unknown)."""
        if fetched:
            self._link.reports.acquired.extend(fetched)
            self._link.wake()

    # ------------------------------------------------------------ running

    def _launch(self, a: Assignment) -> None:
        """A run that holds its lease here: to a task thread, or first to
        fetch its inputs."""
        if a.queued:
            self._link.reports.started.append((a.key, a.run_id))
            self._link.wake()
        loop = asyncio.get_running_loop()
        self._running[a.run_id] = loop.create_future()
        prefetch = self._prefetches.pop(a.run_id, None)
        values = local_inputs(self.store, a, from_disk=False) if prefetch is None else None
        if values is not None:
            # Everything at hand (the common case): straight to a thread, no
            # asyncio task, and runs that end together wake the loop once.
            self._threads.submit(self._run_in_thread, loop, a, values, [])
        else:
            self._fetching[a.run_id] = asyncio.create_task(self._fetch_then_run(a, prefetch))

    async def _fetch_then_run(self, a: Assignment, prefetch: asyncio.Task[Inputs] | None) -> None:
        """A run whose inputs are not all here: get them, then to a thread."""
        handed_over = False
        try:
            inputs = await (prefetch if prefetch is not None else self._fetcher.gather(a))
            if inputs.missing:
                self._announce_copies(inputs.fetched)
                self._link.reports.missing.append(
                    wire.MissingInputs(a.key, a.run_id, inputs.missing)
                )
            elif a.run_id in self.state.cancelled:
                self._announce_copies(inputs.fetched)
                self._report_failure(a, _cancelled_error())
            else:
                loop = asyncio.get_running_loop()
                self._threads.submit(self._run_in_thread, loop, a, inputs.values, inputs.fetched)
                handed_over = True
        finally:
            self._fetching.pop(a.run_id, None)
            if not handed_over:
                # It never reached a thread: its lease goes back here.
                ended = self._stimulus(self.state.end, a.run_id)
                self._finish(a.run_id)
                for started in ended.started:
                    self._launch(started)
                self._link.wake()

    def _run_in_thread(
        self,
        loop: asyncio.AbstractEventLoop,
        a: Assignment,
        values: dict[str, Frames],
        fetched: list[tuple[str, int]],
    ) -> None:
        """In a task thread: run it, give its lease back, then take up the next
        queued run that started in the room it freed and has its inputs here,
        without waiting for the loop (which hears of both, batched with
        whatever else the threads did meanwhile: one wake-up for all)."""
        address, name = self.address, self.name
        while True:
            context = TaskContext(a.key, address, name, a.resources, a.gpus)
            if a.isolate or (self.isolate_gpu_tasks and a.need.get(GPU)):
                # Devices known: the child sees only the run's (none: none);
                # GPU only a number here: the child sees what this process does.
                visible = ",".join(a.gpus) if self.state.devices is not None else None
                outcome = self._isolated.run(a.key, a.payload, values, context, visible)
            else:
                outcome = execute(a.key, a.payload, values, context)
            result = outcome.result
            if self.host_peers and isinstance(result, Frames) and result.buffers:
                # Here, in the task's thread: the copy must not stall the loop.
                published = shm.publish(result, SHARE_MIN_BYTES)
                if published is not None:
                    outcome.result, outcome.segment = published
            taken: tuple[Assignment, dict[str, Frames], list[tuple[str, int]]] | None = None
            with self._lock:
                ended = self.state.end(a.run_id)
                was_empty = not self._news
                self._news.append(_Ran(a, outcome, fetched, ended.cancelled))
                for started in ended.started:
                    at_hand = None
                    if taken is None and not self._stopping.is_set():
                        at_hand = self._inputs_at_hand(started)
                    if at_hand is not None:
                        taken = (started, *at_hand)
                    self._news.append(_Began(started, in_thread=at_hand is not None))
                if self._validate:
                    self._check()
            if was_empty:
                with contextlib.suppress(RuntimeError):  # the loop has closed: the worker is gone
                    loop.call_soon_threadsafe(self._hear_threads)
            if taken is None:
                return
            a, values, fetched = taken

    def _inputs_at_hand(
        self, a: Assignment
    ) -> tuple[dict[str, Frames], list[tuple[str, int]]] | None:
        """(Holding _lock, in a task thread.) The run's inputs if every one is
        here or was fetched for it; else None (the loop launches it)."""
        prefetch = self._prefetches.get(a.run_id)
        if prefetch is None:
            values = local_inputs(self.store, a)
            return None if values is None else (values, [])
        # Reading a finished task's result is safe from any thread.
        if not prefetch.done() or prefetch.cancelled() or prefetch.exception() is not None:
            return None
        inputs = prefetch.result()
        if inputs.missing:
            return None  # the loop reports them
        return inputs.values, inputs.fetched

    def _hear_threads(self) -> None:
        """On the loop: report what the task threads did."""
        with self._lock:
            news, self._news = self._news, []
            self._tell_devices()
        self._hear(news)

    def _hear(self, news: list[_Ran | _Began]) -> None:
        """Report, in the order they happened, the runs threads ended and the
        queued runs that started in the room they freed; launch those no
        thread took up."""
        if not news:
            return
        loop = asyncio.get_running_loop()
        for item in news:
            a = item.assignment
            if isinstance(item, _Ran):
                self._report(item)
                self._finish(a.run_id)
            elif item.in_thread:
                self._link.reports.started.append((a.key, a.run_id))
                self._running[a.run_id] = loop.create_future()
                self._prefetches.pop(a.run_id, None)
            else:
                self._launch(a)
        self._link.wake()
        if not self.state.busy:
            self._link.flush()

    def _report(self, ran: _Ran) -> None:
        a, result = ran.assignment, ran.outcome.result
        if ran.cancelled:
            if ran.outcome.segment is not None:
                ran.outcome.segment.remove()
            self._announce_copies(ran.fetched)
            self._report_failure(a, _cancelled_error())
        elif isinstance(result, Frames):
            self.store.put(a.key, a.run_id, result, a.incarnation, ran.outcome.segment)
            inline = not result.buffers and result.nbytes <= INLINE_RESULT_BYTES
            self._link.reports.finished.append(
                wire.Finished(
                    a.key,
                    a.run_id,
                    result.nbytes,
                    ran.fetched,
                    result.pickled if inline else b"",
                    ran.outcome.duration,
                )
            )
        else:
            self._announce_copies(ran.fetched)
            self._report_failure(a, result)

    def _finish(self, run_id: int) -> None:
        """The run has ended and its lease is back in the books."""
        ended = self._running.pop(run_id, None)
        if ended is not None and not ended.done():
            ended.set_result(None)

    def _report_failure(self, a: Assignment, error: serialize.ErrorInfo) -> None:
        self._link.reports.failed.append(wire.Failed(a.key, a.run_id, error))
        self._link.wake()
