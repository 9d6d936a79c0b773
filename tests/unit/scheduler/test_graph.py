"""The task graph: dependencies, errors and retries, cancellation, and long
chains walked without recursion, driven with plain events through
:class:`Sim` (``validate()`` after every event)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from apportion_common.locations import InputLocation
from scheduler_service.commands import CancelRun, NotifyClient, ReleaseData
from scheduler_service.events import (
    KeysReleased,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksSubmitted,
    TaskSubmission,
    WorkerLeft,
)
from scheduler_service.state import ERRED, MEMORY, PROCESSING, RELEASED, WAITING
from tests.helpers.scheduler_sim import BOOM, Sim, addr, assigns, q, updates

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
    # Bug fixed in the state machine: the erred task was not linked to its known
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
    # Bug fixed in the state machine (found by test_state_properties): b erred for its
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
    # Bug fixed in the state machine: a new task listing its own key as an input (a
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
    # Bug fixed in the state machine: forgetting a task dropped its inputs
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
