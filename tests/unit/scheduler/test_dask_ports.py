"""Ports of Dask's tests (distributed/tests/test_resources.py and the worker
state machine tests), translated to this scheduler's events and driven
through :class:`Sim` (``validate()`` after every event)."""

from __future__ import annotations

import pytest

from scheduler_service.commands import NotifyClient, ReleaseData
from scheduler_service.events import TasksCancelled, TasksSubmitted, TaskSubmission
from scheduler_service.state import MEMORY, READY
from tests.helpers.scheduler_sim import Sim, addr, assigns, q, updates

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
