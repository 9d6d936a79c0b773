"""Exact accounting: concurrency bounded by threads and by every resource,
fixed-point amounts that return to exactly zero, tasks no worker could hold
(and why they wait), and the order ready tasks are placed in.

Every event goes through :class:`Sim`, which calls ``validate()`` after each
``handle()``, so the books are checked at every step of every scenario.
"""

from __future__ import annotations

from apportion_common.resources import from_quanta
from scheduler_service.events import (
    TasksSubmitted,
    TaskSubmission,
    WorkerJoined,
    WorkerLeft,
    WorkerResourcesChanged,
)
from scheduler_service.state import MEMORY, PROCESSING, READY
from tests.helpers.scheduler_sim import Sim, addr, assigns, q, updates

# ================================================================ accounting


def test_two_units_of_A_never_run_three_tasks_of_A1() -> None:
    sim = Sim()
    sim.join(1, nthreads=4, A=2)
    cmds = sim(TasksSubmitted("c", tuple(TaskSubmission(f"t{i}", b"", q(A=1)) for i in range(5))))
    assert [a.key for a in assigns(cmds)] == ["t0", "t1"]
    assert sim.used(1) == {"A": 2.0}
    assert sim.state.workers[1].free_slots == 2  # threads are free, A is not
    for done, started in [("t0", "t2"), ("t1", "t3"), ("t2", "t4")]:
        cmds = sim.finish(done)
        assert [a.key for a in assigns(cmds)] == [started]
        assert len(sim.running_on(1)) == 2
        assert sim.used(1) == {"A": 2.0}
    sim.finish("t3")
    sim.finish("t4")
    sim.assert_idle()
    assert {sim.status(f"t{i}") for i in range(5)} == {MEMORY}


def test_scarcest_resource_bounds_concurrency() -> None:
    sim = Sim()
    sim.join(1, nthreads=8, A=4, B=2, C=3)
    for i in range(6):
        sim.submit(f"t{i}", A=1, B=1, C=1)
    assert sim.running_on(1) == ["t0", "t1"]
    assert sim.used(1) == {"A": 2.0, "B": 2.0, "C": 2.0}
    sim.finish("t0")
    assert sim.running_on(1) == ["t1", "t2"]


def test_threads_bound_concurrency_when_resources_are_plenty() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, A=100)
    for i in range(4):
        sim.submit(f"t{i}", A=1)
    assert sim.running_on(1) == ["t0", "t1"]
    assert sim.state.workers[1].free_slots == 0


def test_fractional_gpu_twice_but_not_three_times() -> None:
    sim = Sim()
    sim.join(1, nthreads=4, GPU=1)
    for key in "xyz":
        sim.submit(key, GPU=0.5)
    assert sim.running_on(1) == ["x", "y"]
    assert sim.used(1) == {"GPU": 1.0}
    assert sim.status("z") == READY
    cmds = sim.finish("y")
    assert [(a.key, a.resources) for a in assigns(cmds)] == [("z", {"GPU": 500_000_000})]
    sim.finish("x")
    sim.finish("z")
    sim.assert_idle()


def test_point_one_plus_point_two_fits_point_three_and_returns_to_zero() -> None:
    # In floating point 0.1 + 0.2 > 0.3, so a float ledger would refuse the
    # second task or leave dust behind; fixed point must do neither.
    sim = Sim()
    sim.join(1, nthreads=4, X=0.3)
    sim.submit("a", X=0.1)
    sim.submit("b", X=0.2)
    assert sim.running_on(1) == ["a", "b"]
    assert sim.state.workers[1].free == {"X": 0}
    sim.finish("a")
    sim.finish("b")
    sim.assert_idle()
    assert sim.state.workers[1].free == {"X": 300_000_000}


def test_ten_tenths_fill_one_unit_exactly() -> None:
    sim = Sim()
    sim.join(1, nthreads=20, X=1)
    for i in range(11):
        sim.submit(f"t{i}", X=0.1)
    assert len(sim.running_on(1)) == 10
    assert sim.status("t10") == READY
    for i in range(11):
        sim.finish(f"t{i}")
    sim.assert_idle()


def test_snapshot_reports_used_resources() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, GPU=2, MEM=8)
    sim.submit("a", GPU=1.5, MEM=2)
    snap = sim.state.snapshot()
    (w,) = snap.workers
    assert (w.worker_id, w.address, w.running) == (1, addr(1), 1)
    assert from_quanta(w.used) == {"GPU": 1.5, "MEM": 2.0}
    assert from_quanta(w.resources) == {"GPU": 2.0, "MEM": 8.0}
    assert snap.task_counts == {PROCESSING: 1}


def test_snapshot_shows_the_amounts_as_written_until_they_are_changed() -> None:
    sim = Sim()
    written = {"MEMORY": "100GB", "GPU": "2"}
    sim(WorkerJoined(1, "w", addr(1), 2, q(MEMORY=100e9, GPU=2), resources_text=written))
    sim.submit("a", MEMORY=70e9)
    (w,) = sim.state.snapshot().workers
    assert w.resources_text == written
    assert from_quanta(w.used) == {"MEMORY": 70e9, "GPU": 0}
    # Changed with text, the text follows; changed without, none is left to
    # show (the short form shows); an amount unchanged keeps its text.
    sim(WorkerResourcesChanged(1, q(MEMORY=200e9, GPU=2), {"MEMORY": "200GB"}))
    assert sim.state.snapshot().workers[0].resources_text == {"MEMORY": "200GB", "GPU": "2"}
    sim(WorkerResourcesChanged(1, q(MEMORY=300e9, GPU=2)))
    assert sim.state.snapshot().workers[0].resources_text == {"GPU": "2"}
    sim(WorkerResourcesChanged(1, q(MEMORY=300e9)))
    assert sim.state.snapshot().workers[0].resources_text == {}


# ========================================================== infeasible tasks


def test_task_needing_undeclared_resource_waits_and_says_why() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, CPU=4)
    sim.join(2, nthreads=2, GPU=0.5)
    cmds = sim.submit("g", GPU=1)
    assert assigns(cmds) == []
    (update,) = updates(cmds, "g")
    assert update.status == "pending"
    assert "GPU=1" in update.waiting_reason
    assert "the most any worker offers is GPU=0.5" in update.waiting_reason
    assert sim.status("g") == READY
    # A worker that is still too small changes nothing.
    assert assigns(sim.join(3, nthreads=1, GPU=0.75)) == []
    cmds = sim.join(4, nthreads=1, GPU=2)
    assert [(a.worker_id, a.key) for a in assigns(cmds)] == [(4, "g")]
    sim.finish("g")
    assert updates(sim.log, "g")[-1].status == "finished"
    sim.assert_idle()


def test_task_submitted_with_no_workers_waits_for_one() -> None:
    sim = Sim()
    cmds = sim.submit("a", A=1)
    (update,) = updates(cmds)
    assert update.status == "pending"
    assert "no workers are connected" in update.waiting_reason
    assert assigns(sim.join(1, A=1)) == [sim.run_of("a")]


def test_resources_offered_only_on_different_workers() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.join(2, B=1)
    (update,) = updates(sim.submit("ab", A=1, B=1))
    assert "no single worker offers A=1 B=1 together" in update.waiting_reason
    assert assigns(sim.join(3, A=1, B=1))[0].worker_id == 3


def test_queued_task_is_told_why_it_waits_when_the_only_fitting_worker_leaves() -> None:
    # Bug fixed in the state machine: a task queued for capacity on the only GPU
    # worker got no word when that worker left and nothing could hold it.
    sim = Sim()
    sim.join(1, nthreads=1, GPU=1)
    sim.join(2, nthreads=1)
    sim.submit("g1", GPU=1)
    cmds = sim.submit("g2", GPU=1)
    assert updates(cmds) == []  # feasible, only busy
    cmds = sim(WorkerLeft(1))
    reasons = {u.key: u.waiting_reason for u in updates(cmds)}
    assert set(reasons) == {"g1", "g2"}
    for key, reason in reasons.items():
        assert reason.startswith(f"task {key!r}: no worker offers GPU=1")
        assert "the most any worker offers is GPU=0" in reason
    assert all(u.status == "pending" for u in updates(cmds))
    # Told once: another change that leaves them infeasible says nothing new.
    assert updates(sim.join(3, nthreads=1, CPU=1)) == []
    assert updates(sim(WorkerLeft(3))) == []
    cmds = sim.join(4, nthreads=2, GPU=1)
    assert [a.key for a in assigns(cmds)] == ["g1"]


def test_resource_names_are_case_sensitive() -> None:
    sim = Sim()
    sim.join(1, gpu=4)
    (update,) = updates(sim.submit("t", GPU=1))
    assert "GPU=1" in update.waiting_reason
    assert sim.runs == {}


def test_existing_key_submitted_while_infeasible_returns_the_reason() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.submit("t", B=1)
    cmds = sim.submit("t", client="other", B=1)
    (update,) = updates(cmds)
    assert (update.client_id, update.status) == ("other", "pending")
    assert "B=1" in update.waiting_reason


# ========================================================== priority, HOL


def test_higher_priority_is_placed_first_then_submission_order() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("blocker")
    sim.submit("low1")
    sim.submit("high", priority=5)
    sim.submit("low2")
    sim.submit("neg", priority=-1)
    order = []
    key = "blocker"
    for _ in range(5):
        cmds = sim.finish(key)
        if not assigns(cmds):
            break
        key = assigns(cmds)[0].key
        order.append(key)
    assert order == ["high", "low1", "low2", "neg"]


def test_exhausted_resource_never_blocks_another_shape() -> None:
    sim = Sim()
    sim.join(1, nthreads=4, GPU=1)
    sim.submit("gpu1", GPU=1)
    cmds = sim(
        TasksSubmitted(
            "c",
            (
                TaskSubmission("gpu2", b"", q(GPU=1), priority=100),
                TaskSubmission("gpu3", b"", q(GPU=0.5), priority=50),
                TaskSubmission("cpu", b"", {}, priority=-100),
            ),
        )
    )
    assert [a.key for a in assigns(cmds)] == ["cpu"]
    assert sim.status("gpu2") == READY
    cmds = sim.finish("gpu1")
    assert [a.key for a in assigns(cmds)] == ["gpu2"]
