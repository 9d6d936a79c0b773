"""What waits, and why: tasks counted by resource shape and by the reason they
wait, the pending demand per resource (what an autoscaler scales on), and
progress per key prefix. Pure reads of a :class:`~..state.ClusterState`.

One pass over the tasks per call: callers ask
at most once a second (the dashboard's feed, a Prometheus scrape).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apportion_common.resources import Quanta, from_quanta

from ..records import (
    ERRED,
    MEMORY,
    PROCESSING,
    READY,
    RELEASED,
    WAITING,
    Shape,
    TaskRecord,
    TaskState,
)

if TYPE_CHECKING:
    from ..state import ClusterState

#: Why tasks wait, as the dashboard and the metrics name it.
UNPLACEABLE = "unplaceable"  # no connected worker offers what it needs
BUSY = "busy"  # some worker could hold it, but every one that fits is busy
INPUTS = "inputs"  # some of its inputs are not in memory yet
RESERVED = "reserved"  # a worker is kept for it (it starved): it goes there next

REASON_TEXT = {
    UNPLACEABLE: "no worker offers it",
    BUSY: "busy everywhere",
    INPUTS: "waiting for inputs",
    RESERVED: "reserved",
}

#: Progress columns per key prefix, from the task states.
PROGRESS_OF = {
    MEMORY: "done",
    RELEASED: "done",
    ERRED: "erred",
    PROCESSING: "running",
}


@dataclass(slots=True)
class WaitingGroup:
    """Tasks of one resource shape that wait for one reason."""

    resources: dict[str, float]
    reason: str
    count: int
    #: for UNPLACEABLE: the scheduler's sentence on what is missing
    detail: str = ""


@dataclass(slots=True)
class Waiting:
    groups: list[WaitingGroup] = field(default_factory=list)
    #: per resource, what tasks waiting for placement need together (fixed
    #: point), by UNPLACEABLE or BUSY (reserved ones count as busy); tasks
    #: queued on a worker or waiting for inputs are not in it
    demand: dict[str, Quanta] = field(default_factory=dict)
    #: prefix -> {"done"|"erred"|"running"|"waiting": count}
    progress: dict[str, dict[str, int]] = field(default_factory=dict)
    #: tasks by state
    task_counts: dict[str, int] = field(default_factory=dict)


def _add(total: Quanta, need: Quanta, times: int) -> None:
    for name, amount in need.items():
        total[name] = total.get(name, 0) + amount * times


def waiting(state: ClusterState) -> Waiting:
    out = Waiting(demand={UNPLACEABLE: {}, BUSY: {}})
    tasks = state.tasks
    # One pass, counted in C: (prefix, state, shape) takes few distinct values.
    counts = Counter((task.prefix, task.state, task.shape) for task in tasks.values())
    by_state: Counter[TaskState] = Counter()
    unplaced: Counter[tuple[Shape, TaskState]] = Counter()
    progress = out.progress
    for (prefix, state_of, shape), count in counts.items():
        by_state[state_of] += count
        row = progress.get(prefix)
        if row is None:
            row = progress[prefix] = {"done": 0, "erred": 0, "running": 0, "waiting": 0}
        row[PROGRESS_OF.get(state_of, "waiting")] += count
        if state_of is READY or state_of is WAITING:
            unplaced[shape, state_of] += count
    out.task_counts = {st.value: n for st, n in by_state.items()}

    kept_for: Counter[Shape] = Counter(
        task.shape
        for key in state.reservations
        if (task := tasks.get(key)) is not None and task.state is READY
    )
    for (shape, state_of), count in unplaced.items():
        need = dict(shape[0])
        if state_of is WAITING:
            out.groups.append(WaitingGroup(from_quanta(need), INPUTS, count))
            continue
        some = _ready_task_of(state, shape)
        never = None if some is None else state.placer.why_never(some)
        if never is not None:
            out.groups.append(WaitingGroup(from_quanta(need), UNPLACEABLE, count, never))
            _add(out.demand[UNPLACEABLE], need, count)
            continue
        kept = kept_for[shape]
        if kept:
            out.groups.append(WaitingGroup(from_quanta(need), RESERVED, kept))
        if count > kept:
            out.groups.append(WaitingGroup(from_quanta(need), BUSY, count - kept))
        _add(out.demand[BUSY], need, count)
    out.groups.sort(key=lambda g: (-g.count, g.reason, sorted(g.resources.items())))
    return out


def _ready_task_of(state: ClusterState, shape: Shape) -> TaskRecord | None:
    """A ready task of ``shape`` (why_never's answer is the same for each)."""
    for _, _, gen, key in state.queues.heaps.get(shape, ()):
        task = state.tasks.get(key)
        if task is not None and task.state is READY and task.ready_gen == gen:
            return task
    return None
