"""The scheduler's state machine: tasks, workers, clients and exact accounting.

``ClusterState.handle(event)`` takes one event and returns the commands that
follow from it. It never awaits, reads the clock or touches a socket, so every
scenario can be driven from a test with plain objects, and ``validate()`` can
check the invariants after every step.

Task states are :class:`~.records.TaskState`; the records themselves
(TaskRecord, WorkerRecord, the run, Shape) live in :mod:`.records`.

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
capacity to a queued run whose start is still on its way.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable

from apportion_common.resources import Quanta
from apportion_common.serialize import ErrorInfo
from apportion_common.status import ErrorKind, TaskStatus

from .commands import (
    AssignTask,
    CancelRun,
    Command,
    DeclareResources,
    InputLocation,
    JournalFailure,
    JournalForgetClient,
    JournalForgetTask,
    JournalTask,
    JournalUnwant,
    JournalWant,
    NotifyClient,
    ReleaseData,
)
from .events import (
    ClientDisconnected,
    ClientId,
    ClientJoined,
    ClientLeft,
    ClusterSnapshot,
    Event,
    KeysReleased,
    StateRecovered,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksSubmitted,
    TaskStarted,
    TaskSubmission,
    Tick,
    WorkerId,
    WorkerJoined,
    WorkerLeft,
    WorkerResourcesChanged,
    WorkerSnapshot,
)
from .placement import fits, infeasibility_reason, pick_queue, pick_worker
from .policy import (
    DURATION_WEIGHT,
    QUEUE_MAX_PER_THREAD,
    QUEUE_PER_THREAD,
    QUEUE_TARGET_S,
    SchedulingPolicy,
)
from .records import (
    ERRED,
    MEMORY,
    NO_WORKERS,
    PROCESSING,
    READY,
    RELEASED,
    WAITING,
    Run,
    Shape,
    TaskRecord,
    WorkerRecord,
    key_prefix,
    named,
)


class InvariantError(AssertionError):
    """``validate()`` found the books out of balance."""


#: A ready task in its shape's heap: (-priority, _order(task), ready_gen, key).
#: Stale once the task is no longer READY with that ready_gen (skipped lazily).
_Entry = tuple[int, int, int, str]

#: More tasks than one scheduler ever numbers (seq): see _order.
_DEPTH_STRIDE = 1 << 48


def _order(task: TaskRecord) -> int:
    """Where a ready task stands among those of its priority: deeper in its
    graph first, then in submission order. Finishing what started frees its
    inputs sooner, and a pipeline's later stages (often those that need the
    scarce resource: load, then process on a GPU) start as soon as their
    inputs are there instead of after every first-stage task; as dask.order
    prefers too. One int, so a heap entry stays four items."""
    return task.seq - task.depth * _DEPTH_STRIDE


#: Kinds of task whose durations are kept (each a few dozen bytes).
MAX_KINDS_TIMED = 10_000


def _post_order(
    start: TaskRecord, neighbours: Callable[[TaskRecord], list[TaskRecord]]
) -> list[TaskRecord]:
    """``start`` and all it reaches through ``neighbours``, each after every
    task it reaches (depth-first post-order). A work list, not recursion, so
    that a long chain of tasks cannot hit Python's recursion limit in the
    middle of an event."""
    order: list[TaskRecord] = []
    visited: set[str] = set()
    stack: list[tuple[TaskRecord, bool]] = [(start, False)]
    while stack:
        current, expanded = stack.pop()
        if expanded:
            order.append(current)
            continue
        if current.key in visited:
            continue
        visited.add(current.key)
        stack.append((current, True))
        for neighbour in reversed(neighbours(current)):
            if neighbour.key not in visited:
                stack.append((neighbour, False))
    return order


def _status_of(task: TaskRecord) -> TaskStatus:
    if task.state == MEMORY:
        return TaskStatus.FINISHED
    if task.state == ERRED:
        return TaskStatus.ERROR
    return TaskStatus.PENDING


class ClusterState:
    """All the scheduler knows, changed only through :meth:`handle`."""

    def __init__(self, policy: SchedulingPolicy | None = None, incarnation_base: int = 1) -> None:
        self.policy = policy or SchedulingPolicy()
        #: emit journal commands (JournalTask, JournalWant...) for a state dir
        self.journaling = False
        self._pack = self.policy.placement == "pack"
        #: the latest Tick's time (monotonic seconds)
        self.now = 0.0
        self.tasks: dict[str, TaskRecord] = {}
        self.workers: dict[WorkerId, WorkerRecord] = {}
        #: starving task key -> the worker kept for it (mirrors reserved_for)
        self.reservations: dict[str, WorkerId] = {}
        #: every resource name any worker has declared since the start
        self._names_seen: set[str] = set()
        # What changed since the last placement pass. After a pass, the head of
        # every waiting shape fits no worker it may use; only a worker that
        # gained room or a shape that gained a task can change that, so a pass
        # checks just those (a full pass on a Tick or when a worker leaves).
        self._recheck_all = True
        self._dirty_workers: set[WorkerId] = set()
        self._dirty_shapes: set[Shape] = set()
        self._ticked = False
        self._free_slots = 0
        # The same for worker queues: after a pass that fills them, the head of
        # every waiting shape fits no queue with room; a worker whose queue
        # gained room (or that joined, grew or lost its reservation) is checked.
        self._queue_dirty: set[WorkerId] = set()
        #: free places in all worker queues together
        self._queue_room = 0
        self.clients: dict[ClientId, set[str]] = {}
        #: clients whose stream broke -> when their grace period ends
        self._disconnected: dict[ClientId, float] = {}
        #: after a restart from the journal, nothing is placed until then
        self._hold_until = 0.0
        # The servicer starts these at a random point, so that two lifetimes of
        # a scheduler never hand out the same incarnation.
        self._incarnations = itertools.count(incarnation_base)
        # Ready tasks grouped by resource shape, so a task whose resource is
        # exhausted never holds back one whose resource is free. Each heap is
        # ordered by (-priority, submission order); stale entries are skipped.
        self._ready: dict[Shape, list[_Entry]] = {}
        # The head entry of every shape's heap (its heap[0], kept in step), and
        # those heads, one per shape, as a list kept sorted, best first. A
        # placement pass walks it in order and stops at the first head it can
        # place, instead of rebuilding every shape's head (40% of a decision's
        # time with 37 shapes); heads it passes over stay where they are (as a
        # heap, each cost a pop and a push back: -5% decisions a second).
        self._head_of: dict[Shape, _Entry] = {}
        self._heads: list[tuple[_Entry, Shape]] = []
        # Shapes no connected worker could ever hold (_why_never): their heads
        # wait out of _heads until a worker joins or changes, instead of being
        # tried by every pass (at 10 workers, 4 of 37 shapes were, and a
        # decision tried 6.6 heads instead of 2.6).
        self._parked: set[Shape] = set()
        self._seq = itertools.count(1)
        self._run_ids = itertools.count(1)
        self._gens = itertools.count(1)
        # When a task of each waiting shape last started: a shape whose tasks
        # keep starting is queued, not starved.
        self._last_start: dict[Shape, float] = {}
        # Why each resource shape cannot run on any connected worker (None: it can).
        self._feasibility: dict[Shape, str | None] = {}
        #: one (shape, resources, allowed workers) per distinct kind of task
        #: moving mean duration in seconds of each kind of task (key_prefix)
        self._durations: dict[str, float] = {}
        self._kinds: dict[
            tuple[tuple[tuple[str, int], ...], tuple[str, ...], bool],
            tuple[Shape, Quanta, frozenset[str]],
        ] = {}

    # ------------------------------------------------------------ dispatch

    def handle(self, event: Event) -> list[Command]:
        cmds: list[Command] = []
        self._apply(event, cmds)
        self._schedule(cmds)
        return cmds

    def handle_all(self, events: Iterable[Event]) -> list[Command]:
        """Apply ``events`` in order, then place what became placeable once:
        a worker's batch of reports costs one placement pass, not one each."""
        cmds: list[Command] = []
        for event in events:
            self._apply(event, cmds)
        self._schedule(cmds)
        return cmds

    def _apply(self, event: Event, cmds: list[Command]) -> None:
        match event:
            case Tick():
                self.now = max(self.now, event.now)
                self._ticked = True  # waiting times grew: a reservation may start
                self._expire_unplaceable(cmds)
                self._expire_clients(cmds)
                if self._hold_until and self.now >= self._hold_until:
                    self._hold_until = 0.0
                    self._recheck_all = True
                    self._retell_why_waiting(cmds)
            case WorkerResourcesChanged():
                self._on_resources_changed(event, cmds)
            case TasksSubmitted():
                self._on_submitted(event, cmds)
            case TaskFinished():
                self._on_finished(event, cmds)
            case TaskStarted():
                self._on_started(event)
            case TaskErred():
                self._on_erred(event, cmds)
            case TaskMissingInputs():
                self._on_missing_inputs(event, cmds)
            case WorkerJoined():
                self._on_worker_joined(event, cmds)
            case WorkerLeft():
                self._on_worker_left(event, cmds)
            case ClientJoined():
                self._on_client_joined(event, cmds)
            case ClientLeft():
                self._drop_client(event.client_id, cmds)
            case ClientDisconnected():
                if event.client_id in self.clients:
                    self._disconnected[event.client_id] = event.at + self.policy.client_grace
            case StateRecovered():
                self._on_recovered(event, cmds)
            case TasksCancelled():
                self._on_cancelled(event, cmds)
            case KeysReleased():
                self._release_keys(event.client_id, event.keys, cmds)

    # ------------------------------------------------------------- clients

    def _on_submitted(self, event: TasksSubmitted, cmds: list[Command]) -> None:
        client = event.client_id
        wanted = self.clients.setdefault(client, set())
        for spec in event.tasks:
            task = self.tasks.get(spec.key)
            if task is None:
                task = self._new_task(spec)
                self.tasks[spec.key] = task
                task.wanted_by.add(client)
                wanted.add(spec.key)
                if self.journaling:
                    cmds.append(JournalTask(task.key, task.incarnation, client, spec))
                self._enter_graph(task, cmds)
                if task.state == WAITING:
                    self._warn_unknown_names(client, task, cmds)
            else:
                # Same key: the existing task's future comes back.
                if self.journaling and client not in task.wanted_by:
                    cmds.append(JournalWant(client, task.key))
                task.wanted_by.add(client)
                wanted.add(spec.key)
                if task.state == RELEASED:
                    self._make_runnable(task, cmds)
                cmds.append(self._update_for(client, task))

    def _warn_unknown_names(self, client: ClientId, task: TaskRecord, cmds: list[Command]) -> None:
        """Tell at once of a resource no worker ever seen declares (a typo,
        often), even while the task still waits for its inputs. A queued
        task is told why it waits anyway (_tell_why_waiting)."""
        unknown = sorted(name for name in task.resources if name not in self._names_seen)
        if unknown:
            names = ", ".join(unknown)
            reason = f"task {task.key!r} needs {names}, which no worker seen so far declares"
            cmds.append(NotifyClient(client, task.key, TaskStatus.PENDING, waiting_reason=reason))

    def _new_task(self, spec: TaskSubmission) -> TaskRecord:
        # Tasks of one shape share its shape tuple, resources dict and worker
        # set (never mutated): a queue of 100,000 alike tasks holds one copy.
        needs = tuple(sorted(spec.resources.items()))
        kind = (needs, spec.workers, spec.allow_other_workers)
        interned = self._kinds.get(kind)
        if interned is None:
            allowed = frozenset(spec.workers) if spec.workers else NO_WORKERS
            shape = (needs, NO_WORKERS if spec.allow_other_workers else allowed)
            interned = self._kinds[kind] = (shape, dict(spec.resources), allowed)
        shape, resources, allowed = interned
        return TaskRecord(
            # Interned: tasks of a kind share one string (and it goes with them).
            prefix=sys.intern(key_prefix(spec.key)),
            key=spec.key,
            payload=spec.payload,
            resources=resources,
            shape=shape,
            allowed=allowed,
            loose=spec.allow_other_workers,
            dependencies=tuple(dict.fromkeys(spec.dependencies)),
            priority=spec.priority,
            retries_left=spec.retries,
            seq=next(self._seq),
            incarnation=next(self._incarnations),
        )

    def _enter_graph(self, task: TaskRecord, cmds: list[Command]) -> None:
        # An input the scheduler does not know errs the task for good. So does
        # an input with the task's own key: that is a released key, not this
        # new task (linking it would leave the task waiting on itself forever).
        missing = [k for k in task.dependencies if k == task.key or k not in self.tasks]
        if missing:
            # Keep, and link, only the inputs that exist, as for any erred
            # task: a key of a missing name submitted later is a task this one
            # never refers to (validate() checks every kept link).
            task.dependencies = tuple(k for k in task.dependencies if k not in missing)
        for dep_key in task.dependencies:
            dep = self.tasks[dep_key]
            dep.dependents.add(task.key)
            if dep.depth >= task.depth:
                task.depth = dep.depth + 1
        if missing:
            self._err(
                task,
                ErrorInfo(
                    "MissingDependencyError",
                    f"task {task.key!r} depends on {missing[0]!r}, "
                    "which the scheduler does not know (released or never submitted)",
                    kind=ErrorKind.MISSING_DEPENDENCY,
                ),
                cmds,
            )
            return
        self._make_runnable(task, cmds)

    def _on_cancelled(self, event: TasksCancelled, cmds: list[Command]) -> None:
        for key in event.keys:
            task = self.tasks.get(key)
            if task is None:
                continue
            if task.wanted_by - {event.client_id}:
                # Other clients still want it: cancelling only releases it for
                # this one (as Dask's cancel without force=True).
                self._release_keys(event.client_id, [key], cmds)
            else:
                self._cancel(task, cmds, event.client_id, frozenset(event.keys))

    def _cancel(
        self,
        task: TaskRecord,
        cmds: list[Command],
        requester: ClientId = "",
        named: frozenset[str] = frozenset(),
    ) -> None:
        """Cancel ``task`` and everything that depends on it, for every client.

        The requester already marked the keys it ``named`` cancelled and is
        not told again: an answer arriving after it submitted one of those keys
        anew would be mistaken for the new task's fate.
        """
        # Cancel the dependents first, then the task: each after all that
        # depend on it.
        order = _post_order(task, lambda current: [self.tasks[k] for k in current.dependents])
        for current in order:
            if self.tasks.get(current.key) is not current:
                continue  # forgotten while its dependents were cancelled
            for client in current.wanted_by:
                if not (client == requester and current.key in named):
                    cmds.append(NotifyClient(client, current.key, TaskStatus.CANCELLED))
                self.clients.get(client, set()).discard(current.key)
            current.wanted_by.clear()
            self._forget(current, cmds)

    def _release_keys(self, client: ClientId, keys: Iterable[str], cmds: list[Command]) -> None:
        wanted = self.clients.get(client)
        for key in keys:
            if wanted is not None:
                wanted.discard(key)
            task = self.tasks.get(key)
            if task is None:
                continue
            if self.journaling and client in task.wanted_by:
                cmds.append(JournalUnwant(client, key))
            task.wanted_by.discard(client)
            self._drop_if_unneeded(task, cmds)

    def _on_client_joined(self, event: ClientJoined, cmds: list[Command]) -> None:
        """A new client, or one coming back within its grace period (or after
        a scheduler restart): tell it again where each task it waits for stands."""
        client = event.client_id
        self._disconnected.pop(client, None)
        wanted = self.clients.setdefault(client, set())
        for key in event.resume:
            task = self.tasks.get(key)
            if task is None:
                error = ErrorInfo(
                    "SchedulerConnectionError",
                    f"the scheduler no longer knows task {key!r}: it restarted without "
                    "--state-dir, or this client stayed away longer than its grace period",
                    kind=ErrorKind.SCHEDULER_CONNECTION,
                )
                cmds.append(NotifyClient(client, key, TaskStatus.ERROR, error=error))
                continue
            if client not in task.wanted_by:
                if self.journaling:
                    cmds.append(JournalWant(client, key))
                task.wanted_by.add(client)
                wanted.add(key)
                if task.state == RELEASED:
                    self._make_runnable(task, cmds)
            cmds.append(self._update_for(client, task))

    def _drop_client(self, client: ClientId, cmds: list[Command]) -> None:
        """The client is gone for good: what only it wanted is cancelled."""
        self._disconnected.pop(client, None)
        keys = self.clients.pop(client, None)
        if keys is None:
            return
        self._release_keys(client, list(keys), cmds)
        if self.journaling:
            cmds.append(JournalForgetClient(client))

    def _expire_clients(self, cmds: list[Command]) -> None:
        if not self._disconnected:
            return
        gone = [c for c, deadline in self._disconnected.items() if deadline <= self.now]
        for client in gone:
            self._drop_client(client, cmds)

    def _on_recovered(self, event: StateRecovered, cmds: list[Command]) -> None:
        """Rebuild the journal's tasks after a restart. Nothing is placed for
        the recovery grace period: reconnecting workers offer the results they
        hold first (see _reclaim), and only what nobody holds is computed again.
        Every client has its grace period to reconnect."""
        self.now = max(self.now, event.now)
        self._hold_until = event.now + self.policy.recovery_grace
        for recovered in event.tasks:
            spec = recovered.submission
            if spec.key in self.tasks:
                continue
            task = self._new_task(spec)
            task.incarnation = recovered.incarnation
            self.tasks[spec.key] = task
            for client in recovered.wanted_by:
                task.wanted_by.add(client)
                self.clients.setdefault(client, set()).add(spec.key)
                self._disconnected.setdefault(client, event.now + self.policy.client_grace)
            if recovered.error is None:
                self._enter_graph(task, cmds)
                continue
            task.dependencies = tuple(k for k in task.dependencies if k in self.tasks)
            for dep_key in task.dependencies:
                self.tasks[dep_key].dependents.add(task.key)
            task.state = ERRED
            task.error = recovered.error
        for task in list(self.tasks.values()):
            self._drop_if_unneeded(task, cmds)

    # ------------------------------------------------------------- workers

    def _on_worker_joined(self, event: WorkerJoined, cmds: list[Command]) -> None:
        worker = self.workers[event.worker_id] = WorkerRecord(
            worker_id=event.worker_id,
            name=event.name,
            address=event.address,
            nthreads=event.nthreads,
            declared=dict(event.resources),
            free=dict(event.resources),
            free_slots=event.nthreads,
            pid=event.pid,
            queue_limit=self._queue_limit(event.nthreads),
        )
        self._free_slots += event.nthreads
        self._queue_room += worker.queue_limit
        self._dirty_workers.add(event.worker_id)
        self._queue_dirty.add(event.worker_id)
        self._names_seen.update(event.resources)
        self._workers_changed()
        for held in event.held:
            task = self.tasks.get(held.key)
            if (
                task is None
                or task.incarnation != held.incarnation
                or task.state in (PROCESSING, ERRED)
            ):
                cmds.append(ReleaseData(worker.worker_id, held.key))
            else:
                self._reclaim(task, worker, held.nbytes, cmds)

    def _reclaim(
        self, task: TaskRecord, worker: WorkerRecord, nbytes: int, cmds: list[Command]
    ) -> None:
        """A joining worker holds ``task``'s result from before (a broken
        stream, a scheduler restart): take it instead of computing it again."""
        worker.has.add(task.key)
        task.who_has.add(worker.worker_id)
        if task.state == MEMORY:
            return  # one more copy
        task.state = MEMORY  # a READY task's heap entry goes stale
        task.nbytes = nbytes
        task.error = None
        task.waiting_on.clear()
        task.waiting_reason = ""
        kept_on = self.reservations.pop(task.key, None)
        if kept_on is not None:
            self.workers[kept_on].reserved_for = None
        for client in task.wanted_by:
            cmds.append(
                NotifyClient(client, task.key, TaskStatus.FINISHED, (worker.address,), nbytes)
            )
        self._result_ready(task, cmds)

    def _on_worker_left(self, event: WorkerLeft, cmds: list[Command]) -> None:
        worker = self.workers.pop(event.worker_id, None)
        if worker is None:
            return
        self._free_slots -= worker.free_slots
        self._queue_room -= worker.queue_limit - len(worker.queued)
        self._recheck_all = True
        self._workers_changed()
        if worker.reserved_for is not None:
            del self.reservations[worker.reserved_for]
        # Take the worker out of every holder set first, so nothing below can
        # point at it; then recompute what was lost, then re-place its runs.
        lost: list[TaskRecord] = []
        for key in worker.has:
            task = self.tasks.get(key)
            if task is not None:
                task.who_has.discard(worker.worker_id)
                if not task.who_has and task.state == MEMORY:
                    lost.append(task)
        for task in lost:
            self._lost_data(task, cmds)
        for run_id, run in worker.runs.items():
            task = self._current(run.key, run_id)  # WAITING: re-queued or erred just below
            if task is not None:
                task.suspects.append(worker.name)
                if len(task.suspects) > self.policy.allowed_failures:
                    self._err(task, self._killed_worker(task), cmds)
                else:
                    self._make_runnable(task, cmds)
        for run_id, run in worker.queued.items():
            # Never started there: placed again, and the worker is no suspect.
            task = self._current(run.key, run_id)
            if task is not None:
                self._make_runnable(task, cmds)
        self._retell_why_waiting(cmds)

    def _retell_why_waiting(self, cmds: list[Command]) -> None:
        """After capacity went away (a worker left or declares less): tasks
        queued for what no worker now has wait for one that has it, and their
        clients are told why, as for a new task."""
        for heap in self._ready.values():
            for _, _, gen, key in heap:
                queued = self.tasks.get(key)
                if queued is not None and queued.state == READY and queued.ready_gen == gen:
                    self._tell_why_waiting(queued, cmds)

    def _killed_worker(self, task: TaskRecord) -> ErrorInfo:
        workers = ", ".join(task.suspects)
        return ErrorInfo(
            "KilledWorker",
            f"task {task.key!r} was running on {len(task.suspects)} workers that died "
            f"({workers}); allowed_failures is {self.policy.allowed_failures}",
            kind=ErrorKind.KILLED_WORKER,
        )

    def _on_resources_changed(self, event: WorkerResourcesChanged, cmds: list[Command]) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is None:
            return
        held = worker.held()
        declared = dict(event.resources)
        for name, amount in held.items():
            if amount:
                declared.setdefault(name, 0)  # still held until those runs end
        worker.declared = declared
        worker.free = {name: declared[name] - held.get(name, 0) for name in declared}
        worker.shrunk = any(amount < 0 for amount in worker.free.values())
        self._names_seen.update(event.resources)
        self._workers_changed()
        cmds.append(DeclareResources(worker.worker_id, dict(declared)))
        self._dirty_workers.add(worker.worker_id)
        self._queue_dirty.add(worker.worker_id)
        for run_id, run in list(worker.queued.items()):
            # Queued where it can no longer ever run: placed again. Its place
            # in the queue stays taken until the worker reports the cancelled
            # run (it may have started it before it heard of the change).
            task = self.tasks.get(run.key)
            if (
                task is not None
                and task.run_id == run_id
                and task.state == PROCESSING
                and not fits(run.resources, declared)
            ):
                self._cancel_run(task, cmds)
                task.state = WAITING  # transient: re-queued just below
                self._make_runnable(task, cmds)
        self._retell_why_waiting(cmds)

    def _expire_unplaceable(self, cmds: list[Command]) -> None:
        """With no_worker_timeout: err tasks no connected worker could ever hold."""
        timeout = self.policy.no_worker_timeout
        if timeout is None:
            return
        for heap in list(self._ready.values()):
            queued = [
                task
                for _, _, gen, key in heap
                if (task := self.tasks.get(key)) is not None
                and task.state == READY
                and task.ready_gen == gen
            ]
            # One shape, one answer (computed afresh if a worker joined,
            # left or changed its resources since).
            reason = self._why_never(queued[0]) if queued else None
            if reason is None:
                continue
            for task in queued:
                if self.now - task.ready_since >= timeout and task.state == READY:
                    error = ErrorInfo(
                        "NoValidWorkerError",
                        f"task {task.key!r} waited {timeout:g}s for a worker that "
                        f"could hold it: {reason}",
                        kind=ErrorKind.NO_VALID_WORKER,
                    )
                    self._err(task, error, cmds)

    def _lost_data(self, task: TaskRecord, cmds: list[Command]) -> None:
        """The last copy of a result is gone: recompute it if anyone still needs it."""
        task.state = RELEASED
        for dependent_key in task.dependents:
            dependent = self.tasks[dependent_key]
            if dependent.state in (WAITING, READY):
                dependent.waiting_on.add(task.key)
                if dependent.state == READY:
                    dependent.state = WAITING  # its heap entry goes stale
        if self._needs_data(task):
            for client in task.wanted_by:
                cmds.append(NotifyClient(client, task.key, TaskStatus.PENDING))
            task.waiting_reason = ""  # told nothing now: tell again if it must wait
            self._make_runnable(task, cmds)

    # ------------------------------------------------------- task outcomes

    def _end_run(self, worker_id: WorkerId, run_id: int, key: str) -> WorkerRecord | None:
        """Release a run's lease, exactly once. None if already released, or
        if the run is not of ``key`` (a confused report frees nothing)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return None  # lost worker: its books were closed when it left
        run = worker.runs.get(run_id)
        if run is None or run.key != key:
            queued = worker.queued.get(run_id)
            if queued is None or queued.key != key:
                return None
            # Ended before the scheduler heard it start (it started and
            # ended, or was dropped unstarted): it held nothing here.
            self._unqueue(worker, run_id)
            return worker
        del worker.runs[run_id]
        free = worker.free
        for name, amount in run.resources.items():
            free[name] += amount
        worker.free_slots += 1
        self._free_slots += 1
        self._dirty_workers.add(worker_id)
        if worker.shrunk and all(amount >= 0 for amount in free.values()):
            worker.shrunk = False
        return worker

    def _unqueue(self, worker: WorkerRecord, run_id: int) -> Run:
        run = worker.queued.pop(run_id)
        self._queue_room += 1
        self._queue_dirty.add(worker.worker_id)
        # Its room grew (when the run ended) or stays (when it started).
        self._dirty_workers.add(worker.worker_id)
        need = worker.queued_need
        for name, amount in run.resources.items():
            if not amount:
                continue
            left = need[name] - amount
            if left:
                need[name] = left
            else:
                del need[name]
        return run

    def _on_started(self, event: TaskStarted) -> None:
        """A queued run began on its worker: from now on it holds its resources.

        The worker started it only where its own books had room, and every
        run that ended before it was reported first, so this never takes more
        than the worker declared (validate() checks it). A start of a run no
        longer queued (it ended in the same batch, or the worker was lost) is
        ignored."""
        worker = self.workers.get(event.worker_id)
        if worker is None:
            return
        run = worker.queued.get(event.run_id)
        if run is None or run.key != event.key:
            return
        self._unqueue(worker, event.run_id)
        worker.runs[event.run_id] = run
        free = worker.free
        for name, amount in run.resources.items():
            if name not in free:
                # The operator withdrew it while the start was on its way.
                worker.declared[name] = 0
                free[name] = 0
            free[name] -= amount
            if free[name] < 0:
                worker.shrunk = True
        worker.free_slots -= 1
        self._free_slots -= 1

    def _current(self, key: str, run_id: int) -> TaskRecord | None:
        task = self.tasks.get(key)
        if task is None or task.state != PROCESSING or task.run_id != run_id:
            return None
        task.worker_id = None
        task.run_id = 0
        task.state = WAITING  # transient: the caller decides where it goes next
        return task

    def _on_finished(self, event: TaskFinished, cmds: list[Command]) -> None:
        worker = self._end_run(event.worker_id, event.run_id, event.key)
        if worker is None:
            return
        for fetched_key, _nbytes in event.fetched:
            fetched = self.tasks.get(fetched_key)
            if fetched is not None and fetched.state == MEMORY:
                fetched.who_has.add(worker.worker_id)
                worker.has.add(fetched_key)
            else:
                cmds.append(ReleaseData(worker.worker_id, fetched_key))
        task = self._current(event.key, event.run_id)
        if task is None:
            # A cancelled or superseded run: its result is not wanted.
            cmds.append(ReleaseData(worker.worker_id, event.key, event.run_id))
            return
        if event.duration > 0.0:
            self._learn_duration(task.prefix, event.duration)
        task.state = MEMORY
        task.nbytes = event.nbytes
        task.who_has = {worker.worker_id}
        task.error = None
        worker.has.add(task.key)
        if task.wanted_by:
            addresses = (worker.address,)
            for client in task.wanted_by:
                cmds.append(
                    NotifyClient(
                        client,
                        task.key,
                        TaskStatus.FINISHED,
                        addresses,
                        task.nbytes,
                        inline_result=event.inline_result,
                    )
                )
        self._result_ready(task, cmds)

    def _result_ready(self, task: TaskRecord, cmds: list[Command]) -> None:
        """``task``'s result is now held: its dependents may run, and inputs
        nobody needs any more (and the result itself, if unwanted) go."""
        for dependent_key in task.dependents:
            dependent = self.tasks[dependent_key]
            if dependent.state == WAITING:
                dependent.waiting_on.discard(task.key)
                if not dependent.waiting_on:
                    self._push_ready(dependent, cmds)
        for dep_key in task.dependencies:
            dep = self.tasks.get(dep_key)
            if dep is not None:
                self._drop_if_unneeded(dep, cmds)
        self._drop_if_unneeded(task, cmds)

    def _on_erred(self, event: TaskErred, cmds: list[Command]) -> None:
        if self._end_run(event.worker_id, event.run_id, event.key) is None:
            return
        task = self._current(event.key, event.run_id)
        if task is None:
            return
        if task.retries_left > 0:
            task.retries_left -= 1
            self._make_runnable(task, cmds)
            return
        self._err(task, event.error, cmds)
        for dep_key in task.dependencies:
            dep = self.tasks.get(dep_key)
            if dep is not None:
                self._drop_if_unneeded(dep, cmds)

    def _on_missing_inputs(self, event: TaskMissingInputs, cmds: list[Command]) -> None:
        if self._end_run(event.worker_id, event.run_id, event.key) is None:
            return
        task = self._current(event.key, event.run_id)
        for input_key, address in event.missing:
            dep = self.tasks.get(input_key)
            if dep is None or dep.state != MEMORY:
                continue
            for worker_id in list(dep.who_has):
                holder = self.workers[worker_id]
                if holder.address == address:
                    dep.who_has.discard(worker_id)
                    holder.has.discard(input_key)
            if not dep.who_has:
                self._lost_data(dep, cmds)
        if task is not None:
            self._make_runnable(task, cmds)

    def _err(self, task: TaskRecord, error: ErrorInfo, cmds: list[Command]) -> None:
        """Mark ``task`` and, transitively, everything that depends on it as erred."""
        stack = [task]
        while stack:
            current = stack.pop()
            if current.state in (ERRED, MEMORY):
                # A result already computed stays valid when an input of it
                # fails later (on a recompute): it keeps its holders, and its
                # clients are not told "error" after "finished". Should it be
                # needed again, _make_runnable errs it then.
                continue
            if current.state == PROCESSING:
                # An input erred while this task was running (after a recompute
                # failed); its run ends when the worker reports.
                self._cancel_run(current, cmds)
            current.state = ERRED
            current.error = error
            current.waiting_on.clear()
            for client in current.wanted_by:
                cmds.append(NotifyClient(client, current.key, TaskStatus.ERROR, error=error))
            if self.journaling:
                cmds.append(JournalFailure(current.key, error))
            stack.extend(self.tasks[k] for k in current.dependents)

    # ----------------------------------------------------------- lifecycle

    def _make_runnable(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Queue ``task`` once its inputs are in memory, recomputing lost ones.

        Released inputs (and theirs, transitively) are made runnable first,
        each after its own inputs, walking a work list rather than recursing
        so that recomputing a long chain cannot hit Python's recursion limit.
        """

        def released_inputs(current: TaskRecord) -> list[TaskRecord]:
            deps = [self.tasks[k] for k in current.dependencies]
            if any(dep.state == ERRED for dep in deps):
                return []  # current errs: no use recomputing its other inputs
            return [dep for dep in deps if dep.state == RELEASED]

        order = _post_order(task, released_inputs)
        for current in order:
            if current.state == ERRED or (current is not task and current.state != RELEASED):
                # An input of it erred while the inputs were being queued
                # (_err reached it through their dependents), or it is queued
                # already, through another path.
                continue
            self._queue_if_inputs_ready(current, cmds)

    def _queue_if_inputs_ready(self, task: TaskRecord, cmds: list[Command]) -> None:
        """WAITING on the inputs not in memory, READY if none, ERRED if one erred.

        Released inputs have been made runnable before (see _make_runnable)."""
        task.waiting_on.clear()
        for dep_key in task.dependencies:
            dep = self.tasks[dep_key]
            if dep.state == MEMORY:
                continue
            if dep.state == ERRED:
                assert dep.error is not None
                self._err(task, dep.error, cmds)
                return
            task.waiting_on.add(dep_key)
        if task.waiting_on:
            task.state = WAITING
        else:
            self._push_ready(task, cmds)

    def _push_ready(self, task: TaskRecord, cmds: list[Command]) -> None:
        task.state = READY
        task.ready_gen = next(self._gens)
        task.ready_since = self.now
        shape = task.shape
        heap = self._ready.get(shape)
        if heap is None:
            heap = self._ready[shape] = []
        entry = (-task.priority, _order(task), task.ready_gen, task.key)
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._new_head(shape, entry)
        self._dirty_shapes.add(shape)
        self._tell_why_waiting(task, cmds)

    def _tell_why_waiting(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Tell a ready task's clients, once, if no connected worker can hold it."""
        if self._hold_until:
            return  # recovering: workers are still coming back (told when it ends)
        reason = self._why_never(task)
        if reason is not None and reason != task.waiting_reason:
            task.waiting_reason = reason
            for client in task.wanted_by:
                cmds.append(
                    NotifyClient(
                        client,
                        task.key,
                        TaskStatus.PENDING,
                        waiting_reason=f"task {task.key!r}: {reason}",
                    )
                )

    def _workers_changed(self) -> None:
        """A worker joined, left or declares other amounts: what no worker
        could hold may fit now (and the other way round)."""
        self._feasibility.clear()
        for shape in self._parked:
            bisect.insort(self._heads, (self._head_of[shape], shape))
        self._parked.clear()

    def _why_never(self, task: TaskRecord) -> str | None:
        """Why no connected worker could ever hold ``task`` (None: one could).
        Cached per shape until a worker joins, leaves or changes resources."""
        if task.shape in self._feasibility:
            return self._feasibility[task.shape]
        eligible = self._eligible(task)
        if task.allowed and not task.loose and not eligible:
            names = ", ".join(sorted(task.allowed))
            reason: str | None = f"none of the workers it is restricted to ({names}) is connected"
        else:
            reason = infeasibility_reason(task.resources, (w.declared for w in eligible))
            if reason is not None and task.allowed and not task.loose:
                names = ", ".join(sorted(task.allowed))
                reason = f"among the workers it is restricted to ({names}), {reason}"
        self._feasibility[task.shape] = reason
        return reason

    def _eligible(self, task: TaskRecord) -> list[WorkerRecord]:
        """The workers ``task`` may run on: all, or those it is restricted to."""
        if not task.allowed or task.loose:
            return list(self.workers.values())
        return [w for w in self.workers.values() if named(task, w)]

    def _needs_data(self, task: TaskRecord) -> bool:
        if task.wanted_by:
            return True
        for dependent_key in task.dependents:
            if self.tasks[dependent_key].state in (WAITING, READY, PROCESSING):
                return True
        return False

    def _drop_if_unneeded(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Forget a task nobody refers to; drop a result nobody will read.

        Then the same for its inputs, transitively: through a work list rather
        than recursion, so that releasing the end of a long chain of tasks
        cannot hit Python's recursion limit in the middle of an event.
        """
        stack = [task]
        while stack:
            task = stack.pop()
            if self.tasks.get(task.key) is not task:
                continue  # forgotten meanwhile
            if not task.wanted_by and not task.dependents:
                stack.extend(reversed(self._forget_record(task, cmds)))
            elif task.state == MEMORY and not self._needs_data(task):
                self._release_data(task, cmds)
                task.state = RELEASED
            elif task.state in (WAITING, READY, PROCESSING) and not self._needs_data(task):
                # Nothing wants it any more: stop it, but keep it for dependents
                # that are done and may need it recomputed later.
                if task.state == PROCESSING:
                    self._cancel_run(task, cmds)
                task.state = RELEASED
                task.waiting_on.clear()
                stack.extend(
                    dep
                    for k in reversed(task.dependencies)
                    if (dep := self.tasks.get(k)) is not None
                )

    def _forget(self, task: TaskRecord, cmds: list[Command]) -> None:
        for dep in self._forget_record(task, cmds):
            self._drop_if_unneeded(dep, cmds)

    def _forget_record(self, task: TaskRecord, cmds: list[Command]) -> list[TaskRecord]:
        """Forget ``task``; return its inputs, for the caller to drop if unneeded."""
        if self.tasks.get(task.key) is not task:
            return []
        if task.state == PROCESSING:
            self._cancel_run(task, cmds)
        elif task.state == MEMORY:
            self._release_data(task, cmds)
        # A READY task's heap entry goes stale once the record is gone.
        del self.tasks[task.key]
        if self.journaling:
            cmds.append(JournalForgetTask(task.key))
        # Unlink from every input before dropping any of them: dropping one
        # may forget another input whose dependents would still name this
        # (deleted) task, and _needs_data would look it up (KeyError).
        deps = [dep for k in task.dependencies if (dep := self.tasks.get(k)) is not None]
        for dep in deps:
            dep.dependents.discard(task.key)
        return deps

    def _cancel_run(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Tell the worker to stop caring about a run; the lease stays until it ends."""
        assert task.worker_id is not None
        if task.worker_id in self.workers:
            # Not to a worker that has left (while _on_worker_left recomputes
            # lost data, a run there can be reached before it is re-placed).
            cmds.append(CancelRun(task.worker_id, task.key, task.run_id))
        task.worker_id = None
        task.run_id = 0

    def _release_data(self, task: TaskRecord, cmds: list[Command]) -> None:
        for worker_id in task.who_has:
            self.workers[worker_id].has.discard(task.key)
            cmds.append(ReleaseData(worker_id, task.key))
        task.who_has = set()

    def _update_for(self, client: ClientId, task: TaskRecord) -> NotifyClient:
        status = _status_of(task)
        if status == TaskStatus.FINISHED:
            addresses = tuple(self.workers[w].address for w in sorted(task.who_has))
            return NotifyClient(client, task.key, status, addresses, task.nbytes)
        if status == TaskStatus.ERROR:
            return NotifyClient(client, task.key, status, error=task.error)
        return NotifyClient(client, task.key, status, waiting_reason=task.waiting_reason)

    # ----------------------------------------------------------- placement

    def _schedule(self, cmds: list[Command]) -> None:
        """Place ready tasks, best (priority, submission order) first, across
        shapes: where they fit in what is free, then into worker queues."""
        if self._hold_until:
            return  # recovering: workers offer what they hold first
        while True:
            if self.reservations:
                self._place_reserved(cmds)
            full, dirty_workers, dirty_shapes = (
                self._recheck_all,
                self._dirty_workers,
                self._dirty_shapes,
            )
            ticked, self._ticked = self._ticked, False
            queue_dirty = self._queue_dirty
            self._recheck_all, self._dirty_workers, self._dirty_shapes = False, set(), set()
            self._queue_dirty = set()
            if not self._ready:
                return
            if self._free_slots > 0 and (full or dirty_workers or dirty_shapes or ticked):
                self._place(cmds, full, dirty_workers, dirty_shapes)
            if self._queue_room > 0 and (full or queue_dirty or dirty_shapes):
                self._fill_queues(cmds, full, queue_dirty, dirty_shapes)
            if not (self._dirty_workers or self._queue_dirty):
                return
            # A task placed in this pass left the worker kept for it: that
            # worker is open to every task again, in this same pass.

    def _new_head(self, shape: Shape, entry: _Entry) -> None:
        """``entry`` went to the top of ``shape``'s heap (a better task came)."""
        old = self._head_of.get(shape)
        self._head_of[shape] = entry
        if shape in self._parked:
            return  # still no worker could hold it
        heads = self._heads
        if old is not None:
            del heads[bisect.bisect_left(heads, (old, shape))]
        bisect.insort(heads, (entry, shape))

    def _take_head(self, at: int) -> None:
        """``_heads[at]`` is assigned (or went stale): drop it from its shape's
        heap, and let the shape's next ready task take its place among the
        heads (never before ``at``: it comes after the one it follows);
        forget the shape if it has none left."""
        heads = self._heads
        shape = heads[at][1]
        heap = self._ready[shape]
        heapq.heappop(heap)
        following = self._peek(heap)
        del heads[at]
        if following is not None:
            self._head_of[shape] = following
            bisect.insort(heads, (following, shape), lo=at)
        else:
            del self._ready[shape]
            del self._head_of[shape]
            self._last_start.pop(shape, None)

    def _ready_head(self, at: int) -> TaskRecord | None:
        """The task of ``_heads[at]`` or, where that went stale, of the first
        current head from there on; None past the last."""
        heads = self._heads
        tasks = self.tasks
        while at < len(heads):
            _, _, gen, key = heads[at][0]
            task = tasks.get(key)
            if task is not None and task.state == READY and task.ready_gen == gen:
                return task
            self._take_head(at)
        return None

    def _pass_over(self, at: int, task: TaskRecord) -> int:
        """The head at ``at`` fits nowhere this pass looks: where to look next.
        Parked if no connected worker could ever hold it (see _parked)."""
        if self._why_never(task) is None:
            return at + 1
        del self._heads[at]
        self._parked.add(task.shape)
        return at

    def _place(
        self,
        cmds: list[Command],
        full: bool,
        dirty_workers: set[WorkerId],
        dirty_shapes: set[Shape],
    ) -> None:
        """Start ready tasks where they fit in what is free. A shape whose head
        fits nowhere is set aside for this pass: all its tasks need the same,
        so none fits."""
        workers = self.workers
        # Where neither the workers nor its shape changed, a head can go only
        # to a worker that gained room, and only if it has a thread free.
        opened = [
            w
            for worker_id in dirty_workers
            if (w := workers.get(worker_id)) is not None and w.free_slots > 0
        ]
        reserved = bool(self.reservations)
        # A worker with queued runs takes new tasks within its room only.
        queueing = self.policy.worker_queue != 0
        starving_after = self.policy.starvation_after
        at = 0
        while (task := self._ready_head(at)) is not None:
            # _candidates written out: its call costs ~5% of the decisions a
            # second (1,000 workers, 3 interleaved runs: 97-103k vs 103-113k).
            strict = bool(task.allowed) and not task.loose
            candidates: Iterable[WorkerRecord]
            if full or task.shape in dirty_shapes:
                candidates = self._eligible(task) if strict else workers.values()
            else:
                candidates = [w for w in opened if named(task, w)] if strict else opened
            if reserved:
                candidates = [w for w in candidates if w.reserved_for in (None, task.key)]
            # The calls for inputs and preferences only where there are any:
            # most tasks have neither (-0.3 us a head).
            worker = pick_worker(
                task.resources,
                [w.room() if w.queued else w for w in candidates] if queueing else candidates,
                self._input_bytes(task) if task.dependencies else None,
                self._pack,
                self._preferred(task) if task.loose else None,
            )
            if worker is None:
                at = self._pass_over(at, task)
                # Never starved before it has waited the bound since it
                # became ready: the call is spared for most heads.
                if self.now - task.ready_since >= starving_after and self._reserve_for(task):
                    reserved = True
                continue
            self._take_head(at)
            self._assign(task, workers[worker.worker_id], cmds)
            if self._free_slots <= 0:
                return

    def _candidates(
        self, task: TaskRecord, every_worker: bool, changed: list[WorkerRecord]
    ) -> Iterable[WorkerRecord]:
        """Workers a placement pass tries for ``task``: all it may use, or (when
        neither its shape nor the set of workers changed since the last pass)
        those of ``changed`` (the workers that gained room, found once per
        pass) it may use, as only they can take what fitted nowhere."""
        strict = bool(task.allowed) and not task.loose
        if every_worker:
            return self._eligible(task) if strict else self.workers.values()
        return [w for w in changed if named(task, w)] if strict else changed

    def _preferred(self, task: TaskRecord) -> set[WorkerId] | None:
        """The workers a loosely restricted task prefers (None: no preference)."""
        if not (task.loose and task.allowed):
            return None
        return {w.worker_id for w in self.workers.values() if named(task, w)}

    def _fill_queues(
        self,
        cmds: list[Command],
        full: bool,
        dirty_workers: set[WorkerId],
        dirty_shapes: set[Shape],
    ) -> None:
        """Queue ready tasks that fit nowhere now on workers whose queue has
        room and that declare enough to run them: each worker then starts its
        next task as soon as one ends. A reserved worker gets nothing queued."""
        workers = self.workers
        changed = [w for worker_id in dirty_workers if (w := workers.get(worker_id)) is not None]
        at = 0
        while (task := self._ready_head(at)) is not None:
            candidates = self._candidates(task, full or task.shape in dirty_shapes, changed)
            worker = pick_queue(
                task.resources,
                candidates,
                self._input_bytes(task),
                self._pack,
                self._preferred(task),
                self._queue_depth(task),
            )
            if worker is None:
                at = self._pass_over(at, task)
                continue
            self._take_head(at)
            self._assign(task, self.workers[worker.worker_id], cmds, queued=True)
            if self._queue_room <= 0:
                return

    def _queue_limit(self, nthreads: int) -> int:
        limit = self.policy.worker_queue
        return QUEUE_MAX_PER_THREAD * nthreads if limit is None else max(0, limit)

    def _learn_duration(self, prefix: str, duration: float) -> None:
        """Fold a run's duration into the moving mean of its kind's."""
        durations = self._durations
        mean = durations.get(prefix)
        if mean is None:
            if len(durations) >= MAX_KINDS_TIMED:
                durations.clear()  # unique keys without a common prefix: start over
            durations[prefix] = duration
        else:
            durations[prefix] = mean + (duration - mean) * DURATION_WEIGHT

    def _queue_depth(self, task: TaskRecord) -> int | None:
        """How many queued runs per thread a worker may hold for ``task`` to
        join them: about QUEUE_TARGET_S of work of its kind (as measured so
        far), at least QUEUE_PER_THREAD. None: the policy fixed the queue."""
        if self.policy.worker_queue is not None:
            return None
        mean = self._durations.get(task.prefix)
        if mean is None or mean * QUEUE_PER_THREAD >= QUEUE_TARGET_S:
            return QUEUE_PER_THREAD
        return min(QUEUE_MAX_PER_THREAD, math.ceil(QUEUE_TARGET_S / mean))

    def _place_reserved(self, cmds: list[Command]) -> None:
        """Start starving tasks whose reserved worker now has room; drop
        reservations whose task is no longer waiting."""
        for key, worker_id in list(self.reservations.items()):
            task = self.tasks.get(key)
            worker = self.workers[worker_id]
            if task is None or task.state != READY:
                del self.reservations[key]
                worker.reserved_for = None
                self._dirty_workers.add(worker_id)  # open to every task again
                self._queue_dirty.add(worker_id)
            elif (
                worker.free_slots > 0
                and fits(task.resources, worker.free)
                and (
                    not worker.queued
                    or ((room := worker.room()).free_slots > 0 and fits(task.resources, room.free))
                )
            ):
                self._assign(task, worker, cmds)  # its heap entry goes stale

    def _reserve_for(self, task: TaskRecord) -> bool:
        """Reserve a worker for ``task`` if it has starved; True if one was.

        Starved: waiting longer than the bound, with no task of its shape
        started meanwhile. Small tasks that start all the time are queued
        behind each other, not starved, and take no reservation that would
        block the big task they starve.
        """
        since = max(task.ready_since, self._last_start.get(task.shape, task.ready_since))
        if self.now - since < self.policy.starvation_after:
            return False
        if task.key in self.reservations:
            return False
        best: WorkerRecord | None = None
        best_key: tuple[float, int, int] | None = None
        for worker in self._eligible(task):
            if worker.reserved_for is not None or not fits(task.resources, worker.declared):
                continue
            # The worker closest to having room: least missing, relative to
            # the need, then fewest runs to wait for, then the oldest.
            shortfall = sum(
                max(0, need - worker.free.get(name, 0)) / need
                for name, need in task.resources.items()
            )
            key = (shortfall, len(worker.runs), worker.worker_id)
            if best_key is None or key < best_key:
                best, best_key = worker, key
        if best is None:
            return False
        best.reserved_for = task.key
        self.reservations[task.key] = best.worker_id
        return True

    def _peek(self, heap: list[_Entry]) -> _Entry | None:
        while heap:
            entry = heap[0]
            task = self.tasks.get(entry[3])
            if task is not None and task.state == READY and task.ready_gen == entry[2]:
                return entry
            heapq.heappop(heap)
        return None

    def _input_bytes(self, task: TaskRecord) -> dict[WorkerId, int] | None:
        if not task.dependencies:
            return None
        totals: dict[WorkerId, int] = {}
        for dep_key in task.dependencies:
            dep = self.tasks[dep_key]
            for worker_id in dep.who_has:
                totals[worker_id] = totals.get(worker_id, 0) + dep.nbytes
        return totals

    def _assign(
        self, task: TaskRecord, worker: WorkerRecord, cmds: list[Command], queued: bool = False
    ) -> None:
        run_id = next(self._run_ids)
        if queued:
            worker.queued[run_id] = Run(task.key, task.resources)
            self._queue_room -= 1
            need = worker.queued_need
            for name, amount in task.resources.items():
                if amount:
                    need[name] = need.get(name, 0) + amount
        else:
            free = worker.free
            for name, amount in task.resources.items():
                free[name] -= amount
            worker.free_slots -= 1
            self._free_slots -= 1
            worker.runs[run_id] = Run(task.key, task.resources)
        self._last_start[task.shape] = self.now
        kept_on = self.reservations.pop(task.key, None)
        if kept_on is not None:
            self.workers[kept_on].reserved_for = None
            self._dirty_workers.add(kept_on)
            self._queue_dirty.add(kept_on)
        task.state = PROCESSING
        task.worker_id = worker.worker_id
        task.run_id = run_id
        task.waiting_reason = ""
        inputs = (
            tuple(
                InputLocation(
                    dep_key,
                    tuple(self.workers[w].address for w in sorted(self.tasks[dep_key].who_has)),
                    self.tasks[dep_key].nbytes,
                )
                for dep_key in task.dependencies
            )
            if task.dependencies
            else ()  # no generator to build and run for the many without inputs
        )
        cmds.append(
            AssignTask(
                worker.worker_id,
                task.key,
                run_id,
                task.payload,
                task.resources,
                inputs,
                task.incarnation,
                queued,
                task.priority,
                task.depth,
            )
        )

    # ---------------------------------------------------------- inspection

    def find_worker(self, name_or_address: str) -> WorkerRecord | None:
        for worker in self.workers.values():
            if name_or_address in (worker.address, worker.name):
                return worker
        return None

    def explain(self, key: str) -> str:
        """One sentence on why task ``key`` is not running (or what it is doing)."""
        task = self.tasks.get(key)
        if task is None:
            return f"task {key!r} is not known to the scheduler (never submitted, or released)"
        if task.state == PROCESSING:
            assert task.worker_id is not None
            holder = self.workers[task.worker_id]
            if task.run_id in holder.queued:
                return (
                    f"task {key!r} is queued on {holder.name}, "
                    "to start there when its resources are free"
                )
            return f"task {key!r} is running on {holder.name}"
        if task.state == MEMORY:
            names = ", ".join(sorted(self.workers[w].name for w in task.who_has))
            return f"task {key!r} has finished; its result is held by {names}"
        if task.state == ERRED:
            assert task.error is not None
            return f"task {key!r} erred: {task.error.type_name}: {task.error.message}"
        if task.state == RELEASED:
            return f"task {key!r} is not needed by anyone now (its result was released)"
        if task.state == WAITING:
            inputs = ", ".join(f"{k!r} ({self.tasks[k].state})" for k in sorted(task.waiting_on))
            return f"task {key!r} waits for its input(s) {inputs}"
        reason = self._why_never(task)
        if reason is not None:
            return f"task {key!r} cannot run yet: {reason}"
        return self._explain_busy(task)

    def _explain_busy(self, task: TaskRecord) -> str:
        """A ready task that fits some worker in total: what is busy, what is ahead."""
        eligible = [w for w in self._eligible(task) if fits(task.resources, w.declared)]
        busy: set[str] = set()
        for worker in eligible:
            if worker.free_slots <= 0:
                busy.add("threads")
            for name, need in task.resources.items():
                if worker.free.get(name, 0) < need:
                    busy.add(name)
        heap = self._ready.get(task.shape, [])
        mine = (-task.priority, _order(task))
        ahead = 0
        for prio, order, gen, key in heap:
            other = self.tasks.get(key)
            if (
                other is not None
                and other is not task
                and other.state == READY
                and other.ready_gen == gen
                and (prio, order) < mine
            ):
                ahead += 1
        what = " and ".join(sorted(busy)) or "capacity"
        kept = self.reservations.get(task.key)
        note = f"; {self.workers[kept].name} is reserved for it" if kept is not None else ""
        return (
            f"task {task.key!r} waits for {what}, busy on every worker that fits it "
            f"({len(eligible)}); {ahead} task(s) like it are ahead of it{note}"
        )

    def snapshot(self) -> ClusterSnapshot:
        counts = Counter(task.state.value for task in self.tasks.values())
        return ClusterSnapshot(
            workers=[
                WorkerSnapshot(
                    worker_id=w.worker_id,
                    name=w.name,
                    address=w.address,
                    nthreads=w.nthreads,
                    resources=dict(w.declared),
                    used=w.held(),
                    running=len(w.runs),
                    pid=w.pid,
                    queued=len(w.queued),
                )
                for w in sorted(self.workers.values(), key=lambda w: w.worker_id)
            ],
            task_counts=dict(counts),
        )

    def validate(self) -> None:
        """Check the books; raise :class:`InvariantError` naming the first fault."""

        def check(condition: bool, message: str) -> None:
            if not condition:
                raise InvariantError(message)

        for worker in self.workers.values():
            held: Counter[str] = Counter()
            for run in worker.runs.values():
                held.update(run.resources)
            check(set(worker.free) == set(worker.declared), f"worker {worker.name}: free keys")
            for name, declared in worker.declared.items():
                free = worker.free[name]
                check(
                    free + held[name] == declared,
                    f"worker {worker.name}: {name} free {free} + held {held[name]} "
                    f"!= declared {declared}",
                )
                check(
                    free >= 0 or worker.shrunk,
                    f"worker {worker.name}: {name} over-committed (free {free})",
                )
            for name in held:
                check(name in worker.declared, f"worker {worker.name}: holds undeclared {name}")
            check(
                worker.free_slots == worker.nthreads - len(worker.runs) >= 0,
                f"worker {worker.name}: {len(worker.runs)} runs on {worker.nthreads} threads",
            )
            for run_id, run in itertools.chain(worker.runs.items(), worker.queued.items()):
                task = self.tasks.get(run.key)
                if task is not None and task.run_id == run_id:
                    check(
                        task.state == PROCESSING and task.worker_id == worker.worker_id,
                        f"run {run_id} of {run.key} on the wrong worker",
                    )
            check(
                len(worker.queued) <= worker.queue_limit,
                f"worker {worker.name}: {len(worker.queued)} queued, limit {worker.queue_limit}",
            )
            check(
                not (worker.queued.keys() & worker.runs.keys()),
                f"worker {worker.name}: a run both queued and held",
            )
            queued_need: Counter[str] = Counter()
            for run in worker.queued.values():
                queued_need.update(run.resources)
            check(
                dict(+queued_need) == worker.queued_need,
                f"worker {worker.name}: queued needs out of sync",
            )
            for key in worker.has:
                task = self.tasks.get(key)
                check(
                    task is not None and task.state == MEMORY and worker.worker_id in task.who_has,
                    f"worker {worker.name} holds {key} unknown to who_has",
                )
        check(
            self._free_slots == sum(w.free_slots for w in self.workers.values()),
            "free thread count out of sync",
        )
        check(
            self._queue_room == sum(w.queue_limit - len(w.queued) for w in self.workers.values()),
            "free queue places out of sync",
        )
        check(self._head_of.keys() == self._ready.keys(), "shape heads out of sync")
        check(self._heads == sorted(self._heads), "shape heads out of order")
        check(
            len(self._heads) + len(self._parked) == len(self._ready),
            "a shape has more than one head, or none",
        )
        standing = set(self._heads)
        for shape, heap in self._ready.items():
            check(
                bool(heap)
                and self._head_of[shape] is heap[0]
                and ((shape in self._parked) != ((heap[0], shape) in standing)),
                f"the head of shape {shape} is not among the heads (or parked)",
            )
        for shape in self._parked:
            check(shape in self._ready, f"parked shape {shape} has no ready tasks")
            _, _, gen, key = self._head_of[shape]
            parked = self.tasks.get(key)
            if parked is not None and parked.state == READY and parked.ready_gen == gen:
                check(
                    not any(fits(parked.resources, w.declared) for w in self._eligible(parked)),
                    f"{parked.key} parked though a worker could hold it",
                )
        for heap in self._ready.values() if not self._hold_until else ():
            head = next(
                (
                    t
                    for _, _, gen, k in sorted(heap)
                    if (t := self.tasks.get(k)) is not None
                    and t.state == READY
                    and t.ready_gen == gen
                ),
                None,
            )
            if head is None:
                continue
            room = [
                w.room() if w.queued else w
                for w in self._eligible(head)
                if w.reserved_for in (None, head.key)
            ]
            check(
                pick_worker(head.resources, room) is None,
                f"{head.key} waits though a worker has room for it",
            )
        for key, worker_id in self.reservations.items():
            kept = self.workers.get(worker_id)
            check(kept is not None and kept.reserved_for == key, f"reservation of {key} broken")
        for worker in self.workers.values():
            if worker.reserved_for is not None:
                check(
                    self.reservations.get(worker.reserved_for) == worker.worker_id,
                    f"worker {worker.name} kept for {worker.reserved_for} unknown",
                )
        for key, task in self.tasks.items():
            if task.state == PROCESSING:
                holder = self.workers.get(task.worker_id) if task.worker_id is not None else None
                check(holder is not None, f"{key} processing on a lost worker")
                lease = None
                if holder is not None:
                    lease = holder.runs.get(task.run_id) or holder.queued.get(task.run_id)
                check(lease is not None and lease.key == key, f"{key} has no lease")
            else:
                check(task.worker_id is None and task.run_id == 0, f"{key} keeps a stale run")
            if task.state == MEMORY:
                check(bool(task.who_has), f"{key} in memory nowhere")
                for worker_id in task.who_has:
                    check(key in self.workers[worker_id].has, f"{key} who_has out of sync")
            else:
                check(not task.who_has, f"{key} ({task.state}) still has holders")
            if task.state == WAITING:
                check(bool(task.waiting_on), f"{key} waiting on nothing")
            if task.state == READY:
                for dep_key in task.dependencies:
                    check(self.tasks[dep_key].state == MEMORY, f"{key} runs without {dep_key}")
            if task.state == PROCESSING:
                # A running task whose input's last copy was lost since keeps
                # running (it may hold the input already) while the input is
                # recomputed; if the recompute errs, _err stops the run.
                for dep_key in task.dependencies:
                    check(
                        self.tasks[dep_key].state in (MEMORY, WAITING, READY, PROCESSING),
                        f"{key} runs without {dep_key} ({self.tasks[dep_key].state})",
                    )
            for dep_key in task.dependencies:
                dep = self.tasks.get(dep_key)
                if task.state != ERRED or dep is not None:
                    check(dep is not None and key in dep.dependents, f"{key}: broken dep link")
            for dependent_key in task.dependents:
                check(dependent_key in self.tasks, f"{key}: dangling dependent {dependent_key}")
            for client in task.wanted_by:
                check(key in self.clients.get(client, ()), f"{key}: client books out of sync")
        for client in self._disconnected:
            check(client in self.clients, f"disconnected client {client} unknown")
        for client, keys in self.clients.items():
            for key in keys:
                check(key in self.tasks and client in self.tasks[key].wanted_by, f"{client}:{key}")
