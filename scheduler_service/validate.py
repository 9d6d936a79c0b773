"""The invariants of the scheduler's books, checked after every event in tests.

:func:`validate` reads every part's data, private included (that is its
job), and raises :class:`InvariantError` naming the first fault. It must never
change anything.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING

from .placement import fits, pick_worker
from .records import ERRED, MEMORY, PROCESSING, READY, WAITING

if TYPE_CHECKING:
    from .state import ClusterState


class InvariantError(AssertionError):
    """``validate()`` found the books out of balance."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantError(message)


def validate(state: ClusterState) -> None:
    """Check the books; raise :class:`InvariantError` naming the first fault."""
    _check_workers(state)
    _check_queues(state)
    _check_reservations(state)
    _check_tasks(state)
    _check_clients(state)


def _check_workers(state: ClusterState) -> None:
    tasks = state.tasks
    open_ids = {w for w, rec in state.workers.items() if not rec.retiring and not rec.paused}
    check(state.books.open.keys() == open_ids, "the workers open to work are not the unretiring")
    paused_ids = {w for w, rec in state.workers.items() if not rec.retiring and rec.paused}
    check(state.books.paused.keys() == paused_ids, "the paused workers are out of sync")
    for worker in state.workers.values():
        check(
            not worker.retiring or worker.reserved_for is None,
            f"worker {worker.name}: retiring yet kept for {worker.reserved_for}",
        )
        check(
            not worker.paused or worker.reserved_for is None,
            f"worker {worker.name}: paused yet kept for {worker.reserved_for}",
        )
        if worker.paused:
            latest = max(itertools.chain(worker.runs, worker.queued), default=0)
            check(
                latest <= worker.paused_after,
                f"worker {worker.name}: run {latest} assigned to it after it paused",
            )
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
            task = tasks.get(run.key)
            if task is not None and task.run_id == run_id:
                check(
                    task.state == PROCESSING and task.worker_id == worker.worker_id,
                    f"run {run_id} of {run.key} on the wrong worker",
                )
        check(
            max(worker.runs, default=0) <= worker.last_started,
            f"worker {worker.name}: a run holds resources that never started",
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
            task = tasks.get(key)
            check(
                task is not None and task.state == MEMORY and worker.worker_id in task.who_has,
                f"worker {worker.name} holds {key} unknown to who_has",
            )
    books = state.books
    check(
        books.free_slots == sum(w.free_slots for w in state.workers.values()),
        "free thread count out of sync",
    )
    check(
        books.queue_room == sum(w.queue_limit - len(w.queued) for w in state.workers.values()),
        "free queue places out of sync",
    )


def _check_queues(state: ClusterState) -> None:
    queues = state.queues
    heaps, heads, parked, head_of = queues.heaps, queues.heads, queues.parked, queues._head_of
    check(head_of.keys() == heaps.keys(), "shape heads out of sync")
    check(heads == sorted(heads), "shape heads out of order")
    check(len(heads) + len(parked) == len(heaps), "a shape has more than one head, or none")
    standing = set(heads)
    for shape, heap in heaps.items():
        check(
            bool(heap)
            and head_of[shape] is heap[0]
            and ((shape in parked) != ((heap[0], shape) in standing)),
            f"the head of shape {shape} is not among the heads (or parked)",
        )
    placer = state.placer
    for shape in parked:
        check(shape in heaps, f"parked shape {shape} has no ready tasks")
        _, _, gen, key = head_of[shape]
        task = state.tasks.get(key)
        if task is not None and task.state == READY and task.ready_gen == gen:
            check(
                not any(fits(task.resources, w.declared) for w in placer.could_hold(task)),
                f"{task.key} parked though a worker could hold it",
            )
    if state.clock.hold_until:
        return  # recovering: nothing is placed yet
    for shape in heaps:
        head = queues.head_task(shape)
        if head is None:
            continue
        room = [
            w.room() if w.queued else w
            for w in placer.eligible(head)
            if w.reserved_for in (None, head.key)
        ]
        check(
            pick_worker(head.resources, room) is None,
            f"{head.key} waits though a worker has room for it",
        )


def _check_reservations(state: ClusterState) -> None:
    queued_runs = state.placer._queued_runs
    check(queued_runs.keys() <= state.reservations.keys(), "a queued run's reservation is lost")
    for key, worker_id in state.reservations.items():
        kept = state.workers.get(worker_id)
        check(kept is not None and kept.reserved_for == key, f"reservation of {key} broken")
        assert kept is not None
        task = state.tasks.get(key)
        run_id = queued_runs.get(key)
        if run_id is None:
            check(task is not None and task.state == READY, f"{key} reserved but not ready")
        else:
            check(
                task is not None
                and task.state == PROCESSING
                and task.worker_id == worker_id
                and task.run_id == run_id
                and run_id in kept.queued,
                f"{key} reserved for its queued run {run_id}, no longer queued on {kept.name}",
            )
    for worker in state.workers.values():
        if worker.reserved_for is not None:
            check(
                state.reservations.get(worker.reserved_for) == worker.worker_id,
                f"worker {worker.name} kept for {worker.reserved_for} unknown",
            )


def _check_tasks(state: ClusterState) -> None:
    tasks = state.tasks
    for key, task in tasks.items():
        if task.state == PROCESSING:
            holder = state.workers.get(task.worker_id) if task.worker_id is not None else None
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
                check(key in state.workers[worker_id].has, f"{key} who_has out of sync")
        else:
            check(not task.who_has, f"{key} ({task.state}) still has holders")
        if task.state == WAITING:
            check(bool(task.waiting_on), f"{key} waiting on nothing")
        if task.state == READY:
            for dep_key in task.dependencies:
                check(tasks[dep_key].state == MEMORY, f"{key} runs without {dep_key}")
        if task.state == PROCESSING:
            # A running task whose input's last copy was lost since keeps
            # running (it may hold the input already) while the input is
            # recomputed; if the recompute errs, the graph stops the run.
            for dep_key in task.dependencies:
                check(
                    tasks[dep_key].state in (MEMORY, WAITING, READY, PROCESSING),
                    f"{key} runs without {dep_key} ({tasks[dep_key].state})",
                )
        for dep_key in task.dependencies:
            dep = tasks.get(dep_key)
            if task.state != ERRED or dep is not None:
                check(dep is not None and key in dep.dependents, f"{key}: broken dep link")
        for dependent_key in task.dependents:
            check(dependent_key in tasks, f"{key}: dangling dependent {dependent_key}")
        for client in task.wanted_by:
            check(key in state.clients.get(client, ()), f"{key}: client books out of sync")


def _check_clients(state: ClusterState) -> None:
    for client in state.clientele.disconnected:
        check(client in state.clients, f"disconnected client {client} unknown")
    for client, keys in state.clients.items():
        for key in keys:
            check(
                key in state.tasks and client in state.tasks[key].wanted_by,
                f"{client}:{key}",
            )
