"""Pack or spread: the scheduler setting that picks the busiest or the least
busy fitting worker."""

from __future__ import annotations

from dataclasses import dataclass

from apportion_common.resources import to_quanta
from scheduler_service import SchedulingPolicy
from scheduler_service.events import TasksSubmitted, TaskSubmission, WorkerJoined
from scheduler_service.placement import pick_worker
from scheduler_service.state import ClusterState
from tests.helpers.scheduler_sim import assigns


@dataclass
class W:
    worker_id: int
    nthreads: int
    free_slots: int
    free: dict[str, int]


def test_pick_worker_spread_and_pack() -> None:
    idle = W(1, 4, 4, to_quanta({"GPU": 2}))
    busy = W(2, 4, 1, to_quanta({"GPU": 2}))
    full = W(3, 4, 0, to_quanta({"GPU": 2}))
    need = to_quanta({"GPU": 1})
    assert pick_worker(need, [idle, busy, full]) is idle
    assert pick_worker(need, [idle, busy, full], pack=True) is busy
    # Input bytes still come first in both modes.
    assert pick_worker(need, [idle, busy], {1: 10}, pack=True) is idle
    # Pack never loosens resources.
    no_gpu = W(4, 4, 1, {})
    assert pick_worker(need, [no_gpu, idle], pack=True) is idle


def run(placement: str) -> list[int]:
    state = ClusterState(SchedulingPolicy(placement=placement))  # type: ignore[arg-type]
    for worker_id in (1, 2, 3):
        state.handle(WorkerJoined(worker_id, f"w{worker_id}", f"h:{worker_id}", 3, {}))
    tasks = tuple(TaskSubmission(f"t{i}", b"", {}) for i in range(6))
    cmds = state.handle(TasksSubmitted("c", tasks))
    state.validate()
    return [a.worker_id for a in assigns(cmds)]


def test_spread_uses_every_worker_and_pack_fills_one_by_one() -> None:
    assert run("spread") == [1, 2, 3, 1, 2, 3]
    assert run("pack") == [1, 1, 1, 2, 2, 2]
