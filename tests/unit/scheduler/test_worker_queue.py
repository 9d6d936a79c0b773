"""Worker queues: assigned runs that hold nothing until the worker starts them.

The scheduler keeps what a worker holds (runs) and what waits in its queue
apart; held never exceeds what the worker declared, every queued place is
given back exactly once, and a queue of 0 places changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apportion_common.resources import Quanta
from scheduler_service.commands import AssignTask, CancelRun, DeclareResources
from scheduler_service.events import (
    TaskErred,
    TaskFinished,
    TasksCancelled,
    TasksSubmitted,
    TaskStarted,
    TaskSubmission,
    Tick,
    WorkerLeft,
    WorkerResourcesChanged,
)
from scheduler_service.placement import pick_queue
from scheduler_service.policy import QUEUE_MAX_PER_THREAD
from scheduler_service.state import ERRED, PROCESSING, READY, key_prefix
from tests.helpers.scheduler_sim import BOOM, Sim, assigns, q


def test_a_worker_queues_up_to_its_limit_beyond_what_it_holds() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    for key in "abc":
        sim.submit(key, GPU=1)
    assert sim.held_on(1) == ["a"] and sim.queued_on(1) == ["b"]
    assert sim.run_of("b").queued and not sim.run_of("a").queued
    assert sim.state.tasks["c"].state == READY
    assert sim.used(1) == {"GPU": 1.0}  # the queued run holds nothing
    snap = sim.state.snapshot().workers[0]
    assert (snap.running, snap.queued) == (1, 1)
    assert "queued on w1" in sim.state.explain("b")
    assert "running on w1" in sim.state.explain("a")


def test_a_start_takes_the_room_an_end_gave_back_then_the_queue_refills() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    for key in "abc":
        sim.submit(key, GPU=1)
    b = sim.run_of("b")
    # The worker's batch: a finished, then b started; ends are applied first.
    cmds = sim.finish("a")
    assert assigns(cmds) == []  # its free room may be b's already: nothing straight in
    cmds = sim(TaskStarted(1, "b", b.run_id))
    assert sim.held_on(1) == ["b"] and sim.used(1) == {"GPU": 1.0}
    [c] = assigns(cmds)
    assert (c.key, c.queued) == ("c", True)


def test_a_queued_run_that_finishes_unseen_counts_as_started_then_finished() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("b", GPU=1)
    b = sim.run_of("b")
    sim.finish("a")
    sim.finish("b")  # its start is in the same batch, applied after
    assert sim.state.workers[1].queued == {} and sim.state.workers[1].runs == {}
    assert sim(TaskStarted(1, "b", b.run_id)) == []  # a start of a run it no longer knows
    assert sim.used(1) == {}


def test_cancelling_a_queued_run_keeps_its_place_until_the_worker_reports() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("b", GPU=1)
    b = sim.run_of("b")
    cmds = sim(TasksCancelled("c", ("b",)))
    assert CancelRun(1, "b", b.run_id) in cmds
    assert b.run_id in sim.state.workers[1].queued  # the worker may have started it
    sim.fail(b)  # dropped unstarted, reported as cancelled
    assert sim.state.workers[1].queued == {}
    assert sim.used(1) == {"GPU": 1.0}


def test_a_cancelled_queued_run_the_worker_had_started_holds_until_it_ends() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("b", GPU=1)
    b = sim.run_of("b")
    sim.finish("a")
    sim(TasksCancelled("c", ("b",)))
    sim(TaskStarted(1, "b", b.run_id))  # started before it heard of the cancel
    assert sim.used(1) == {"GPU": 1.0}
    sim.fail(b)
    assert sim.used(1) == {}


def test_a_lost_worker_s_queued_runs_are_placed_again_and_it_is_no_suspect() -> None:
    sim = Sim(worker_queue=1, allowed_failures=0)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("b", GPU=1)
    sim(WorkerLeft(1))
    assert sim.state.tasks["a"].state == ERRED  # it was running: KilledWorker
    b = sim.state.tasks["b"]
    assert b.state == READY and b.suspects == []
    cmds = sim.join(2, nthreads=1, GPU=1)
    [run] = assigns(cmds)
    assert (run.key, run.worker_id, run.queued) == ("b", 2, False)


def test_lowering_capacity_places_again_what_the_worker_could_never_run() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=2)
    sim.join(2, nthreads=1, GPU=2)
    for key in "abcd":
        sim.submit(key, GPU=2)
    assert sim.queued_on(1) == ["c"] and sim.queued_on(2) == ["d"]
    c = sim.run_of("c")
    cmds = sim(WorkerResourcesChanged(1, q(GPU=1)))
    assert DeclareResources(1, q(GPU=1)) in cmds
    assert CancelRun(1, "c", c.run_id) in cmds
    assert sim.state.tasks["c"].state == READY  # queue 2 is full
    sim.fail(c)  # the worker drops it
    assert sim.state.workers[1].queued == {}
    sim.finish("b")
    sim.start("d")
    [again] = [r for r in sim.runs.values() if r.key == "c"]
    assert (again.worker_id, again.queued) == (2, True)


def test_a_reserved_worker_gets_nothing_queued() -> None:
    sim = Sim(worker_queue=2, starvation_after=2.0)
    sim.join(1, nthreads=2, GPU=2)
    sim.submit("s1", GPU=1)
    sim.submit("s2", GPU=1)
    sim.submit("big", GPU=2)  # queued behind them
    sim.submit("s3", GPU=1)
    assert sim.queued_on(1) == ["big", "s3"]
    # A second big task waits ready past the bound; once a thread is free
    # the worker is reserved for it.
    sim.submit("big2", GPU=2)
    sim(Tick(5.0))
    sim.finish("s1")
    assert sim.state.workers[1].reserved_for == "big2"
    sim.start("s3")
    assert sim.queued_on(1) == ["big"]  # no room is refilled: reserved
    sim.finish("s2")
    sim.finish("s3")
    sim.start("big")
    sim.finish("big")
    [run] = [r for r in sim.runs.values() if r.key == "big2"]
    assert not run.queued  # held at once, on the worker kept for it


def test_restrictions_and_declared_capacity_bound_where_a_task_is_queued() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.join(2, nthreads=1, GPU=2)
    sim(TasksSubmitted("c", (TaskSubmission("x", b"x", q(GPU=1), workers=("w1",)),)))
    sim(TasksSubmitted("c", (TaskSubmission("y", b"y", q(GPU=1), workers=("w1",)),)))
    sim.submit("big", GPU=2)
    sim.submit("big2", GPU=2)
    assert sim.held_on(1) == ["x"] and sim.queued_on(1) == ["y"]
    assert sim.held_on(2) == ["big"] and sim.queued_on(2) == ["big2"]  # w1 could never


def test_priorities_decide_what_is_queued_first() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a", GPU=1)
    sim(
        TasksSubmitted(
            "c",
            (
                TaskSubmission("low", b"", q(GPU=1), priority=0),
                TaskSubmission("high", b"", q(GPU=1), priority=5),
            ),
        )
    )
    assert sim.queued_on(1) == ["high"]


def test_by_default_a_worker_queues_two_tasks_per_thread() -> None:
    sim = Sim(worker_queue=None)
    sim.join(1, nthreads=1, GPU=1)
    sim.join(2, nthreads=2, GPU=1)
    for i in range(20):
        sim.submit(f"task-{i}", GPU=1)
    # One runs on each worker; behind it, two queued per thread.
    assert (len(sim.queued_on(1)), len(sim.queued_on(2))) == (2, 4)
    sim.state.validate()


def test_short_tasks_get_a_deeper_queue_than_long_ones() -> None:
    """Queues hold about QUEUE_TARGET_S of work per thread of each kind (key
    prefix), measured from the durations workers report: 1 ms tasks queue 5
    per thread, no-op ones up to QUEUE_MAX_PER_THREAD; unknown and long kinds 2."""
    sim = Sim(worker_queue=None)
    sim.join(1, nthreads=2, GPU=2)
    sim.submit("short-0", GPU=1)
    sim.submit("long-0", GPU=1)
    for i in range(1, 40):
        sim.submit(f"short-{i}", GPU=1)
    for i in range(1, 40):
        sim.submit(f"long-{i}", GPU=1)
    assert len(sim.queued_on(1)) == 4  # nothing measured yet: 2 per thread
    sim.finish("long-0", duration=0.5)
    sim.start(sim.queued_on(1)[0])
    sim.finish("short-0", duration=0.001)
    started = sim.queued_on(1)[0]
    sim.start(started)
    queued = sim.queued_on(1)
    # short ones join until 5 per thread are queued; long ones never past 2
    assert len(queued) == 10, queued
    assert sum(key.startswith("long") for key in queued) <= 4
    for key in [*sim.held_on(1)]:
        sim.finish(key, duration=1e-6)
    sim.state.validate()
    assert len(sim.queued_on(1)) <= QUEUE_MAX_PER_THREAD * 2
    assert sim.state.workers[1].queue_limit == QUEUE_MAX_PER_THREAD * 2


def test_key_prefix_is_the_kind_of_task() -> None:
    assert key_prefix("load-1f3a9c0b44e5d6f7") == "load"
    assert key_prefix("in-queue-17") == "in-queue"
    assert key_prefix("quick") == "quick"
    assert key_prefix("process-x") == "process-x"


def test_a_queue_of_zero_places_assigns_only_what_fits() -> None:
    sim = Sim(worker_queue=0)
    sim.join(1, nthreads=1, GPU=1)
    for key in "abc":
        sim.submit(key, GPU=1)
    assert [a.key for a in sim.runs.values()] == ["a"]
    assert not any(a.queued for a in sim.log if isinstance(a, AssignTask))
    assert sim.state.workers[1].queue_limit == 0


def test_a_retried_queued_run_goes_back_to_the_queue_exactly_once() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("b", GPU=1, retries=1)
    b = sim.run_of("b")
    sim.finish("a")
    sim.start("b")
    cmds = sim(TaskErred(1, "b", b.run_id, BOOM))
    del sim.runs[b.run_id]
    [again] = assigns(cmds)
    assert again.key == "b" and not again.queued  # the worker is empty now
    assert sim.state.tasks["b"].state == PROCESSING
    sim(TaskFinished(1, "b", again.run_id, 1))
    assert sim.used(1) == {}


@dataclass
class _W:
    worker_id: int
    nthreads: int
    free_slots: int
    free: Quanta
    declared: Quanta
    queued: dict[int, object] = field(default_factory=dict)
    queue_limit: int = 1
    reserved_for: str | None = None


def test_pick_queue_spreads_or_packs_and_skips_full_reserved_and_small_workers() -> None:
    busy = _W(1, 2, 0, q(GPU=0), q(GPU=2), {7: None}, queue_limit=2)
    idle = _W(2, 2, 0, q(GPU=0), q(GPU=2))
    small = _W(3, 2, 0, q(GPU=0), q(GPU=1))
    kept = _W(4, 2, 0, q(GPU=0), q(GPU=2), reserved_for="x")
    full = _W(5, 2, 0, q(GPU=0), q(GPU=2), {8: None})
    workers = [busy, idle, small, kept, full]
    assert pick_queue(q(GPU=2), workers) is idle
    assert pick_queue(q(GPU=2), workers, pack=True) is busy
    assert pick_queue(q(GPU=3), workers) is None
