"""What waits, and why: tasks counted by resource shape and by the reason they
wait, the pending demand per resource (what an autoscaler scales on), and
progress per key prefix. Pure reads of a :class:`~..state.ClusterState`.

One pass over the tasks and one over the ready queues per call: callers ask
at most once a second (the dashboard's feed, a Prometheus scrape).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apportion_common.resources import Quanta, from_quanta

from ..records import ERRED, MEMORY, PROCESSING, RELEASED, WAITING, Shape, TaskState

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
    by_state: Counter[TaskState] = Counter()
    by_prefix_state: Counter[tuple[str, TaskState]] = Counter()
    for_inputs: Counter[Shape] = Counter()
    needs: dict[Shape, Quanta] = {}
    for task in state.tasks.values():
        st = task.state
        by_state[st] += 1
        by_prefix_state[task.prefix, st] += 1
        if st is WAITING:
            for_inputs[task.shape] += 1
            needs[task.shape] = task.resources
    progress = out.progress
    for (prefix, state_of), count in by_prefix_state.items():
        column = PROGRESS_OF.get(state_of, "waiting")
        row = progress.setdefault(prefix, {"done": 0, "erred": 0, "running": 0, "waiting": 0})
        row[column] += count
    out.task_counts = {st.value: n for st, n in by_state.items()}

    reserved = state.reservations
    for ready in state.queues.by_shape():
        if not ready:
            continue
        need = ready[0].resources
        never = state.placer.why_never(ready[0])
        if never is not None:
            out.groups.append(WaitingGroup(from_quanta(need), UNPLACEABLE, len(ready), never))
            _add(out.demand[UNPLACEABLE], need, len(ready))
            continue
        kept = sum(1 for task in ready if task.key in reserved)
        if kept:
            out.groups.append(WaitingGroup(from_quanta(need), RESERVED, kept))
        if len(ready) > kept:
            out.groups.append(WaitingGroup(from_quanta(need), BUSY, len(ready) - kept))
        _add(out.demand[BUSY], need, len(ready))
    for shape, count in for_inputs.items():
        out.groups.append(WaitingGroup(from_quanta(needs[shape]), INPUTS, count))
    out.groups.sort(key=lambda g: (-g.count, g.reason, sorted(g.resources.items())))
    return out
