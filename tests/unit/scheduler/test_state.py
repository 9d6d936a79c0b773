"""Scenarios of the scheduler's pure state machine, driven with plain events.

Every event goes through :class:`Sim`, which calls ``validate()`` after each
``handle()``, so the books are checked at every step of every scenario.
The Dask ports at the bottom follow distributed/tests/test_resources.py and
the worker state machine tests, translated to this scheduler's events.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from apportion_common.resources import from_quanta
from scheduler_service.commands import CancelRun, InputLocation, NotifyClient, ReleaseData
from scheduler_service.events import (
    ClientJoined,
    ClientLeft,
    KeysReleased,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksSubmitted,
    TaskSubmission,
    WorkerLeft,
)
from scheduler_service.state import (
    ERRED,
    MEMORY,
    PROCESSING,
    READY,
    RELEASED,
    WAITING,
)
from tests.helpers.scheduler_sim import BOOM, Sim, addr, assigns, q, updates

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
    # Bug fixed in state.py: a task queued for capacity on the only GPU
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


# ============================================================ dependencies


def test_dependent_runs_only_after_its_input_is_in_memory() -> None:
    sim = Sim()
    sim.join(1, nthreads=4)
    sim.submit("a")
    cmds = sim.submit("b", deps=("a",))
    assert assigns(cmds) == []
    assert sim.running_on(1) == ["a"]
    cmds = sim.finish("a", nbytes=1234)
    (assign,) = assigns(cmds)
    assert assign.key == "b"
    assert assign.inputs == (InputLocation("a", (addr(1),), 1234),)


def test_inputs_list_every_holder_and_a_fetched_copy_counts() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, G=1)
    sim.submit("a")
    sim.finish("a", nbytes=10)
    sim.submit("b", deps=("a",), G=1)
    assert sim.run_of("b").worker_id == 2
    sim.finish("b", fetched=(("a", 10),))
    assert sim.state.tasks["a"].who_has == {1, 2}
    (assign,) = assigns(sim.submit("c", deps=("a", "b")))
    assert assign.inputs == (
        InputLocation("a", (addr(1), addr(2)), 10),
        InputLocation("b", (addr(2),), 100),
    )
    # w2 holds a and b (110 bytes), w1 only a: c goes where the bytes are.
    assert assign.worker_id == 2


def test_prefers_the_worker_holding_the_input_bytes() -> None:
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.join(2, nthreads=2)
    sim.submit("x")
    sim.submit("y")
    assert sim.run_of("x").worker_id == 1
    assert sim.run_of("y").worker_id == 2  # least busy
    sim.finish("x", nbytes=10)
    sim.finish("y", nbytes=10_000)
    (on_y,) = assigns(sim.submit("z", deps=("y",)))
    assert on_y.worker_id == 2  # although worker 1 joined first
    (both,) = assigns(sim.submit("z2", deps=("x", "y")))
    assert both.worker_id == 2  # more input bytes there


def test_a_fetched_input_that_is_no_longer_in_memory_is_dropped() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",), G=1)
    sim(KeysReleased("c", ("a",)))
    assert sim.status("a") == MEMORY  # b still needs it
    sim(TasksCancelled("c", ("b",)))
    assert "a" not in sim.state.tasks
    cmds = sim.finish("b", fetched=(("a", 100),))
    assert ReleaseData(2, "a") in cmds
    assert sim.state.workers[2].has == set()


# ================================================================== errors


def test_error_releases_the_lease_and_errs_dependents_with_the_same_error() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, A=1)
    sim.submit("a", A=1)
    sim.submit("b", deps=("a",))
    sim.submit("c", deps=("b",), client="other")
    assert sim.used(1) == {"A": 1.0}
    cmds = sim.fail("a")
    assert sim.used(1) == {}
    assert {(u.client_id, u.key, u.status, u.error) for u in updates(cmds)} == {
        ("c", "a", "error", BOOM),
        ("c", "b", "error", BOOM),
        ("other", "c", "error", BOOM),
    }
    assert {sim.status(k) for k in "abc"} == {ERRED}
    # Depending on an erred key errs at once.
    (update,) = updates(sim.submit("d", deps=("b",)))
    assert (update.status, update.error) == ("error", BOOM)
    sim.assert_idle()


def test_retries_requeue_the_task_then_the_error_sticks() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.join(2, A=1)
    sim.submit("a", retries=2, A=1)
    first = sim.run_of("a")
    cmds = sim.fail("a")
    assert updates(cmds) == []
    second = sim.run_of("a")
    assert second.run_id != first.run_id
    assert updates(sim.fail("a")) == []
    cmds = sim.fail("a")
    assert [(u.status, u.error) for u in updates(cmds)] == [("error", BOOM)]
    assert sim.runs == {}
    sim.assert_idle()


def test_a_duplicate_or_stale_report_is_ignored() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    run = sim.run_of("a")
    sim.finish("a")
    assert sim(TaskFinished(1, "a", run.run_id, 5)) == []
    assert sim(TaskErred(1, "a", run.run_id, BOOM)) == []
    assert sim(TaskMissingInputs(1, "a", run.run_id, ())) == []
    assert sim(TaskFinished(1, "a", 999, 5)) == []
    assert sim.status("a") == MEMORY
    assert sim.state.tasks["a"].nbytes == 100


def test_unknown_dependency_errs_the_task() -> None:
    sim = Sim()
    sim.join(1)
    (update,) = updates(sim.submit("b", deps=("nope",)))
    assert update.status == "error"
    assert update.error is not None and "nope" in update.error.message
    assert sim.runs == {}


def test_one_known_and_one_unknown_dependency() -> None:
    # Bug fixed in state.py: the erred task was not linked to its known
    # dependency, and validate() reported "b: broken dep link".
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    (update,) = updates(sim.submit("b", deps=("a", "nope")))
    assert update.status == "error"
    sim.finish("a")
    sim(KeysReleased("c", ("a",)))
    assert "a" in sim.state.tasks  # b still refers to it
    sim(KeysReleased("c", ("b",)))
    assert sim.state.tasks == {}


def test_unknown_dependency_submitted_later_is_another_task() -> None:
    # Bug fixed in state.py (found by test_state_properties): b erred for its
    # unknown input a; when a key "a" was submitted afterwards, validate()
    # reported "b: broken dep link".
    sim = Sim()
    sim.join(1)
    spec_b = TaskSubmission("b", b"", {}, ("a",))
    spec_a = TaskSubmission("a", b"", {})
    cmds = sim(TasksSubmitted("c", (spec_b, spec_a)))
    assert [(u.key, u.status) for u in updates(cmds)] == [("b", "error")]
    assert sim.state.tasks["a"].dependents == set()
    sim.finish("a")
    sim(KeysReleased("c", ("b",)))
    assert set(sim.state.tasks) == {"a"}


def test_task_depending_on_its_own_released_key_errs() -> None:
    # Bug fixed in state.py: a new task listing its own key as an input (a
    # stale future of a released key) waited on itself forever.
    sim = Sim()
    sim.join(1)
    sim.submit("x")
    sim.finish("x")
    sim(KeysReleased("c", ("x",)))
    (update,) = updates(sim.submit("x", deps=("x",)))
    assert update.status == "error"
    assert update.error is not None and "'x'" in update.error.message
    assert sim.status("x") == ERRED
    assert sim.state.tasks["x"].dependents == set()
    assert sim.runs == {}


# ============================================================ cancellation


def test_cancelled_run_keeps_its_lease_until_the_worker_reports() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, A=1)
    sim.submit("x", A=1)
    run = sim.run_of("x")
    sim.submit("y", A=1)
    cmds = sim(TasksCancelled("c", ("x",)))
    assert CancelRun(1, "x", run.run_id) in cmds
    assert updates(cmds) == []  # the canceller marked x itself
    assert "x" not in sim.state.tasks
    # The code has not returned yet: A stays held and y must wait.
    assert sim.used(1) == {"A": 1.0}
    assert assigns(cmds) == []
    cmds = sim.finish(run)
    assert ReleaseData(1, "x", run.run_id) in cmds
    assert [a.key for a in assigns(cmds)] == ["y"]
    sim.finish("y")
    sim.assert_idle()


def test_cancelled_run_that_errs_releases_its_lease_quietly() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.submit("x", A=1)
    run = sim.run_of("x")
    sim(TasksCancelled("c", ("x",)))
    cmds = sim.fail(run)
    assert cmds == []
    sim.assert_idle()


def test_cancel_cancels_dependents_and_a_ready_task() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("b", deps=("a",))
    sim.submit("other")
    cmds = sim(TasksCancelled("c", ("a", "other")))
    # The canceller is told only of what it did not name: the dependent b.
    assert updates(cmds) == [NotifyClient("c", "b", "cancelled")]
    assert sim.state.tasks == {}
    # "other" was ready, never assigned: nothing to report for it.
    sim.finish("a")
    sim.assert_idle()
    assert sim.state.tasks == {}


def test_cancel_by_one_client_only_releases_a_task_another_client_wants() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim(TasksSubmitted("other", (TaskSubmission("a", b"a", {}),)))
    cmds = sim(TasksCancelled("c", ("a",)))
    assert cmds == []
    assert sim.state.tasks["a"].wanted_by == {"other"}
    assert sim.state.tasks["a"].state == PROCESSING
    cmds = sim.finish("a")
    assert [(u.client_id, u.status) for u in updates(cmds)] == [("other", "finished")]


def test_cancelling_a_finished_task_releases_its_data() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.finish("a")
    cmds = sim(TasksCancelled("c", ("a",)))
    assert ReleaseData(1, "a") in cmds
    assert sim.state.workers[1].has == set()


# ============================================================ worker loss


def test_lost_worker_runs_are_placed_again_and_its_stale_reports_ignored() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, GPU=1)
    sim.submit("a", GPU=1)
    old = sim.run_of("a")
    assert old.worker_id == 1
    cmds = sim(WorkerLeft(1))
    assert assigns(cmds) == []
    assert sim.status("a") == READY
    cmds = sim.join(2, GPU=1)
    (new,) = assigns(cmds)
    assert (new.worker_id, new.key) == (2, "a")
    assert new.run_id != old.run_id
    # The lost worker's late report changes nothing.
    assert sim(TaskFinished(1, "a", old.run_id, 5)) == []
    assert sim(TaskErred(1, "a", old.run_id, BOOM)) == []
    assert sim.status("a") == PROCESSING
    assert sim.used(2) == {"GPU": 1.0}
    sim.finish("a")
    assert updates(sim.log, "a")[-1].status == "finished"
    sim.assert_idle()


def test_lost_results_are_recomputed_only_when_still_wanted() -> None:
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.submit("a")
    sim.submit("b", deps=("a",))
    sim.finish("a")
    sim.finish("b")
    sim(KeysReleased("c", ("a",)))
    assert sim.status("a") == RELEASED  # kept: b may need it recomputed
    sim.join(2)
    cmds = sim(WorkerLeft(1))
    assert updates(cmds) == [NotifyClient("c", "b", "pending")]
    # b is wanted and needs a: both are computed again, a first.
    assert [a.key for a in assigns(cmds)] == ["a"]
    assert sim.status("b") == WAITING
    cmds = sim.finish("a")
    assert [a.key for a in assigns(cmds)] == ["b"]
    cmds = sim.finish("b")
    assert updates(cmds, "b")[-1].addresses == (addr(2),)
    # a is unwanted again: its copy is dropped.
    assert ReleaseData(2, "a") in cmds
    sim.assert_idle()


def test_lost_result_with_another_copy_is_not_recomputed() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, H=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("x", deps=("a",), H=1)
    sim.finish("x", fetched=(("a", 100),))
    cmds = sim(WorkerLeft(1))
    assert cmds == []
    assert sim.status("a") == MEMORY
    assert sim.state.tasks["a"].who_has == {2}
    (assign,) = assigns(sim.submit("y", deps=("a",)))
    assert assign.inputs == (InputLocation("a", (addr(2),), 100),)


def test_worker_loss_with_nothing_on_it_changes_nothing() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2)
    sim.submit("a")
    sim.finish("a")
    assert sim(WorkerLeft(2)) == []
    assert sim(WorkerLeft(2)) == []
    assert sim(WorkerLeft(99)) == []
    assert sim.status("a") == MEMORY


def test_lost_input_of_a_waiting_task_is_recomputed() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, nthreads=2, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("blocker", G=1)
    sim.submit("b", deps=("a",), G=1)
    assert sim.status("b") == READY
    cmds = sim(WorkerLeft(1))
    assert sim.status("b") == WAITING
    assert updates(cmds) == [NotifyClient("c", "a", "pending")]
    assert [(a.worker_id, a.key) for a in assigns(cmds)] == [(2, "a")]
    assert assigns(sim.finish("blocker")) == []  # b still waits for a
    cmds = sim.finish("a")
    assert [a.key for a in assigns(cmds)] == ["b"]
    sim.finish("b")
    sim.assert_idle()


def test_lost_input_of_a_running_task() -> None:
    # Bug fixed in state.py (validate): b kept running on worker 2 while its
    # input a, lost with worker 1, was recomputed; validate() called that
    # "b runs without a". b may already hold a, so it is left to finish.
    sim = Sim()
    sim.join(1)
    sim.join(2, nthreads=2, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",), G=1)
    b_run = sim.run_of("b")
    assert b_run.worker_id == 2
    sim(KeysReleased("c", ("a",)))  # a is now kept only for b
    cmds = sim(WorkerLeft(1))
    assert updates(cmds) == []
    (recompute,) = assigns(cmds)
    assert (recompute.worker_id, recompute.key) == (2, "a")
    cmds = sim.finish(b_run, fetched=(("a", 100),))
    assert updates(cmds, "b")[-1].status == "finished"
    # b no longer needs a: the recompute is called off.
    assert CancelRun(2, "a", recompute.run_id) in cmds
    assert sim.status("a") == RELEASED
    assert sim.status("b") == MEMORY
    cmds = sim.finish(recompute)
    assert cmds == [ReleaseData(2, "a", recompute.run_id)]
    sim.assert_idle()


def test_lost_input_of_a_running_task_that_could_not_fetch_it() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, nthreads=2, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",), G=1)
    sim(WorkerLeft(1))
    cmds = sim.missing("b", ("a", addr(1)))
    assert assigns(cmds) == []
    assert sim.status("b") == WAITING
    cmds = sim.finish("a")
    (assign,) = assigns(cmds)
    assert assign.key == "b"
    assert assign.inputs == (InputLocation("a", (addr(2),), 100),)
    sim.finish("b")
    sim.assert_idle()


def test_recompute_that_errs_leaves_finished_dependents_alone() -> None:
    # Bug fixed in state.py: a recompute of a failed, and the error spread
    # into d, which was finished and held on worker 2: d turned "erred"
    # while still held, and the client got "error" after "finished".
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.join(2, H=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",))
    sim.finish("b")
    sim.submit("d", deps=("a",), H=1)
    assert sim.run_of("d").worker_id == 2
    sim.finish("d")
    sim(KeysReleased("c", ("a",)))
    sim(WorkerLeft(1))  # b is lost; recomputing it needs a again
    cmds = sim.fail("a")
    assert [(u.key, u.status) for u in updates(cmds)] == [("b", "error")]
    assert sim.status("d") == MEMORY
    assert sim.state.tasks["d"].who_has == {2}
    # d stays finished for a new client too.
    assert updates(sim.submit("d", client="late"))[0].status == "finished"


def test_recomputing_a_result_whose_input_erred_errs_it() -> None:
    # Regression for the fix above: d stayed finished although its input a
    # erred on recompute; when d itself must be recomputed later, it errs
    # with a's error, and so does e, which needed d.
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.join(2, nthreads=2, H=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",))
    sim.finish("b")
    sim.submit("d", deps=("a",), H=1)
    sim.finish("d")
    sim(KeysReleased("c", ("a",)))
    sim(WorkerLeft(1))
    sim.fail("a")
    assert sim.status("d") == MEMORY
    sim.submit("e", deps=("d",), E=1)  # no worker has E yet
    sim.join(3, E=1)
    sim.finish("e", fetched=(("d", 100),))
    sim(KeysReleased("c", ("d",)))
    assert sim.status("d") == RELEASED
    cmds = sim(WorkerLeft(3))  # e is lost; recomputing it needs d, then a
    assert [(u.key, u.status, u.error) for u in updates(cmds)][-1] == ("e", "error", BOOM)
    assert sim.status("e") == ERRED
    assert sim.runs == {}
    sim.assert_idle()


def test_no_command_goes_to_a_lost_worker() -> None:
    # Bug fixed in state.py (found by test_state_properties): when the loss of
    # worker 1 made b's recompute err, the error reached c, running on
    # worker 1, and the scheduler sent CancelRun to the worker that had left.
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.join(2, H=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",))
    sim.finish("b")
    sim(KeysReleased("c", ("a",)))
    sim.submit("d", deps=("a",), H=1)  # a is computed again, and fails
    cmds = sim.fail("a")
    assert [(u.key, u.status) for u in updates(cmds)] == [("d", "error")]
    sim.submit("c2", deps=("b",))
    assert sim.run_of("c2").worker_id == 1
    cmds = sim(WorkerLeft(1))
    assert [c for c in cmds if getattr(c, "worker_id", None) == 1] == []
    assert sim.status("b") == ERRED
    assert sim.status("c2") == ERRED
    assert updates(cmds, "c2")[-1].error == BOOM
    sim.assert_idle()


# ========================================================== clients, keys


def test_client_leaving_releases_its_tasks() -> None:
    sim = Sim()
    sim.join(1, nthreads=3)
    sim(ClientJoined("c"))
    sim.submit("running")
    sim.submit("done")
    sim.submit("shared")
    sim.submit("shared", client="other")
    sim.submit("queued", deps=("running",))
    running = sim.run_of("running")
    sim.finish("done")
    cmds = sim(ClientLeft("c"))
    assert CancelRun(1, "running", running.run_id) in cmds
    assert ReleaseData(1, "done") in cmds
    assert set(sim.state.tasks) == {"shared"}
    assert "c" not in sim.state.clients
    assert sim.used(1) == {}
    assert sim.state.workers[1].runs.keys() == {running.run_id, sim.run_of("shared").run_id}
    cmds = sim.finish(running)
    assert ReleaseData(1, "running", running.run_id) in cmds
    sim.finish("shared")
    assert updates(sim.log, "shared")[-1].client_id == "other"
    sim.assert_idle()


def test_keys_released_forgets_tasks_and_sends_release_data() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.finish("a")
    cmds = sim(KeysReleased("c", ("a",)))
    assert cmds == [ReleaseData(1, "a")]
    assert sim.state.tasks == {}
    assert sim.state.workers[1].has == set()
    assert sim(KeysReleased("c", ("a", "never"))) == []


def test_released_input_is_kept_while_a_dependent_needs_it() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("blocker")
    sim.finish("a")
    sim.submit("b", deps=("a",))
    cmds = sim(KeysReleased("c", ("a",)))
    assert cmds == []
    assert sim.status("a") == MEMORY
    sim.finish("blocker")
    cmds = sim.finish("b")
    assert ReleaseData(1, "a") in cmds
    assert set(sim.state.tasks) == {"a", "b", "blocker"}
    assert sim.status("a") == RELEASED
    sim(KeysReleased("c", ("b",)))
    assert set(sim.state.tasks) == {"blocker"}


@pytest.mark.parametrize("order", list(itertools.permutations(["x", "y", "z"])))
def test_releasing_a_waiting_graph_in_any_order(order: tuple[str, ...]) -> None:
    # Bug fixed in state.py (found by test_state_properties): forgetting z
    # dropped its input y before unlinking z from x, so dropping y looked up
    # x's dependents and found the deleted z (KeyError in _needs_data).
    sim = Sim()
    sim.join(1, GPU=1)
    sim.submit("x", GPU=2)  # never fits: x stays ready, y and z wait
    sim.submit("y", deps=("x",))
    sim.submit("z", deps=("y", "x"))
    sim(KeysReleased("c", order))
    assert sim.state.tasks == {}
    assert sim.state.clients == {"c": set()}


def test_client_leaving_with_a_waiting_graph() -> None:
    sim = Sim()
    sim.join(1, GPU=1)
    sim.submit("x", GPU=2)
    sim.submit("y", deps=("x",))
    sim.submit("z", deps=("y", "x"))
    assert sim(ClientLeft("c")) == []
    assert sim.state.tasks == {}


def test_key_released_by_one_client_stays_for_another() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("a", client="other")
    sim.finish("a")
    assert sim(KeysReleased("c", ("a",))) == []
    assert sim.status("a") == MEMORY
    assert sim.state.tasks["a"].wanted_by == {"other"}


def test_missing_inputs_requeue_the_task_and_recompute_the_input() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, nthreads=2, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",), G=1)
    assert sim.run_of("b").worker_id == 2
    # Worker 1 dropped a (say it restarted) and b could not fetch it.
    cmds = sim.missing("b", ("a", addr(1)))
    assert sim.used(2) == {}
    assert sim.status("b") == WAITING
    (assign,) = assigns(cmds)
    assert assign.key == "a"
    cmds = sim.finish("a")
    (assign,) = assigns(cmds)
    assert assign.key == "b"
    sim.finish("b")
    assert sim.status("b") == MEMORY
    sim.assert_idle()


def test_missing_input_that_lives_elsewhere_too_is_not_recomputed() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, H=1)
    sim.join(3, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("x", deps=("a",), H=1)
    sim.finish("x", fetched=(("a", 100),))
    assert sim.state.tasks["a"].who_has == {1, 2}
    sim.submit("b", deps=("a",), G=1)
    cmds = sim.missing("b", ("a", addr(1)))
    # Only worker 1's copy is gone: b is placed again at once, fetching from 2.
    (assign,) = assigns(cmds)
    assert assign.key == "b"
    assert assign.inputs == (InputLocation("a", (addr(2),), 100),)
    assert sim.state.tasks["a"].who_has == {2}
    assert "a" not in sim.state.workers[1].has


def test_submitting_an_existing_key_returns_its_current_status() -> None:
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.submit("a")
    sim.submit("bad")
    (update,) = updates(sim.submit("a", client="c2"))
    assert (update.client_id, update.key, update.status) == ("c2", "a", "pending")
    assert assigns(sim.log).count(sim.run_of("a")) == 1  # not run twice
    sim.finish("a", nbytes=7)
    (update,) = updates(sim.submit("a", client="c3"))
    assert (update.status, update.addresses, update.nbytes) == ("finished", (addr(1),), 7)
    sim.fail("bad")
    (update,) = updates(sim.submit("bad", client="c3"))
    assert (update.status, update.error) == ("error", BOOM)
    assert sim.state.tasks["a"].wanted_by == {"c", "c2", "c3"}


def test_submitting_a_released_key_computes_it_again() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("b", deps=("a",))
    sim.finish("a")
    sim.finish("b")
    sim(KeysReleased("c", ("a",)))
    assert sim.status("a") == RELEASED
    cmds = sim.submit("a", client="c2")
    assert [a.key for a in assigns(cmds)] == ["a"]
    assert updates(cmds)[0].status == "pending"


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


# ============================================================ long chains

CHAIN = 300


@contextmanager
def shallow_stack(headroom: int = 100) -> Iterator[None]:
    """Allow only ``headroom`` more frames than the caller has, so that a walk
    that recurses once per task of a CHAIN-long graph fails fast."""
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back  # type: ignore[assignment]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + headroom)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def chain(sim: Sim, n: int = CHAIN, **resources: float) -> list[str]:
    """x = f(x) in a loop: t0 <- t1 <- ... <- t(n-1)."""
    keys = [f"t{i}" for i in range(n)]
    sim(
        TasksSubmitted(
            "c",
            tuple(
                TaskSubmission(k, b"", q(**resources), (keys[i - 1],) if i else ())
                for i, k in enumerate(keys)
            ),
        )
    )
    return keys


def test_long_waiting_chain_is_released_without_deep_recursion() -> None:
    # Bug fixed in state.py: forgetting a task dropped its inputs
    # recursively, two frames per task: releasing the end of a chain of ~500
    # tasks raised RecursionError in the middle of handle().
    sim = Sim()
    sim.join(1)
    keys = chain(sim)
    sim(KeysReleased("c", tuple(keys[:-1])))
    assert len(sim.state.tasks) == CHAIN
    with shallow_stack():
        cmds = sim(KeysReleased("c", (keys[-1],)))
    assert sim.state.tasks == {}
    assert cmds == [CancelRun(1, "t0", sim.run_of("t0").run_id)]


def test_long_chain_is_cancelled_without_deep_recursion() -> None:
    sim = Sim()
    sim.join(1)
    keys = chain(sim)
    with shallow_stack():
        cmds = sim(TasksCancelled("c", ("t0",)))
    assert sim.state.tasks == {}
    cancelled = [u.key for u in updates(cmds)]
    assert sorted(cancelled) == sorted(keys[1:])  # all but the one it named
    assert cancelled[0] == keys[-1]  # dependents first


def test_long_released_chain_is_recomputed_without_deep_recursion() -> None:
    sim = Sim()
    sim.join(1)
    keys = chain(sim)
    sim(KeysReleased("c", tuple(keys[:-1])))
    for key in keys:
        sim.finish(key)
    assert sim.status(keys[-1]) == MEMORY
    assert {sim.status(k) for k in keys[:-1]} == {RELEASED}
    sim.join(2)
    with shallow_stack():
        cmds = sim(WorkerLeft(1))
    assert [a.key for a in assigns(cmds)] == ["t0"]
    assert sim.status(keys[-1]) == WAITING
    for key in keys:
        sim.finish(key)
    assert sim.status(keys[-1]) == MEMORY
    assert updates(sim.log, keys[-1])[-1].addresses == (addr(2),)
    sim.assert_idle()


# ====================================================== Dask ports: resources


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize(("p_x", "p_y", "first"), [(1, 0, "x"), (0, 1, "y")])
def test_constrained_vs_ready_priority_1(swap: bool, p_x: int, p_y: int, first: str) -> None:
    """Ready and constrained tasks: the one with the higher priority wins
    (test_constrained_vs_ready_priority_1)."""
    sim = Sim()
    sim.join(1, nthreads=1, R=1)
    sim.submit("clog", R=1)
    x = TaskSubmission("x", b"", {}, priority=p_x)
    y = TaskSubmission("y", b"", q(R=1), priority=p_y)
    sim(TasksSubmitted("c", (y, x) if swap else (x, y)))
    assert sim.running_on(1) == ["clog"]
    cmds = sim.finish("clog")
    assert [a.key for a in assigns(cmds)] == [first]
    cmds = sim.finish(first)
    assert [a.key for a in assigns(cmds)] == ["y" if first == "x" else "x"]


def test_constrained_vs_ready_priority_2() -> None:
    """Not enough of the resource for the higher-priority task: the lower-
    priority unconstrained one runs instead (test_constrained_vs_ready_priority_2)."""
    sim = Sim()
    sim.join(1, nthreads=2, R=1)
    sim.submit("clog", R=1)
    cmds = sim(
        TasksSubmitted(
            "c",
            (
                TaskSubmission("y", b"", q(R=1), priority=10),
                TaskSubmission("x", b"", {}, priority=0),
            ),
        )
    )
    assert [a.key for a in assigns(cmds)] == ["x"]
    sim.finish("x")
    assert sim.status("y") == READY
    cmds = sim.finish("clog")
    assert [a.key for a in assigns(cmds)] == ["y"]


@pytest.mark.parametrize("outcome", ["finished", "erred"])
def test_cancelled_and_resubmitted_with_different_resources(outcome: str) -> None:
    """x is cancelled while running, then submitted again under the same key
    with other resources (test_resumed_with_different_resources): the new x
    runs with the new resources, and the old run's lease is held until it
    reports."""
    sim = Sim()
    sim.join(1, nthreads=2, R=1)
    sim.submit("x", R=1)
    old = sim.run_of("x")
    sim(TasksCancelled("c", ("x",)))
    assert sim.used(1) == {"R": 1.0}
    cmds = sim.submit("x", R=0.4)
    assert assigns(cmds) == []  # R is still held by the old run
    assert sim.used(1) == {"R": 1.0}
    assert sim.status("x") == READY
    cmds = sim.finish(old) if outcome == "finished" else sim.fail(old)
    if outcome == "finished":
        assert ReleaseData(1, "x", old.run_id) in cmds
    assert updates(cmds) == []  # the new x is not finished by the old run
    (new,) = assigns(cmds)
    assert (new.key, new.resources) == ("x", {"R": 400_000_000})
    assert new.run_id != old.run_id
    assert sim.used(1) == {"R": 0.4}
    cmds = sim.finish(new)
    assert updates(cmds) == [NotifyClient("c", "x", "finished", (addr(1),), 100)]
    sim.assert_idle()


def test_cancelled_and_resubmitted_with_a_fitting_resource_runs_beside_the_old_run() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, R=1)
    sim.submit("x", R=0.5)
    old = sim.run_of("x")
    sim(TasksCancelled("c", ("x",)))
    (new,) = assigns(sim.submit("x", R=0.5))
    assert sim.used(1) == {"R": 1.0}
    # Reports in the other order: the new run first.
    sim.finish(new)
    assert sim.status("x") == MEMORY
    cmds = sim.finish(old)
    assert cmds == [ReleaseData(1, "x", old.run_id)]
    assert sim.status("x") == MEMORY
    sim.assert_idle()


def test_minimum_resource() -> None:
    """A single unit of A bounds a three-thread worker to one task at a time
    (test_minimum_resource)."""
    sim = Sim()
    sim.join(1, nthreads=3, A=1)
    sim(TasksSubmitted("c", tuple(TaskSubmission(f"t{i}", b"", q(A=1)) for i in range(30))))
    most = 0
    for _ in range(30):
        most = max(most, len(sim.runs))
        (run,) = sim.runs.values()
        sim.finish(run)
    assert most == 1
    assert sim.runs == {}
    assert all(t.state == MEMORY for t in sim.state.tasks.values())
    assert len(sim.state.tasks) == 30
    sim.assert_idle()


def test_resource_submit() -> None:
    """Each task goes to the worker with its resource; one that nobody has
    waits until a worker with it joins (test_resource_submit, test_move)."""
    sim = Sim()
    sim.join(1, nthreads=1, A=5)
    sim.join(2, nthreads=1, A=1, B=1)
    sim.submit("x", A=3)
    sim.submit("y", B=1)
    cmds = sim.submit("z", C=2)
    assert sim.run_of("x").worker_id == 1
    assert sim.run_of("y").worker_id == 2
    assert "C=2" in updates(cmds, "z")[0].waiting_reason
    sim.finish("x")
    sim.finish("y")
    assert sim.status("z") == READY
    cmds = sim.join(3, nthreads=1, C=10)
    (assign,) = assigns(cmds)
    assert (assign.worker_id, assign.key) == (3, "z")
    sim.finish("z")
    sim.assert_idle()


def test_submit_many_non_overlapping() -> None:
    """Tasks needing A and tasks needing B share neither worker
    (test_submit_many_non_overlapping)."""
    sim = Sim()
    sim.join(1, nthreads=4, A=1)
    sim.join(2, nthreads=4, B=1)
    for i in range(6):
        sim.submit(f"a{i}", A=1)
        sim.submit(f"b{i}", B=1)
    while sim.runs:
        for run in list(sim.runs.values()):
            assert run.worker_id == (1 if run.key.startswith("a") else 2)
            sim.finish(run)
    assert all(t.state == MEMORY for t in sim.state.tasks.values())
    sim.assert_idle()
