"""The books: what each worker declares, holds and has queued, kept exactly.

:class:`Books` owns the set of connected workers and, on each
:class:`~.records.WorkerRecord`, its capacity and runs (declared, free,
free_slots, runs, queued, queued_need, queue_limit, shrunk, last_started),
the totals of free threads and free queue places across workers, and the run
ids. It is the only place that adds or subtracts resources, threads and
queue places, in a few transitions of a lease (:class:`~.records.Run`)::

    assign          -> a run (holds its resources now) or a queued run
                       (takes a queue place, holds nothing)
    queued run      -> start (TaskStarted): holds its resources from now on
    run, queued run -> end (finished, erred, dropped unstarted): released
                       exactly once; a second report frees nothing
    worker          -> join, leave (every lease closed with it), redeclare,
                       pause and resume (its memory: closed to new work meanwhile)

Each transition that gives room back marks it for the placement pass
(:class:`~.records.Changes`) itself, so no event handler can forget to.

It must never decide where a task goes, change a task record, or send a
command: the placement pass and the event handlers do that with what it
returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from apportion_common.resources import Quanta

from .events import WorkerId, WorkerJoined
from .policy import QUEUE_MAX_PER_THREAD, SchedulingPolicy
from .records import Changes, Run, TaskRecord, WorkerRecord


class Books:
    def __init__(self, policy: SchedulingPolicy, changes: Changes) -> None:
        self._policy = policy
        self._changes = changes
        self.workers: dict[WorkerId, WorkerRecord] = {}
        #: the connected workers that take new work (all but those retiring):
        #: the only ones placement looks at
        self.open: dict[WorkerId, WorkerRecord] = {}
        #: the unretiring workers paused for memory: closed to new work, yet
        #: they count as able to hold a task (they resume)
        self.paused: dict[WorkerId, WorkerRecord] = {}
        #: the latest run id given out
        self.last_run_id = 0
        #: free threads on all workers together
        self.free_slots = 0
        #: free places in all worker queues together
        self.queue_room = 0
        #: every resource name any worker has declared since the start
        self.names_seen: set[str] = set()
        #: workers by the host id they registered (those with shared memory)
        self._hosts: dict[str, set[WorkerId]] = {}
        #: grows each time a worker joins, leaves or declares other amounts:
        #: what no worker could hold may fit now (and the other way round)
        self.version = 0
        self._run_ids = itertools.count(1)

    # ------------------------------------------------------------ workers

    def join(self, event: WorkerJoined) -> WorkerRecord:
        worker = self.workers[event.worker_id] = WorkerRecord(
            worker_id=event.worker_id,
            name=event.name,
            address=event.address,
            nthreads=event.nthreads,
            declared=dict(event.resources),
            free=dict(event.resources),
            free_slots=event.nthreads,
            pid=event.pid,
            declared_text=dict(event.resources_text),
            host_id=event.host_id,
            queue_limit=self._queue_limit(event.nthreads),
            gpus=event.gpus,
            memory_limit=event.memory_limit,
        )
        self.open[event.worker_id] = worker
        if event.host_id:
            self._hosts.setdefault(event.host_id, set()).add(event.worker_id)
        self.free_slots += event.nthreads
        self.queue_room += worker.queue_limit
        self.names_seen.update(event.resources)
        self.version += 1
        self._changes.workers.add(event.worker_id)
        self._changes.queues.add(event.worker_id)
        return worker

    def _queue_limit(self, nthreads: int) -> int:
        limit = self._policy.worker_queue
        return QUEUE_MAX_PER_THREAD * nthreads if limit is None else max(0, limit)

    def leave(self, worker_id: WorkerId) -> WorkerRecord | None:
        """Close a lost worker's books, every lease on them at once (its runs
        and queued runs stay on the record for the caller to place again).
        None if it was not connected."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        self.open.pop(worker_id, None)
        self.paused.pop(worker_id, None)
        on_host = self._hosts.get(worker.host_id)
        if on_host is not None:
            on_host.discard(worker_id)
            if not on_host:
                del self._hosts[worker.host_id]
        self.free_slots -= worker.free_slots
        self.queue_room -= worker.queue_limit - len(worker.queued)
        self.version += 1
        self._changes.everything = True
        return worker

    def close_to_work(self, worker: WorkerRecord) -> None:
        """``worker`` retires: nothing new goes there (its runs and queued runs
        carry on, and its books stay open until it leaves)."""
        worker.retiring = True
        paused = self.paused.pop(worker.worker_id, None)
        if self.open.pop(worker.worker_id, None) is not None or paused is not None:
            self.version += 1  # what only it could hold now fits nowhere
            self._changes.everything = True

    def pause(self, worker: WorkerRecord, paused: bool) -> None:
        """``worker``'s memory crossed its pause fraction (``paused``): nothing
        new goes there (its runs and queued runs stay); or it fell back
        below: open to work again (unless it retires meanwhile). Drop its
        reservation first: placement no longer sees it."""
        if paused == worker.paused:
            return
        worker.paused = paused
        worker_id = worker.worker_id
        if paused:
            worker.paused_after = self.last_run_id
            if self.open.pop(worker_id, None) is not None:
                self.paused[worker_id] = worker
        elif self.paused.pop(worker_id, None) is not None:
            self.open[worker_id] = worker
            self._changes.workers.add(worker_id)
            self._changes.queues.add(worker_id)

    def on_host(self, host_id: str) -> frozenset[WorkerId]:
        """The connected workers that registered ``host_id``."""
        return frozenset(self._hosts.get(host_id, ()))

    def redeclare(
        self, worker: WorkerRecord, resources: Quanta, written: Mapping[str, str] | None = None
    ) -> Quanta:
        """The worker now declares ``resources`` (``written`` so, where the
        operator spelled them out; an amount that did not change keeps its
        old spelling). A resource withdrawn while
        running tasks hold some stays declared at 0 until they end, and free
        goes below 0 where held exceeds declared (``shrunk``). Returns what it
        declares now."""
        held = worker.held()
        unchanged = {
            name: text
            for name, text in worker.declared_text.items()
            if resources.get(name) == worker.declared.get(name)
        }
        worker.declared_text = {**unchanged, **(written or {})}
        declared = dict(resources)
        for name, amount in held.items():
            if amount:
                declared.setdefault(name, 0)  # still held until those runs end
        worker.declared = declared
        worker.free = {name: declared[name] - held.get(name, 0) for name in declared}
        worker.shrunk = any(amount < 0 for amount in worker.free.values())
        self.names_seen.update(resources)
        self.version += 1
        self._changes.workers.add(worker.worker_id)
        self._changes.queues.add(worker.worker_id)
        return declared

    # ------------------------------------------------------------- leases

    def assign(self, worker: WorkerRecord, task: TaskRecord, queued: bool, now: float) -> int:
        """Give ``task`` a run on ``worker``: its resources and a thread now,
        or (``queued``) a place in the worker's queue. Returns the run id."""
        run_id = self.last_run_id = next(self._run_ids)
        if queued:
            worker.queued[run_id] = Run(task.key, task.resources, now)
            self.queue_room -= 1
            need = worker.queued_need
            for name, amount in task.resources.items():
                if amount:
                    need[name] = need.get(name, 0) + amount
        else:
            free = worker.free
            for name, amount in task.resources.items():
                free[name] -= amount
            worker.free_slots -= 1
            self.free_slots -= 1
            worker.runs[run_id] = Run(task.key, task.resources, now)
            worker.last_started = run_id
        return run_id

    def start(self, worker_id: WorkerId, run_id: int, key: str) -> bool:
        """A queued run began on its worker: from now on it holds its resources.

        The worker started it only where its own books had room, and every
        run that ended before it was reported first, so this never takes more
        than the worker declared (validate() checks it). A start of a run no
        longer queued (it ended in the same batch, or the worker was lost) is
        ignored: False."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        run = worker.queued.get(run_id)
        if run is None or run.key != key:
            return False
        self._unqueue(worker, run_id)
        worker.runs[run_id] = run
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
        self.free_slots -= 1
        if run_id > worker.last_started:
            worker.last_started = run_id
        return True

    def end(self, worker_id: WorkerId, run_id: int, key: str) -> WorkerRecord | None:
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
        self.free_slots += 1
        self._changes.workers.add(worker_id)
        if worker.shrunk and all(amount >= 0 for amount in free.values()):
            worker.shrunk = False
        return worker

    def _unqueue(self, worker: WorkerRecord, run_id: int) -> None:
        run = worker.queued.pop(run_id)
        self.queue_room += 1
        self._changes.queues.add(worker.worker_id)
        # Its room grew (when the run ended) or stays (when it started).
        self._changes.workers.add(worker.worker_id)
        need = worker.queued_need
        for name, amount in run.resources.items():
            if not amount:
                continue
            left = need[name] - amount
            if left:
                need[name] = left
            else:
                del need[name]
