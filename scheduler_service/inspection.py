"""What the scheduler says of itself: why a task is not running (explain) and
a snapshot of the workers and task counts (status).

Owns the snapshot records. Reads the state through ClusterState and the
public reads of its parts; must never change anything (asking twice gives
the same answer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apportion_common.gpus import GpuDevice
from apportion_common.resources import Quanta

from .events import WorkerId
from .placement import fits
from .records import ERRED, MEMORY, PROCESSING, RELEASED, WAITING, TaskRecord

if TYPE_CHECKING:
    from .state import ClusterState


@dataclass(slots=True)
class WorkerSnapshot:
    worker_id: WorkerId
    name: str
    address: str
    nthreads: int
    resources: Quanta
    used: Quanta
    running: int
    pid: int = 0
    queued: int = 0
    #: retiring: nothing new goes there; it exits once drained
    draining: bool = False
    #: the declared amounts as the user wrote them, where they were ("100GB")
    resources_text: dict[str, str] = field(default_factory=dict)
    #: its GPUs where it knows them, and the keys holding each (device id -> keys)
    gpus: tuple[GpuDevice, ...] = ()
    gpu_use: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: bytes its process may use (0: none), uses (resident) and spilled to disk
    memory_limit: int = 0
    memory: int = 0
    spilled_bytes: int = 0
    #: past its pause fraction of memory: nothing new goes there
    paused: bool = False


@dataclass(slots=True)
class ClusterSnapshot:
    workers: list[WorkerSnapshot] = field(default_factory=list)
    task_counts: dict[str, int] = field(default_factory=dict)


def snapshot(state: ClusterState) -> ClusterSnapshot:
    counts = Counter(task.state.value for task in state.tasks.values())
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
                draining=w.retiring,
                resources_text=dict(w.declared_text),
                gpus=w.gpus,
                gpu_use=dict(w.gpu_use),
                memory_limit=w.memory_limit,
                memory=w.memory,
                spilled_bytes=w.spilled_bytes,
                paused=w.paused,
            )
            for w in sorted(state.workers.values(), key=lambda w: w.worker_id)
        ],
        task_counts=dict(counts),
    )


def explain(state: ClusterState, key: str) -> str:
    """One sentence on why task ``key`` is not running (or what it is doing)."""
    task = state.tasks.get(key)
    if task is None:
        return f"task {key!r} is not known to the scheduler (never submitted, or released)"
    if task.state == PROCESSING:
        assert task.worker_id is not None
        holder = state.workers[task.worker_id]
        if task.run_id in holder.queued:
            kept = (
                f"; {holder.name} is kept for it: nothing else is placed there until it starts"
                if state.reservations.get(key) == holder.worker_id
                else ""
            )
            if holder.paused:
                kept += f"; {holder.name} is paused (its memory is past its pause fraction)"
            return (
                f"task {key!r} is queued on {holder.name}, "
                f"to start there when its resources are free{kept}"
            )
        return f"task {key!r} is running on {holder.name}"
    if task.state == MEMORY:
        names = ", ".join(sorted(state.workers[w].name for w in task.who_has))
        return f"task {key!r} has finished; its result is held by {names}"
    if task.state == ERRED:
        assert task.error is not None
        return f"task {key!r} erred: {task.error.type_name}: {task.error.message}"
    if task.state == RELEASED:
        return f"task {key!r} is not needed by anyone now (its result was released)"
    if task.state == WAITING:
        inputs = ", ".join(f"{k!r} ({state.tasks[k].state})" for k in sorted(task.waiting_on))
        return f"task {key!r} waits for its input(s) {inputs}"
    reason = state.placer.why_never(task)
    if reason is not None:
        return f"task {key!r} cannot run yet: {reason}"
    return _explain_busy(state, task)


def _explain_busy(state: ClusterState, task: TaskRecord) -> str:
    """A ready task that fits some worker in total: what is busy, what is ahead."""
    eligible = [w for w in state.placer.eligible(task) if fits(task.resources, w.declared)]
    paused = sorted(
        w.name
        for w in state.placer.could_hold(task)
        if w.paused and fits(task.resources, w.declared)
    )
    if not eligible and paused:
        return (
            f"task {task.key!r} waits for {', '.join(paused)} to resume: paused, its "
            f"memory past its pause fraction (nothing new is placed there until it is below)"
        )
    busy: set[str] = set()
    for worker in eligible:
        if worker.free_slots <= 0:
            busy.add("threads")
        for name, need in task.resources.items():
            if worker.free.get(name, 0) < need:
                busy.add(name)
    ahead = state.queues.ahead_of(task)
    what = " and ".join(sorted(busy)) or "capacity"
    kept = state.reservations.get(task.key)
    note = f"; {state.workers[kept].name} is reserved for it" if kept is not None else ""
    if paused:
        note += f"; paused for memory: {', '.join(paused)}"
    return (
        f"task {task.key!r} waits for {what}, busy on every worker that fits it "
        f"({len(eligible)}); {ahead} task(s) like it are ahead of it{note}"
    )
