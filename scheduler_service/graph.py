"""The task graph: which tasks exist, what each waits on, where results are.

:class:`Graph` owns the task records (``ClusterState.tasks``) and how they
move between states (waiting, ready, processing's end, memory, released,
erred), the links between tasks (dependencies, dependents, ``waiting_on``),
where results live (``TaskRecord.who_has``, ``WorkerRecord.has``), and the
numbering of tasks (submission order, incarnations). It makes a task
runnable (recomputing released inputs first), errs it and what depends on
it, forgets what nobody refers to, drops results nobody will read, recomputes
lost ones, and tells clients what each of these means for them.

It must never touch a worker's capacity or runs (the books do) nor choose a
worker (the placement pass does): a task it makes ready goes to the ready
queues, a run it stops is only called off (the lease stays until the worker
reports). Every walk over the graph uses a work list, not recursion, so a
long chain of tasks cannot hit Python's recursion limit in the middle of an
event.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

from apportion_common.resources import Quanta
from apportion_common.serialize import ErrorInfo
from apportion_common.status import ErrorKind, TaskStatus

from .commands import (
    CancelRun,
    Command,
    JournalFailure,
    JournalForgetTask,
    NotifyClient,
    ReleaseData,
)
from .events import TaskSubmission, WorkerId
from .placer import Placer
from .queues import ReadyQueues
from .records import (
    ERRED,
    MEMORY,
    NO_WORKERS,
    PROCESSING,
    READY,
    RELEASED,
    WAITING,
    Clock,
    Shape,
    TaskRecord,
    WorkerRecord,
    key_prefix,
)


def post_order(
    start: TaskRecord, neighbours: Callable[[TaskRecord], list[TaskRecord]]
) -> list[TaskRecord]:
    """``start`` and all it reaches through ``neighbours``, each after every
    task it reaches (depth-first post-order), through a work list."""
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


class Graph:
    def __init__(
        self,
        tasks: dict[str, TaskRecord],
        workers: dict[WorkerId, WorkerRecord],
        queues: ReadyQueues,
        placer: Placer,
        clock: Clock,
        incarnation_base: int,
    ) -> None:
        self.tasks = tasks
        self._workers = workers
        self._queues = queues
        self._placer = placer
        self._clock = clock
        #: emit journal commands (JournalForgetTask, JournalFailure) for a state dir
        self.journaling = False
        self._seq = itertools.count(1)
        # The servicer starts these at a random point, so that two lifetimes of
        # a scheduler never hand out the same incarnation.
        self._incarnations = itertools.count(incarnation_base)
        #: one (shape, resources, allowed workers) per distinct kind of task
        self._kinds: dict[
            tuple[tuple[tuple[str, int], ...], tuple[str, ...], bool],
            tuple[Shape, Quanta, frozenset[str]],
        ] = {}

    # -------------------------------------------------------- new tasks

    def new_task(self, spec: TaskSubmission) -> TaskRecord:
        """A record for ``spec``, not yet in the graph (:meth:`enter` adds it)."""
        # Tasks of one shape share its shape tuple, resources dict and worker
        # set (never mutated): a long queue of alike tasks holds one copy.
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
            isolate=spec.isolate,
        )

    def enter(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Add a new task to the graph: link it to its inputs and make it
        runnable, or err it if an input is unknown."""
        self.tasks[task.key] = task
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
            self.err(
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
        self.make_runnable(task, cmds)

    def enter_erred(self, task: TaskRecord, error: ErrorInfo) -> None:
        """Add a task read back from the journal as erred, with its error."""
        self.tasks[task.key] = task
        task.dependencies = tuple(k for k in task.dependencies if k in self.tasks)
        for dep_key in task.dependencies:
            self.tasks[dep_key].dependents.add(task.key)
        task.state = ERRED
        task.error = error

    # ---------------------------------------------------------- runnable

    def make_runnable(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Queue ``task`` once its inputs are in memory, recomputing lost ones.

        Released inputs (and theirs, transitively) are made runnable first,
        each after its own inputs.
        """

        def released_inputs(current: TaskRecord) -> list[TaskRecord]:
            deps = [self.tasks[k] for k in current.dependencies]
            if any(dep.state == ERRED for dep in deps):
                return []  # current errs: no use recomputing its other inputs
            return [dep for dep in deps if dep.state == RELEASED]

        for current in post_order(task, released_inputs):
            if current.state == ERRED or (current is not task and current.state != RELEASED):
                # An input of it erred while the inputs were being queued
                # (err reached it through their dependents), or it is queued
                # already, through another path.
                continue
            self._queue_if_inputs_ready(current, cmds)

    def _queue_if_inputs_ready(self, task: TaskRecord, cmds: list[Command]) -> None:
        """WAITING on the inputs not in memory, READY if none, ERRED if one erred.

        Released inputs have been made runnable before (see make_runnable)."""
        task.waiting_on.clear()
        for dep_key in task.dependencies:
            dep = self.tasks[dep_key]
            if dep.state == MEMORY:
                continue
            if dep.state == ERRED:
                assert dep.error is not None
                self.err(task, dep.error, cmds)
                return
            task.waiting_on.add(dep_key)
        if task.waiting_on:
            task.state = WAITING
        else:
            self._push_ready(task, cmds)

    def _push_ready(self, task: TaskRecord, cmds: list[Command]) -> None:
        self._queues.push(task, self._clock.now)
        self.tell_why_waiting(task, cmds)

    def tell_why_waiting(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Tell a ready task's clients, once, if no connected worker can hold it."""
        if self._clock.hold_until:
            return  # recovering: workers are still coming back (told when it ends)
        reason = self._placer.why_never(task)
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

    def retell_why_waiting(self, cmds: list[Command]) -> None:
        """After capacity went away (a worker left or declares less): tasks
        queued for what no worker now has wait for one that has it, and their
        clients are told why, as for a new task."""
        for ready in self._queues.by_shape():
            for task in ready:
                self.tell_why_waiting(task, cmds)

    # ---------------------------------------------------------- outcomes

    def current(self, key: str, run_id: int) -> TaskRecord | None:
        """The task whose current run ``run_id`` just ended, now WAITING (the
        caller decides where it goes next); None if that run was not its
        current one (called off, superseded)."""
        task = self.tasks.get(key)
        if task is None or task.state != PROCESSING or task.run_id != run_id:
            return None
        task.worker_id = None
        task.run_id = 0
        task.state = WAITING  # transient
        return task

    def fetched(
        self, worker: WorkerRecord, fetched: tuple[tuple[str, int], ...], cmds: list[Command]
    ) -> None:
        """``worker`` now holds copies of the inputs it fetched from peers;
        one whose task no longer is in memory is dropped there."""
        for fetched_key, _nbytes in fetched:
            task = self.tasks.get(fetched_key)
            if task is not None and task.state == MEMORY:
                task.who_has.add(worker.worker_id)
                worker.has.add(fetched_key)
            else:
                cmds.append(ReleaseData(worker.worker_id, fetched_key))

    def tell_holders(self, key: str, cmds: list[Command]) -> None:
        """``key``'s holders changed (a retiring worker handed it over): its
        clients hear where it lives now, before the old holder goes."""
        task = self.tasks.get(key)
        if task is None or task.state != MEMORY:
            return
        addresses = tuple(self._workers[w].address for w in sorted(task.who_has))
        for client in task.wanted_by:
            cmds.append(NotifyClient(client, key, TaskStatus.FINISHED, addresses, task.nbytes))

    def finished(
        self,
        key: str,
        run_id: int,
        worker: WorkerRecord,
        nbytes: int,
        inline_result: bytes,
        cmds: list[Command],
    ) -> TaskRecord | None:
        """Run ``run_id`` of ``key`` finished on ``worker``, which holds the
        result: the task's, if it was its current run (returned), else none
        (None: a cancelled or superseded run, whose result nobody wants)."""
        # current(), written out: this runs once for every run that ends.
        task = self.tasks.get(key)
        if task is None or task.state != PROCESSING or task.run_id != run_id:
            return None
        task.worker_id = None
        task.run_id = 0
        task.state = MEMORY
        task.nbytes = nbytes
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
                        nbytes,
                        inline_result=inline_result,
                    )
                )
        self._result_ready(task, cmds)
        return task

    def reclaim(
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
        self._placer.drop_reservation(task.key)
        for client in task.wanted_by:
            cmds.append(
                NotifyClient(client, task.key, TaskStatus.FINISHED, (worker.address,), nbytes)
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
                self.drop_if_unneeded(dep, cmds)
        self.drop_if_unneeded(task, cmds)

    def failed(self, task: TaskRecord, error: ErrorInfo, cmds: list[Command]) -> None:
        """``task``'s current run raised: run it again while it has retries
        left, else it errs (and what depends on it), and inputs nobody needs
        any more go."""
        if task.retries_left > 0:
            task.retries_left -= 1
            self.make_runnable(task, cmds)
            return
        self.err(task, error, cmds)
        for dep_key in task.dependencies:
            dep = self.tasks.get(dep_key)
            if dep is not None:
                self.drop_if_unneeded(dep, cmds)

    def lose_runs(self, worker: WorkerRecord, allowed_failures: int, cmds: list[Command]) -> None:
        """``worker`` is gone with its runs: each current one is placed again,
        and the worker is a suspect of the tasks it was running (KilledWorker
        once more than ``allowed_failures`` died under one). A queued run
        never started there: its worker is no suspect."""
        for run_id, run in worker.runs.items():
            task = self.current(run.key, run_id)  # WAITING: re-queued or erred just below
            if task is not None:
                task.suspects.append(worker.name)
                if len(task.suspects) > allowed_failures:
                    suspects = ", ".join(task.suspects)
                    error = ErrorInfo(
                        "KilledWorker",
                        f"task {task.key!r} was running on {len(task.suspects)} workers "
                        f"that died ({suspects}); allowed_failures is {allowed_failures}",
                        kind=ErrorKind.KILLED_WORKER,
                    )
                    self.err(task, error, cmds)
                else:
                    self.make_runnable(task, cmds)
        for run_id, run in worker.queued.items():
            task = self.current(run.key, run_id)
            if task is not None:
                self.make_runnable(task, cmds)

    def lose_holder(self, worker: WorkerRecord, cmds: list[Command]) -> None:
        """``worker`` is gone with the results it held: each held nowhere
        else is recomputed if still needed. Every holder set forgets it first,
        so nothing below can point at it."""
        lost: list[TaskRecord] = []
        for key in worker.has:
            task = self.tasks.get(key)
            if task is not None:
                task.who_has.discard(worker.worker_id)
                if not task.who_has and task.state == MEMORY:
                    lost.append(task)
                elif task.wanted_by:
                    # Held elsewhere too: its clients hear where, or one that
                    # knew only this holder would ask it in vain, told nothing.
                    self.tell_holders(key, cmds)
        for task in lost:
            self.lost_data(task, cmds)

    def lose_copy(self, key: str, address: str, cmds: list[Command]) -> None:
        """A worker could not fetch ``key`` from ``address``: no copy is there."""
        dep = self.tasks.get(key)
        if dep is None or dep.state != MEMORY:
            return
        for worker_id in list(dep.who_has):
            holder = self._workers[worker_id]
            if holder.address == address:
                dep.who_has.discard(worker_id)
                holder.has.discard(key)
        if not dep.who_has:
            self.lost_data(dep, cmds)
        else:
            self.tell_holders(key, cmds)  # its clients stop asking the holder without it

    def lost_data(self, task: TaskRecord, cmds: list[Command]) -> None:
        """The last copy of a result is gone: recompute it if anyone still needs it."""
        task.state = RELEASED
        for dependent_key in task.dependents:
            dependent = self.tasks[dependent_key]
            if dependent.state in (WAITING, READY):
                dependent.waiting_on.add(task.key)
                if dependent.state == READY:
                    dependent.state = WAITING  # its heap entry goes stale
        if self.needs_data(task):
            for client in task.wanted_by:
                cmds.append(NotifyClient(client, task.key, TaskStatus.PENDING))
            task.waiting_reason = ""  # told nothing now: tell again if it must wait
            self.make_runnable(task, cmds)

    def err(self, task: TaskRecord, error: ErrorInfo, cmds: list[Command]) -> None:
        """Mark ``task`` and, transitively, everything that depends on it as erred."""
        stack = [task]
        while stack:
            current = stack.pop()
            if current.state in (ERRED, MEMORY):
                # A result already computed stays valid when an input of it
                # fails later (on a recompute): it keeps its holders, and its
                # clients are not told "error" after "finished". Should it be
                # needed again, make_runnable errs it then.
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

    # ---------------------------------------------------------- forgetting

    def needs_data(self, task: TaskRecord) -> bool:
        if task.wanted_by:
            return True
        for dependent_key in task.dependents:
            if self.tasks[dependent_key].state in (WAITING, READY, PROCESSING):
                return True
        return False

    def drop_if_unneeded(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Forget a task nobody refers to; drop a result nobody will read.

        Then the same for its inputs, transitively.
        """
        stack = [task]
        while stack:
            task = stack.pop()
            if self.tasks.get(task.key) is not task:
                continue  # forgotten meanwhile
            if not task.wanted_by and not task.dependents:
                stack.extend(reversed(self._forget_record(task, cmds)))
            elif task.state == MEMORY and not self.needs_data(task):
                self._release_data(task, cmds)
                task.state = RELEASED
            elif task.state in (WAITING, READY, PROCESSING) and not self.needs_data(task):
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

    def forget(self, task: TaskRecord, cmds: list[Command]) -> None:
        for dep in self._forget_record(task, cmds):
            self.drop_if_unneeded(dep, cmds)

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
        # (deleted) task, and needs_data would look it up (KeyError).
        deps = [dep for k in task.dependencies if (dep := self.tasks.get(k)) is not None]
        for dep in deps:
            dep.dependents.discard(task.key)
        return deps

    def call_off(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Place a queued ``task`` again: its worker can never run it now.
        Its place in that queue stays taken until the worker reports the
        called-off run (it may have started it before it heard)."""
        self._cancel_run(task, cmds)
        task.state = WAITING  # transient: re-queued just below
        self.make_runnable(task, cmds)

    def _cancel_run(self, task: TaskRecord, cmds: list[Command]) -> None:
        """Tell the worker to stop caring about a run; the lease stays until it ends."""
        assert task.worker_id is not None
        if task.worker_id in self._workers:
            # Not to a worker that has left (while a lost worker's data is
            # recomputed, a run there can be reached before it is re-placed).
            cmds.append(CancelRun(task.worker_id, task.key, task.run_id))
        task.worker_id = None
        task.run_id = 0

    def _release_data(self, task: TaskRecord, cmds: list[Command]) -> None:
        for worker_id in task.who_has:
            self._workers[worker_id].has.discard(task.key)
            cmds.append(ReleaseData(worker_id, task.key))
        task.who_has = set()
