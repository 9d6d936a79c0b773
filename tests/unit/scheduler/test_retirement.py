"""Retiring workers in the state machine: drained, results handed over, then let go
(issue 13: nothing recomputed, nothing lost, the books exact throughout)."""

from __future__ import annotations

from scheduler_service.commands import Command, ReplicateData, RetireWorker
from scheduler_service.events import (
    DataReplicated,
    KeysReleased,
    RetirementAsked,
    Tick,
    WorkerLeft,
)
from scheduler_service.retirement import REPLICATE_RETRY_S
from tests.helpers.scheduler_sim import Sim, addr, assigns, updates

MB = 10**6


def copies(cmds: list[Command]) -> list[tuple[int, str, tuple[str, ...]]]:
    return [
        (c.worker_id, c.location.key, c.location.addresses)
        for c in cmds
        if isinstance(c, ReplicateData)
    ]


def retired(cmds: list[Command]) -> list[int]:
    return [c.worker_id for c in cmds if isinstance(c, RetireWorker)]


def test_a_result_a_pending_task_needs_moves_before_its_worker_goes_and_is_not_recomputed() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.join(2, B=1)
    sim.submit("x", A=1)
    sim.finish("x", nbytes=50 * MB)
    sim.submit("y", ("x",), C=1)  # nobody offers C yet: y waits, needing x
    cmds = sim(RetirementAsked((1,)))
    assert copies(cmds) == [(2, "x", (addr(1),))] and retired(cmds) == []
    assert sim.state.snapshot().workers[0].draining
    cmds = sim(DataReplicated(2, (("x", 50 * MB),)))
    assert retired(cmds) == [1]
    cmds = sim(WorkerLeft(1))
    assert assigns(cmds) == [] and sim.state.tasks["x"].who_has == {2}
    sim.join(3, C=1)
    (location,) = sim.run_of("y").inputs
    assert location.addresses == (addr(2),)  # from the copy: x never ran again
    sim.finish("y")
    sim.assert_idle()


def test_a_running_task_finishes_on_its_retiring_worker_and_nothing_new_goes_there() -> None:
    sim = Sim()
    sim.join(1, GPU=1)
    sim.join(2, GPU=1)
    sim.submit("long", GPU=1)
    first = sim.run_of("long").worker_id
    other = 3 - first
    assert retired(sim(RetirementAsked((first,)))) == []  # still running
    sim.submit("next", GPU=1)
    assert sim.run_of("next").worker_id == other
    sim.submit("third", GPU=1)  # waits for the open worker, not the retiring one
    assert [a.key for a in sim.runs.values()] == ["long", "next"]
    cmds = sim.finish("long", nbytes=10 * MB)
    assert assigns(cmds) == []  # "third" is not placed where "long" ran
    assert copies(cmds) == [(other, "long", (addr(first),))]
    cmds = sim(DataReplicated(other, (("long", 10 * MB),)))
    assert retired(cmds) == [first]
    # Its client hears where the result lives now, before the old holder goes.
    (told,) = updates(cmds, "long")
    assert addr(other) in told.addresses
    sim(WorkerLeft(first))
    assert sim.state.tasks["long"].who_has == {other}
    sim.finish("next")
    sim.finish("third")
    sim.assert_idle()


def test_queued_runs_on_a_retiring_worker_run_there_first() -> None:
    sim = Sim(worker_queue=2)
    sim.join(1, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("b", GPU=1)
    assert sim.run_of("b").queued
    sim.join(2, GPU=1)
    assert retired(sim(RetirementAsked((1,)))) == []
    sim(KeysReleased("c", ("a",)))
    sim.finish("a")
    sim.start("b")
    cmds = sim.finish("b")
    assert copies(cmds) == [(2, "b", (addr(1),))]


def test_results_nobody_wants_are_not_copied() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.join(2, A=1)
    sim.submit("x", A=1)
    holder = sim.run_of("x").worker_id
    sim.finish("x")
    sim(KeysReleased("c", ("x",)))
    cmds = sim(RetirementAsked((holder,)))
    assert copies(cmds) == [] and retired(cmds) == [holder]


def test_with_no_other_worker_the_results_wait_for_one() -> None:
    sim = Sim()
    sim(Tick(100.0))
    sim.join(1, A=1)
    sim.submit("x", A=1)
    sim.finish("x")
    cmds = sim(RetirementAsked((1,)))
    assert copies(cmds) == [] and retired(cmds) == []
    assert copies(sim(Tick(200.0))) == []
    cmds = sim.join(2)
    assert copies(cmds) == [(2, "x", (addr(1),))]


def test_a_copy_that_does_not_arrive_is_asked_of_another_worker() -> None:
    sim = Sim()
    sim(Tick(100.0))
    sim.join(1, A=1)
    sim.submit("x", A=1)
    sim.finish("x")
    sim.join(2)
    sim.join(3)
    cmds = sim(RetirementAsked((1,)))
    ((first, _, _),) = copies(cmds)
    assert copies(sim(Tick(100.0 + REPLICATE_RETRY_S / 2))) == []
    cmds = sim(Tick(100.0 + REPLICATE_RETRY_S + 1))
    ((second, _, _),) = copies(cmds)
    assert second != first
    # The one asked went away: asked again at once, of the other.
    assert copies(sim(WorkerLeft(second))) == [(first, "x", (addr(1),))]


def test_retiring_twice_or_an_unknown_worker_changes_nothing() -> None:
    sim = Sim()
    sim.join(1, A=1)
    sim.join(2, A=1)
    sim(RetirementAsked((1,)))
    assert retired(sim(RetirementAsked((1, 99)))) == []
    assert set(sim.state.books.open) == {2}
