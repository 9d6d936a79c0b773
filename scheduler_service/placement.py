"""Where a task runs: a pure function over the workers' current capacity.

Among the workers whose *free* amount of every resource the task needs covers
the need (and that have a free thread), prefer the one already holding most of
the task's input bytes, then the least loaded ("spread", the default) or the
most loaded ("pack": fills busy workers first, so whole workers fall idle),
then the one that joined first, so that the same inputs always give the same
answer.

A task that fits nowhere now may go to a worker's queue instead
(:func:`pick_queue`): one whose queue has room, that is kept for no starving
task, and that declares enough to run it once its running tasks end.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from apportion_common.resources import Quanta, from_quanta


class Candidate(Protocol):
    @property
    def worker_id(self) -> int: ...
    @property
    def nthreads(self) -> int: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def free(self) -> Quanta: ...


def fits(need: Quanta, free: Quanta) -> bool:
    """True when ``free`` covers every amount in ``need``."""
    # A plain loop: this is the placement hot path, and all() over a
    # generator costs a generator per call.
    for name, amount in need.items():  # noqa: SIM110
        if free.get(name, 0) < amount:
            return False
    return True


def pick_worker(
    need: Quanta,
    workers: Iterable[Candidate],
    input_bytes: Mapping[int, int] | None = None,
    pack: bool = False,
    preferred: Collection[int] | None = None,
) -> Candidate | None:
    """The worker for a task needing ``need``, or None if none has room now.

    ``preferred`` (worker ids): with ``allow_other_workers``, these come first
    when they have room; the others only otherwise.
    """
    best: Candidate | None = None
    best_key: tuple[int, int, float, int] | None = None
    for worker in workers:
        if worker.free_slots <= 0 or not fits(need, worker.free):
            continue
        busy = (worker.nthreads - worker.free_slots) / worker.nthreads
        if pack:
            busy = -busy
        key = (
            0 if preferred is None or worker.worker_id in preferred else 1,
            -(input_bytes.get(worker.worker_id, 0) if input_bytes else 0),
            busy,
            worker.worker_id,
        )
        if best_key is None or key < best_key:
            best, best_key = worker, key
    return best


class QueueCandidate(Candidate, Protocol):
    @property
    def declared(self) -> Quanta: ...
    @property
    def queued(self) -> Collection[int]: ...
    @property
    def queue_limit(self) -> int: ...
    @property
    def reserved_for(self) -> str | None: ...


def pick_queue(
    need: Quanta,
    workers: Iterable[QueueCandidate],
    input_bytes: Mapping[int, int] | None = None,
    pack: bool = False,
    preferred: Collection[int] | None = None,
    depth: int | None = None,
) -> QueueCandidate | None:
    """The worker whose queue should take a task needing ``need``, or None.

    Among the unreserved workers with room in their queue (within its limit,
    and fewer than ``depth`` queued runs per thread when given) that declare
    enough for ``need``: the preferred ones, then most input bytes, then the
    least loaded (running and queued runs per thread; the most with ``pack``),
    then the oldest.
    """
    best: QueueCandidate | None = None
    best_key: tuple[int, int, float, int] | None = None
    for worker in workers:
        queued = len(worker.queued)
        if (
            worker.reserved_for is not None
            or queued >= worker.queue_limit
            or (depth is not None and queued >= depth * worker.nthreads)
            or not fits(need, worker.declared)
        ):
            continue
        load = (worker.nthreads - worker.free_slots + queued) / worker.nthreads
        if pack:
            load = -load
        # The same order as pick_worker's, spelled out in both: a shared helper
        # costs a call per candidate on placement's hot path.
        key = (
            0 if preferred is None or worker.worker_id in preferred else 1,
            -(input_bytes.get(worker.worker_id, 0) if input_bytes else 0),
            load,
            worker.worker_id,
        )
        if best_key is None or key < best_key:
            best, best_key = worker, key
    return best


def infeasibility_reason(need: Quanta, declared_by_worker: Iterable[Quanta]) -> str | None:
    """Why no connected worker could ever hold ``need``, or None if one could.

    Names each resource whose need exceeds the most any worker declares; if
    each alone is offered somewhere but never together, says so.
    """
    declared = list(declared_by_worker)
    if any(fits(need, d) for d in declared):
        return None
    if not declared and not need:
        return "no workers are connected"
    short = []
    for name, amount in sorted(need.items()):
        most = max((d.get(name, 0) for d in declared), default=0)
        if most < amount:
            want = from_quanta({name: amount})[name]
            have = from_quanta({name: most})[name]
            short.append(f"{name}={want:g} (the most any worker offers is {name}={have:g})")
    if short and not declared:
        return "no workers are connected; it needs " + "; ".join(short)
    if short:
        return "no worker offers " + "; ".join(short)
    wanted = " ".join(f"{n}={v:g}" for n, v in sorted(from_quanta(need).items()))
    return f"no single worker offers {wanted} together"
