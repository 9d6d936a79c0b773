"""The scheduler's state machine: tasks, workers, clients and exact accounting.

``ClusterState.handle(event)`` takes one event and returns the commands that
follow from it. It never awaits, reads the clock or touches a socket, so every
scenario can be driven from a test with plain objects, and ``validate()`` can
check the invariants after every step.

ClusterState is the one entry point and the house the parts live in; each
part owns its data and says in its docstring what it must never do:

    records.py     the task and worker records, the run (lease), TaskState
    books.py       what each worker declares, holds and has queued (leases)
    queues.py      ready tasks by resource shape, best first
    placer.py      the placement pass, reservations, feasibility, queue depth
    graph.py       task records, their states and links, where results are
    clients.py     who wants what, who is away, what each is told
    inspection.py  explain() and snapshot()
    validate.py    the invariants, checked after every event in tests

This module owns the clock (``Clock``: the latest Tick's time, the recovery
hold) and the order in which the parts act on each event; the placement pass
runs once after each event (or batch of events). It must never do a part's
work itself: no arithmetic on the books, no change to a task's state or
links, no choice of a worker.

A cancelled task is forgotten at once. Its run, if it had one, stays on the
worker's books, holding its resources, until the worker reports that the code
returned: the lease is released exactly once, when the run ends.

A worker may also hold a small queue of assigned runs that hold no resources
(``SchedulingPolicy.worker_queue``), so that it starts the next task the moment
one ends instead of waiting a round trip for it. The worker starts queued runs
itself, as its own books allow, and reports each start; only then does the run
hold resources here. Reports of one worker arrive in the order things happened
there, so what the scheduler counts as held is always what the worker really
runs (or less), and held never exceeds what the worker declared. A task goes
straight into a worker's free capacity only if it fits there with every queued
run of that worker started too (its "room"): the worker may have given that
capacity to a queued run whose start is still on its way. A queued run that
its worker keeps overtaking (starting runs assigned after it) for longer than
``starvation_after`` gets that worker reserved, as a starving ready task does.
"""

from __future__ import annotations

from collections.abc import Iterable

from apportion_common.serialize import ErrorInfo
from apportion_common.status import ErrorKind

from .books import Books
from .clients import FORGET, Clients
from .commands import Command, DeclareResources, ReleaseData, RestartWorker, TellHostPeers
from .events import (
    ClientDisconnected,
    ClientId,
    ClientJoined,
    ClientLeft,
    DataReplicated,
    Event,
    GpuUseReported,
    KeysReleased,
    RestartAsked,
    RetirementAsked,
    StateRecovered,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksForgotten,
    TasksSubmitted,
    TaskStarted,
    Tick,
    WorkerId,
    WorkerJoined,
    WorkerLeft,
    WorkerMemoryReported,
    WorkerResourcesChanged,
)
from .graph import Graph
from .inspection import ClusterSnapshot, explain, snapshot
from .placement import fits
from .placer import Placer
from .policy import SchedulingPolicy
from .queues import ReadyQueues
from .records import (
    ERRED,
    MEMORY,
    PROCESSING,
    READY,
    RELEASED,
    WAITING,
    Changes,
    Clock,
    Shape,
    TaskRecord,
    TaskState,
    WorkerRecord,
    key_prefix,
)
from .retirement import Retirements
from .validate import InvariantError, validate

__all__ = [
    "ERRED",
    "MEMORY",
    "PROCESSING",
    "READY",
    "RELEASED",
    "WAITING",
    "ClusterState",
    "InvariantError",
    "Shape",
    "TaskRecord",
    "TaskState",
    "WorkerRecord",
    "key_prefix",
]


class ClusterState:
    """All the scheduler knows, changed only through :meth:`handle`."""

    def __init__(self, policy: SchedulingPolicy | None = None, incarnation_base: int = 1) -> None:
        self.policy = policy or SchedulingPolicy()
        self.clock = Clock()
        changes = Changes()
        self.tasks: dict[str, TaskRecord] = {}
        self.books = Books(self.policy, changes)
        self.workers: dict[WorkerId, WorkerRecord] = self.books.workers
        self.queues = ReadyQueues(self.tasks, changes)
        self.placer = Placer(self.policy, self.tasks, self.books, self.queues, changes, self.clock)
        #: starving task key -> the worker kept for it (mirrors reserved_for)
        self.reservations: dict[str, WorkerId] = self.placer.reservations
        self.graph = Graph(
            self.tasks, self.workers, self.queues, self.placer, self.clock, incarnation_base
        )
        self.clientele = Clients(self.policy, self.graph, self.books, self.clock)
        self.retirements = Retirements(self.tasks, self.books, self.clock, self.graph.needs_data)
        #: each client's wanted keys
        self.clients: dict[ClientId, set[str]] = self.clientele.wants
        self._changes = changes

    @property
    def now(self) -> float:
        """The latest Tick's time (monotonic seconds)."""
        return self.clock.now

    @property
    def journaling(self) -> bool:
        """Emit journal commands (JournalTask, JournalWant...) for a state dir."""
        return self.graph.journaling

    @journaling.setter
    def journaling(self, on: bool) -> None:
        self.graph.journaling = on
        self.clientele.journaling = on

    # ------------------------------------------------------------ dispatch

    def handle(self, event: Event) -> list[Command]:
        cmds: list[Command] = []
        self._apply(event, cmds)
        self._let_go_of_forgotten(cmds)
        self.placer.schedule(cmds)
        self.retirements.progress(cmds)
        return cmds

    def handle_all(self, events: Iterable[Event]) -> list[Command]:
        """Apply ``events`` in order, then place what became placeable once:
        a worker's batch of reports costs one placement pass, not one each."""
        cmds: list[Command] = []
        for event in events:
            self._apply(event, cmds)
        self._let_go_of_forgotten(cmds)
        self.placer.schedule(cmds)
        self.retirements.progress(cmds)
        return cmds

    def _let_go_of_forgotten(self, cmds: list[Command]) -> None:
        """Fire-and-forget tasks that ended have served their purpose."""
        if self.clientele.wants.get(FORGET):
            self.clientele.let_go(cmds)

    def _apply(self, event: Event, cmds: list[Command]) -> None:
        match event:
            case Tick():
                self._on_tick(event, cmds)
            case WorkerResourcesChanged():
                self._on_resources_changed(event, cmds)
            case TasksSubmitted():
                self.clientele.submitted(event, cmds)
            case TaskFinished():
                self._on_finished(event, cmds)
            case TaskStarted():
                self.books.start(event.worker_id, event.run_id, event.key)
            case TaskErred():
                self._on_erred(event, cmds)
            case TaskMissingInputs():
                self._on_missing_inputs(event, cmds)
            case RestartAsked():
                self._on_restart_asked(cmds)
            case RetirementAsked():
                self._on_retirement_asked(event)
            case DataReplicated():
                worker = self.workers.get(event.worker_id)
                if worker is not None:
                    self.graph.fetched(worker, event.acquired, cmds)
                    for key, _ in event.acquired:
                        self.graph.tell_holders(key, cmds)
                    self.retirements.acquired([key for key, _ in event.acquired])
            case WorkerJoined():
                self._on_worker_joined(event, cmds)
            case GpuUseReported():
                worker = self.workers.get(event.worker_id)
                if worker is not None:
                    worker.gpu_use = dict(event.use)
            case WorkerMemoryReported():
                self._on_memory(event)
            case WorkerLeft():
                self._on_worker_left(event, cmds)
            case ClientJoined():
                self.clientele.joined(event, cmds)
            case ClientLeft():
                self.clientele.drop(event.client_id, cmds)
            case ClientDisconnected():
                self.clientele.disconnected_at(event)
            case StateRecovered():
                self._on_recovered(event, cmds)
            case TasksCancelled():
                self.clientele.cancelled(event, cmds)
            case KeysReleased():
                self.clientele.release(event.client_id, event.keys, cmds)
            case TasksForgotten():
                self.clientele.forgotten(event, cmds)

    # ---------------------------------------------------------------- time

    def _on_tick(self, event: Tick, cmds: list[Command]) -> None:
        clock = self.clock
        clock.now = max(clock.now, event.now)
        self._changes.ticked = True  # waiting times grew: a reservation may start
        self._expire_unplaceable(cmds)
        self.clientele.expire(cmds)
        if clock.hold_until and clock.now >= clock.hold_until:
            clock.hold_until = 0.0
            self._changes.everything = True
            self.graph.retell_why_waiting(cmds)
        self.placer.tick()

    def _on_recovered(self, event: StateRecovered, cmds: list[Command]) -> None:
        """Rebuild the journal's tasks after a restart. Nothing is placed for
        the recovery grace period: reconnecting workers offer the results they
        hold first (see Graph.reclaim), and only what nobody holds is computed
        again."""
        self.clock.now = max(self.clock.now, event.now)
        self.clock.hold_until = event.now + self.policy.recovery_grace
        self.clientele.recovered(event, cmds)

    def _expire_unplaceable(self, cmds: list[Command]) -> None:
        """With no_worker_timeout: err tasks no connected worker could ever hold."""
        timeout = self.policy.no_worker_timeout
        if timeout is None:
            return
        now = self.clock.now
        for queued in self.queues.by_shape():
            # One shape, one answer (computed afresh if a worker joined,
            # left or changed its resources since).
            reason = self.placer.why_never(queued[0]) if queued else None
            if reason is None:
                continue
            for task in queued:
                if now - task.ready_since >= timeout and task.state == READY:
                    error = ErrorInfo(
                        "NoValidWorkerError",
                        f"task {task.key!r} waited {timeout:g}s for a worker that "
                        f"could hold it: {reason}",
                        kind=ErrorKind.NO_VALID_WORKER,
                    )
                    self.graph.err(task, error, cmds)

    # ------------------------------------------------------------- workers

    def _on_worker_joined(self, event: WorkerJoined, cmds: list[Command]) -> None:
        worker = self.books.join(event)
        self._tell_host_peers(worker.host_id, cmds)
        for held in event.held:
            task = self.tasks.get(held.key)
            if (
                task is None
                or task.incarnation != held.incarnation
                or task.state in (PROCESSING, ERRED)
            ):
                cmds.append(ReleaseData(worker.worker_id, held.key))
            else:
                self.graph.reclaim(task, worker, held.nbytes, cmds)

    def _on_worker_left(self, event: WorkerLeft, cmds: list[Command]) -> None:
        worker = self.books.leave(event.worker_id)
        if worker is None:
            return
        self.retirements.left(worker.worker_id)
        self._tell_host_peers(worker.host_id, cmds)
        self.placer.worker_left(worker)
        # Recompute what was lost first, then place its runs again.
        self.graph.lose_holder(worker, cmds)
        self.graph.lose_runs(worker, self.policy.allowed_failures, cmds)
        self.graph.retell_why_waiting(cmds)

    def _on_restart_asked(self, cmds: list[Command]) -> None:
        """Every task cancelled; every worker takes nothing new and is told to
        exit, for its nanny to start it afresh (its name goes to that process)."""
        self.clientele.cancel_everything(cmds)
        for worker in sorted(self.workers.values(), key=lambda w: w.worker_id):
            self.placer.worker_left(worker)
            self.retirements.ask(worker)
            worker.told_to_retire = True
            cmds.append(RestartWorker(worker.worker_id))

    def _on_retirement_asked(self, event: RetirementAsked) -> None:
        for worker_id in event.worker_ids:
            worker = self.workers.get(worker_id)
            if worker is not None and not worker.retiring:
                self.placer.worker_left(worker)  # a reservation on it goes first
                self.retirements.ask(worker)

    def _on_memory(self, event: WorkerMemoryReported) -> None:
        """A worker's memory figures; paused, it takes nothing new (no runs,
        no queued runs, no reservation) until it says it has resumed."""
        worker = self.workers.get(event.worker_id)
        if worker is None:
            return
        worker.memory, worker.spilled_bytes = event.memory, event.spilled_bytes
        if event.paused and not worker.paused:
            self.placer.worker_left(worker)  # a reservation on it goes first
        self.books.pause(worker, event.paused)

    def _tell_host_peers(self, host_id: str, cmds: list[Command]) -> None:
        """A worker joined or left ``host_id``: tell each worker there how many
        others share it (only a worker with shared memory names its host)."""
        if not host_id:
            return
        on_host = self.books.on_host(host_id)
        for worker_id in on_host:
            cmds.append(TellHostPeers(worker_id, len(on_host) - 1))

    def _on_resources_changed(self, event: WorkerResourcesChanged, cmds: list[Command]) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is None:
            return
        declared = self.books.redeclare(worker, event.resources, event.resources_text)
        cmds.append(DeclareResources(worker.worker_id, dict(declared)))
        for run_id, run in list(worker.queued.items()):
            # Queued where it can no longer ever run: placed again.
            task = self.tasks.get(run.key)
            if (
                task is not None
                and task.run_id == run_id
                and task.state == PROCESSING
                and not fits(run.resources, declared)
            ):
                self.graph.call_off(task, cmds)
        self.graph.retell_why_waiting(cmds)

    # --------------------------------------------------------- run reports

    def _on_finished(self, event: TaskFinished, cmds: list[Command]) -> None:
        worker = self.books.end(event.worker_id, event.run_id, event.key)
        if worker is None:
            return
        if event.fetched:
            self.graph.fetched(worker, event.fetched, cmds)
        task = self.graph.finished(
            event.key, event.run_id, worker, event.nbytes, event.inline_result, cmds
        )
        if task is None:
            # A cancelled or superseded run: its result is not wanted.
            cmds.append(ReleaseData(worker.worker_id, event.key, event.run_id))
        elif event.duration > 0.0:
            self.placer.learn_duration(task.prefix, event.duration)

    def _on_erred(self, event: TaskErred, cmds: list[Command]) -> None:
        if self.books.end(event.worker_id, event.run_id, event.key) is None:
            return
        task = self.graph.current(event.key, event.run_id)
        if task is not None:
            self.graph.failed(task, event.error, cmds)

    def _on_missing_inputs(self, event: TaskMissingInputs, cmds: list[Command]) -> None:
        if self.books.end(event.worker_id, event.run_id, event.key) is None:
            return
        task = self.graph.current(event.key, event.run_id)
        for input_key, address in event.missing:
            self.graph.lose_copy(input_key, address, cmds)
        if task is not None:
            self.graph.make_runnable(task, cmds)

    # ---------------------------------------------------------- inspection

    def worker_named(self, name: str) -> WorkerRecord | None:
        """The connected worker called ``name`` (names are unique among them)."""
        return next((w for w in self.workers.values() if w.name == name), None)

    def find_worker(self, name_or_address: str) -> WorkerRecord | None:
        for worker in self.workers.values():
            if name_or_address in (worker.address, worker.name):
                return worker
        return None

    def explain(self, key: str) -> str:
        """One sentence on why task ``key`` is not running (or what it is doing)."""
        return explain(self, key)

    def snapshot(self) -> ClusterSnapshot:
        return snapshot(self)

    def validate(self) -> None:
        """Check the books; raise :class:`InvariantError` naming the first fault."""
        validate(self)
