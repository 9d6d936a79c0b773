"""The placement pass: which ready task goes to which worker, and when.

:class:`Placer` owns the pass itself (into free capacity, then into worker
queues), the reservations (a starving task and the worker kept for it, also
``WorkerRecord.reserved_for``; among them those of queued runs that were
overtaken), why each shape can never run on the connected workers
(feasibility, kept until the workers change), when a task of each waiting
shape last started, and the measured duration of each kind of task (how deep
a worker's queue may be for it). Each pass looks only at what changed since
the last (:class:`~.records.Changes`); it assigns a task (READY to
PROCESSING, its run) with a lease from the books
(:meth:`.books.Books.assign`).

It must never add or subtract resources, threads or queue places (the books
do), change a task's links or results (the graph does), or tell clients
anything. Its hot loop
(:meth:`Placer._place`) is written out on purpose: local variables and no
call per candidate worker; the choice among candidates is
:func:`.placement.pick_worker` / :func:`.placement.pick_queue`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from apportion_common.locations import InputLocation

from .books import Books
from .commands import AssignTask, Command
from .events import WorkerId
from .placement import fits, infeasibility_reason, pick_queue, pick_worker
from .policy import (
    DURATION_WEIGHT,
    QUEUE_MAX_PER_THREAD,
    QUEUE_PER_THREAD,
    QUEUE_TARGET_S,
    SchedulingPolicy,
)
from .queues import ReadyQueues
from .records import (
    PROCESSING,
    READY,
    Changes,
    Clock,
    Shape,
    TaskRecord,
    WorkerRecord,
    named,
)

#: Kinds of task whose durations are kept (each a few dozen bytes).
MAX_KINDS_TIMED = 10_000


class Placer:
    def __init__(
        self,
        policy: SchedulingPolicy,
        tasks: dict[str, TaskRecord],
        books: Books,
        queues: ReadyQueues,
        changes: Changes,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._pack = policy.placement == "pack"
        self._tasks = tasks
        self._books = books
        #: the workers open to new work (retiring and paused ones are not)
        self._workers = books.open
        self._queues = queues
        self._changes = changes
        self._clock = clock
        #: starving task key -> the worker kept for it (mirrors reserved_for)
        self.reservations: dict[str, WorkerId] = {}
        #: the reservations of queued runs (key -> run id): the task is
        #: PROCESSING in its worker's queue, not READY
        self._queued_runs: dict[str, int] = {}
        # When a task of each waiting shape last started: a shape whose tasks
        # keep starting is queued, not starved.
        self._last_start: dict[Shape, float] = {}
        # Why each resource shape cannot run on any connected worker (None:
        # it can), as of the books' version _feasible_at.
        self._feasibility: dict[Shape, str | None] = {}
        self._feasible_at = 0
        #: moving mean duration in seconds of each kind of task (key_prefix)
        self._durations: dict[str, float] = {}

    # ------------------------------------------------------------ the pass

    def schedule(self, cmds: list[Command]) -> None:
        """Place ready tasks, best (priority, submission order) first, across
        shapes: where they fit in what is free, then into worker queues."""
        if self._feasible_at != self._books.version:
            self._catch_up()
        if self._clock.hold_until:
            return  # recovering: workers offer what they hold first
        changes = self._changes
        books = self._books
        while True:
            if self.reservations:
                self._place_reserved(cmds)
            full, dirty_workers, dirty_shapes = (
                changes.everything,
                changes.workers,
                changes.shapes,
            )
            ticked, queue_dirty = changes.ticked, changes.queues
            changes.everything, changes.workers, changes.shapes = False, set(), set()
            changes.ticked, changes.queues = False, set()
            if not self._queues.heaps:
                return
            if books.free_slots > 0 and (full or dirty_workers or dirty_shapes or ticked):
                self._place(cmds, full, dirty_workers, dirty_shapes)
            if books.queue_room > 0 and (full or queue_dirty or dirty_shapes):
                self._fill_queues(cmds, full, queue_dirty, dirty_shapes)
            if not (changes.workers or changes.queues):
                return
            # A task placed in this pass left the worker kept for it: that
            # worker is open to every task again, in this same pass.

    def _catch_up(self) -> None:
        """A worker joined, left or declared other amounts since the books'
        version _feasible_at: what no worker could hold may fit now (and the
        other way round)."""
        self._feasible_at = self._books.version
        self._feasibility.clear()
        self._queues.unpark_all()

    def _pass_over(self, at: int, task: TaskRecord) -> int:
        """The head at ``at`` fits nowhere this pass looks: where to look next.
        Parked if no connected worker could ever hold it."""
        if self._why_never(task) is None:
            return at + 1
        self._queues.park(at)
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
        workers = self._workers
        books = self._books
        queues = self._queues
        # Where neither the workers nor its shape changed, a head can go only
        # to a worker that gained room, and only if it has a thread free.
        opened = [
            w
            for worker_id in dirty_workers
            if (w := workers.get(worker_id)) is not None and w.free_slots > 0
        ]
        reserved = bool(self.reservations)
        # A worker with queued runs takes new tasks within its room only.
        queueing = self._policy.worker_queue != 0
        starving_after = self._policy.starvation_after
        now = self._clock.now
        at = 0
        while (task := queues.ready_head(at)) is not None:
            # _candidates written out: a call here is paid for every head tried.
            strict = bool(task.allowed) and not task.loose
            candidates: Iterable[WorkerRecord]
            if full or task.shape in dirty_shapes:
                candidates = self.eligible(task) if strict else workers.values()
            else:
                candidates = [w for w in opened if named(task, w)] if strict else opened
            if reserved:
                candidates = [w for w in candidates if w.reserved_for in (None, task.key)]
            # The calls for inputs and preferences only where there are any:
            # most tasks have neither.
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
                if now - task.ready_since >= starving_after and self._reserve_for(task):
                    reserved = True
                continue
            queues.take_head(at)
            self._assign(task, workers[worker.worker_id], cmds)
            if books.free_slots <= 0:
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
            return self.eligible(task) if strict else self._workers.values()
        return [w for w in changed if named(task, w)] if strict else changed

    def _preferred(self, task: TaskRecord) -> set[WorkerId] | None:
        """The workers a loosely restricted task prefers (None: no preference)."""
        if not (task.loose and task.allowed):
            return None
        return {w.worker_id for w in self._workers.values() if named(task, w)}

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
        workers = self._workers
        queues = self._queues
        changed = [w for worker_id in dirty_workers if (w := workers.get(worker_id)) is not None]
        at = 0
        while (task := queues.ready_head(at)) is not None:
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
            queues.take_head(at)
            self._assign(task, workers[worker.worker_id], cmds, queued=True)
            if self._books.queue_room <= 0:
                return

    def _input_bytes(self, task: TaskRecord) -> dict[WorkerId, int] | None:
        if not task.dependencies:
            return None
        totals: dict[WorkerId, int] = {}
        for dep_key in task.dependencies:
            dep = self._tasks[dep_key]
            for worker_id in dep.who_has:
                totals[worker_id] = totals.get(worker_id, 0) + dep.nbytes
        return totals

    def _assign(
        self, task: TaskRecord, worker: WorkerRecord, cmds: list[Command], queued: bool = False
    ) -> None:
        now = self._clock.now
        run_id = self._books.assign(worker, task, queued, now)
        self._last_start[task.shape] = now
        if self.reservations:
            self._unreserve(task.key)
        task.state = PROCESSING
        task.worker_id = worker.worker_id
        task.run_id = run_id
        task.waiting_reason = ""
        tasks = self._tasks
        inputs = (
            tuple(self._input_location(worker, tasks[dep_key]) for dep_key in task.dependencies)
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
                task.isolate,
            )
        )

    def _input_location(self, worker: WorkerRecord, dep: TaskRecord) -> InputLocation:
        """Where ``dep``'s result lives, holders on ``worker``'s host first
        (their copy comes through shared memory)."""
        holders = [self._books.workers[w] for w in sorted(dep.who_has)]  # retiring too
        host = worker.host_id
        if host:
            holders.sort(key=lambda h: h.host_id != host)
            same = tuple(h.host_id == host for h in holders)
        else:
            same = ()
        return InputLocation(dep.key, tuple(h.address for h in holders), dep.nbytes, same)

    # ------------------------------------------------------- queue depth

    def learn_duration(self, prefix: str, duration: float) -> None:
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
        if self._policy.worker_queue is not None:
            return None
        mean = self._durations.get(task.prefix)
        if mean is None or mean * QUEUE_PER_THREAD >= QUEUE_TARGET_S:
            return QUEUE_PER_THREAD
        return min(QUEUE_MAX_PER_THREAD, math.ceil(QUEUE_TARGET_S / mean))

    # ------------------------------------------------------- feasibility

    def why_never(self, task: TaskRecord) -> str | None:
        """Why no connected worker could ever hold ``task`` (None: one could).
        Kept per shape until a worker joins, leaves or changes resources."""
        if self._feasible_at != self._books.version:
            self._catch_up()
        # The cached answer read here: this runs for every task made ready.
        feasibility = self._feasibility
        shape = task.shape
        if shape in feasibility:
            return feasibility[shape]
        return self._why_never(task)

    def _why_never(self, task: TaskRecord) -> str | None:
        """why_never, the workers unchanged since the last _catch_up (as
        within a pass)."""
        if task.shape in self._feasibility:
            return self._feasibility[task.shape]
        eligible = self.could_hold(task)
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

    def eligible(self, task: TaskRecord) -> list[WorkerRecord]:
        """The workers ``task`` may run on: all, or those it is restricted to."""
        if not task.allowed or task.loose:
            return list(self._workers.values())
        return [w for w in self._workers.values() if named(task, w)]

    def could_hold(self, task: TaskRecord) -> list[WorkerRecord]:
        """:meth:`eligible`, and the workers paused for memory: a task only
        they fit waits for one to resume, as for a busy one."""
        paused = self._books.paused
        if not paused:
            return self.eligible(task)
        return self.eligible(task) + [
            w for w in paused.values() if not task.allowed or task.loose or named(task, w)
        ]

    # ------------------------------------------------------ reservations

    def _place_reserved(self, cmds: list[Command]) -> None:
        """Start starving tasks whose reserved worker now has room; drop
        reservations whose task is no longer waiting (a queued run's: once
        it is no longer queued there)."""
        tasks = self._tasks
        for key, worker_id in list(self.reservations.items()):
            task = tasks.get(key)
            worker = self._workers[worker_id]
            run_id = self._queued_runs.get(key)
            if run_id is not None:
                # Started, ended, called off or placed again: it waits no more.
                if task is None or task.run_id != run_id or run_id not in worker.queued:
                    self._unreserve(key)
            elif task is None or task.state != READY:
                self._unreserve(key)
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
        if self._clock.now - since < self._policy.starvation_after:
            return False
        if task.key in self.reservations:
            return False
        best: WorkerRecord | None = None
        best_key: tuple[float, int, int] | None = None
        for worker in self.eligible(task):
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

    def tick(self) -> None:
        """Time passed (the clock moved): reserve the worker of each queued
        run that has starved there. And forget last starts of shapes with
        nothing waiting, once there are more than shapes waiting (a shape
        that fills again has every task ready since after its last start)."""
        last_start = self._last_start
        if len(last_start) > len(self._queues.heaps):
            for shape in [s for s in last_start if s not in self._queues.heaps]:
                del last_start[shape]
        if self._policy.worker_queue != 0 and not self._clock.hold_until:
            self._reserve_overtaken()

    def _reserve_overtaken(self) -> None:
        """A queued run starves when its worker keeps starting runs assigned
        after it (that fit in what is free, as it does not) for longer than
        the bound: that worker is kept for it, as for a starving ready task,
        until it starts (or ends, or leaves the queue).

        Only the oldest queued run of a worker that is still current can be
        the one: runs queued later were assigned later (and overtaken by
        fewer)."""
        now = self._clock.now
        starving_after = self._policy.starvation_after
        tasks = self._tasks
        for worker in self._workers.values():
            if not worker.queued or worker.reserved_for is not None:
                continue
            for run_id, run in worker.queued.items():
                if run_id > worker.last_started:
                    break  # nothing assigned after it started: waiting its turn
                task = tasks.get(run.key)
                if task is None or task.run_id != run_id:
                    continue  # called off: its place waits for the worker's report
                if now - run.since >= starving_after:
                    worker.reserved_for = task.key
                    self.reservations[task.key] = worker.worker_id
                    self._queued_runs[task.key] = run_id
                break

    def drop_reservation(self, key: str) -> None:
        """``key`` no longer waits (its result came back another way)."""
        if key in self.reservations:
            self._unreserve(key)

    def worker_left(self, worker: WorkerRecord) -> None:
        """``worker`` left (the books closed already): its reservation goes."""
        if worker.reserved_for is not None:
            self._unreserve(worker.reserved_for)

    def _unreserve(self, key: str) -> None:
        kept_on = self.reservations.pop(key, None)
        self._queued_runs.pop(key, None)
        if kept_on is None:
            return
        worker = self._workers.get(kept_on)
        if worker is not None:
            worker.reserved_for = None
            # Open to every task again.
            self._changes.workers.add(kept_on)
            self._changes.queues.add(kept_on)
