"""The worker's state machine, step by step, without gRPC, threads or a clock.

Every stimulus goes through :class:`WorkerSim`, which calls ``validate()``
after it: the ledger balances, no more runs hold leases than there are
threads, and a queued run that fits in what is free never waits. The Dask
ports follow distributed/tests/test_resources.py's worker state machine
tests, translated (Dask's priorities are "lower first"; ours "higher first").
"""

from __future__ import annotations

import pytest

from apportion_common.resources import to_quanta
from tests.helpers.worker_sim import WorkerSim, run
from worker_service.state import InvariantError, Refused, WorkerState

# ---------------------------------------------------------------- the bug


def test_a_free_thread_is_never_held_back_by_a_queued_run_waiting_for_a_resource() -> None:
    """One worker, 2 threads, R=1: one run holds a thread, another a thread and
    R; y (needs R) then x (needs only a thread) are queued. When the first run
    ends, x starts at once, however long y has waited (the state machine has no
    clock: waiting changes nothing)."""
    sim = WorkerSim(nthreads=2, R=1)
    assert sim.assign("a", queued=False) == ["a"]
    assert sim.assign("b", queued=False, R=1) == ["b"]
    assert sim.assign("y", R=1) == []
    assert sim.assign("x") == []
    assert sim.queued() == ["y", "x"]
    assert sim.end("a") == ["x"]
    assert sim.queued() == ["y"]
    assert sim.end("b") == ["y"]
    assert sim.queued() == []


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize(("p1", "p2", "expect"), [(1, 0, "y"), (0, 1, "x")])
def test_constrained_vs_ready_priority_1(p1: int, p2: int, expect: str, swap: bool) -> None:
    """Dask: if there are both ready and constrained runs and room for either,
    the one with the highest priority starts."""
    sim = WorkerSim(nthreads=1, R=1)
    sim.assign("clog", queued=False)
    arrivals = [("x", {"priority": -p1}), ("y", {"priority": -p2, "R": 1})]
    for key, options in reversed(arrivals) if swap else arrivals:
        sim.assign(key, **options)  # type: ignore[arg-type]
    assert sim.end("clog") == [expect]


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize(("p1", "p2"), [(1, 0), (0, 1)])
def test_constrained_vs_ready_priority_2(p1: int, p2: int, swap: bool) -> None:
    """Dask: with both ready and constrained runs but not enough of the
    resource, priority is inconsequential: the run that fits starts."""
    sim = WorkerSim(nthreads=2, R=1)
    sim.assign("clog1", queued=False)
    sim.assign("clog2", queued=False, R=1)
    arrivals = [("x", {"priority": -p1}), ("y", {"priority": -p2, "R": 1})]
    for key, options in reversed(arrivals) if swap else arrivals:
        sim.assign(key, **options)  # type: ignore[arg-type]
    assert sim.end("clog1") == ["x"]


def test_constrained_tasks_respect_priority() -> None:
    sim = WorkerSim(nthreads=1, R=1)
    sim.assign("clog", queued=False, R=1)
    sim.assign("x1", priority=-1, R=1)
    sim.assign("x2", priority=-2, R=1)
    sim.assign("x3", priority=0, R=1)
    assert sim.end("clog") == ["x3"]
    assert sim.end("x3") == ["x1"]
    assert sim.end("x1") == ["x2"]


def test_a_task_cancelled_and_readded_with_resources_respects_them() -> None:
    """Dask #6710: queued without resources, cancelled, then assigned again
    (a new run) needing R: the new run waits for R."""
    sim = WorkerSim(nthreads=2, R=1)
    sim.assign("clog", queued=False, R=1)
    assert sim.assign("x") == ["x"]
    assert sim.state.cancel(sim.run_id("x")) is None  # running: marked, lease kept
    sim.state.validate()
    assert sim.end_run("x").cancelled
    assert sim.assign("x", R=1) == []
    assert sim.queued() == ["x"]
    assert sim.end("clog") == ["x"]


def test_a_cancelled_running_run_keeps_its_lease_until_its_code_returns() -> None:
    sim = WorkerSim(nthreads=1, R=1)
    sim.assign("x", queued=False, R=1)
    sim.assign("y", R=1)
    assert sim.state.cancel(sim.run_id("x")) is None
    sim.state.validate()
    assert sim.state.ledger.free == {"R": 0}  # still held
    assert sim.queued() == ["y"]
    ended = sim.end_run("x")
    assert ended.cancelled and [a.key for a in ended.started] == ["y"]


def test_a_cancelled_queued_run_is_dropped_unstarted() -> None:
    sim = WorkerSim(nthreads=1)
    sim.assign("a", queued=False)
    sim.assign("b")
    sim.assign("c")
    dropped = sim.state.cancel(sim.run_id("b"))
    sim.state.validate()
    assert dropped is not None and dropped.key == "b"
    assert sim.queued() == ["c"]
    assert sim.end("a") == ["c"]


def test_the_scarcest_resource_bounds_how_many_run_at_once() -> None:
    """Dask's test_minimum_resource: A=2, B=1 on 4 threads runs one A1+B1 at a time."""
    sim = WorkerSim(nthreads=4, A=2, B=1)
    started = [k for i in range(6) for k in sim.assign(f"t{i}", A=1, B=1)]
    assert started == ["t0"]
    for i in range(5):
        assert len(sim.executing) == 1
        assert sim.end(f"t{i}") == [f"t{i + 1}"]


def test_several_queued_runs_start_when_one_end_frees_room_for_all() -> None:
    sim = WorkerSim(nthreads=3, GPU=2)
    sim.assign("big", queued=False, GPU=2)
    sim.assign("g1", GPU=1)
    sim.assign("g2", GPU=1)
    assert sim.end("big") == ["g1", "g2"]


def test_deeper_runs_start_first_then_the_oldest() -> None:
    sim = WorkerSim(nthreads=1)
    sim.assign("clog", queued=False)
    sim.assign("old")
    sim.assign("deep", depth=3)
    sim.assign("new")
    assert sim.queued() == ["deep", "old", "new"]
    assert sim.end("clog") == ["deep"]


def test_a_queued_run_that_fits_at_once_starts_at_once() -> None:
    sim = WorkerSim(nthreads=2, GPU=1)
    assert sim.assign("a", GPU=1) == ["a"]
    assert sim.assign("b", GPU=1) == []
    assert sim.assign("c") == ["c"]  # a thread and nothing else: it fits


def test_lowering_the_declaration_lets_runs_finish_and_starts_nothing_that_needs_it() -> None:
    sim = WorkerSim(nthreads=4, GPU=2)
    sim.assign("a", queued=False, GPU=2)
    sim.assign("b", GPU=1)
    assert sim.state.declare(to_quanta({"GPU": 1})) == []
    sim.state.validate()
    assert sim.end("a") == ["b"]  # 1 GPU declared, b needs 1
    assert sim.state.declare(to_quanta({"GPU": 0.5})) == []
    sim.state.validate()
    sim.assign("c", GPU=0.5)
    assert sim.end("b") == ["c"]


def test_raising_the_declaration_starts_what_now_fits() -> None:
    sim = WorkerSim(nthreads=4, GPU=1)
    sim.assign("a", queued=False, GPU=1)
    sim.assign("b", GPU=1)
    started = sim.state.declare(to_quanta({"GPU": 2}))
    sim.state.validate()
    assert [a.key for a in started] == ["b"]


def test_fractional_leases_return_to_exactly_zero() -> None:
    sim = WorkerSim(nthreads=3, GPU=0.3)
    sim.assign("a", queued=False, GPU=0.1)
    sim.assign("b", queued=False, GPU=0.2)
    assert sim.assign("c", GPU=0.1) == []
    sim.end("a")
    sim.end("b")
    sim.end("c")
    assert sim.state.ledger.free == sim.state.ledger.declared
    assert sim.state.ledger.held == {}


def test_what_the_worker_refuses() -> None:
    state = WorkerState(to_quanta({"GPU": 1}), nthreads=1)
    never = state.assign(run("never", 1, GPU=2))
    assert isinstance(never, Refused) and never.report and "more than" in never.reason
    busy = state.assign(run("ok", 2, queued=False, GPU=1))
    assert busy is not None and not isinstance(busy, Refused)
    over = state.assign(run("over", 3, queued=False, GPU=1))
    assert isinstance(over, Refused) and over.report and "threads are busy" in over.reason
    again = state.assign(run("ok", 2, queued=False, GPU=1))
    assert isinstance(again, Refused) and not again.report  # a repeat: logged, not reported
    state.validate()


def test_a_lease_is_released_exactly_once() -> None:
    sim = WorkerSim(nthreads=1)
    sim.assign("a", queued=False)
    run_id = sim.run_id("a")
    sim.end("a")
    with pytest.raises(KeyError):
        sim.state.end(run_id)


def test_losing_the_scheduler_drops_the_queue_and_keeps_what_runs() -> None:
    sim = WorkerSim(nthreads=1)
    sim.assign("a", queued=False)
    sim.assign("b")
    sim.assign("c")
    assert [a.key for a in sim.state.drop_queue()] == ["b", "c"]
    sim.state.validate()
    assert sim.state.busy
    assert sim.end("a") == []
    assert not sim.state.busy


def test_validate_finds_a_queued_run_left_waiting_in_free_room() -> None:
    sim = WorkerSim(nthreads=1, R=1)
    sim.assign("a", queued=False, R=1)
    sim.assign("b", R=1)
    sim.state.ledger.release(sim.run_id("a"))  # a lease given back behind its back
    sim.state.running.discard(sim.run_id("a"))
    with pytest.raises(InvariantError, match="fits in what is free but waits"):
        sim.state.validate()
