"""A worker lost: its runs placed again, its results recomputed where still
needed, its late reports ignored, and nothing more sent to it. Driven with
plain events through :class:`Sim` (``validate()`` after every event)."""

from __future__ import annotations

from apportion_common.locations import InputLocation
from scheduler_service.commands import CancelRun, NotifyClient, ReleaseData
from scheduler_service.events import KeysReleased, TaskErred, TaskFinished, WorkerLeft
from scheduler_service.state import ERRED, MEMORY, PROCESSING, READY, RELEASED, WAITING
from tests.helpers.scheduler_sim import BOOM, Sim, addr, assigns, updates

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
    # Not made again; its client hears where it lives now.
    assert assigns(cmds) == []
    assert [(u.key, u.status, u.addresses) for u in updates(cmds)] == [
        ("a", "finished", (addr(2),))
    ]
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
    # Bug fixed in the state machine (validate): b kept running on worker 2 while its
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
    # Bug fixed in the state machine: a recompute of a failed, and the error spread
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
    # Bug fixed in the state machine (found by test_state_properties): when the loss of
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
