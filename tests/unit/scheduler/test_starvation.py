"""No starvation: a task that waited longer than the bound for capacity a
worker has in total (but not free) gets that worker reserved, and smaller
tasks stop being placed there until it starts. So does a run queued on a
worker that keeps starting runs assigned after it. Time comes only from Tick."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apportion_common.resources import to_quanta
from scheduler_service.events import TasksCancelled, Tick, WorkerResourcesChanged
from scheduler_service.state import PROCESSING, READY, InvariantError
from tests.helpers.scheduler_sim import Sim, assigns, q


def busy_memory_worker(sim: Sim) -> None:
    """One worker with MEMORY=100 kept full by MEMORY=20 tasks."""
    sim.join(1, nthreads=10, MEMORY=100)
    for i in range(5):
        sim.submit(f"small-{i}", MEMORY=20)
    assert len(sim.runs) == 5


def test_big_task_starves_without_the_bound_passing() -> None:
    sim = Sim()
    busy_memory_worker(sim)
    sim.submit("big", MEMORY=70)
    # Small tasks keep arriving; each freed 20 goes to the next small one.
    for i in range(5, 15):
        sim.submit(f"small-{i}", MEMORY=20)
        sim.finish(f"small-{i - 5}")
        sim(Tick(1.9))  # waited 1.9 s < 2 s: no reservation yet
    assert sim.status("big") == READY
    assert sim.state.reservations == {}


def test_big_task_gets_the_worker_reserved_and_starts() -> None:
    sim = Sim()
    busy_memory_worker(sim)
    sim.submit("big", MEMORY=70)
    for i in range(5, 10):
        sim.submit(f"small-{i}", MEMORY=20)
    sim(Tick(2.5))  # the bound passed: the worker is kept for "big"
    assert sim.state.reservations == {"big": 1}
    assert sim.state.workers[1].reserved_for == "big"
    # Freed capacity no longer goes to small tasks...
    for i in range(3):
        cmds = sim.finish(f"small-{i}")
        assert assigns(cmds) == [], cmds
    # ...until there is room for the big one, which starts at once.
    cmds = sim.finish("small-3")
    assert [a.key for a in assigns(cmds)] == ["big"]
    assert sim.status("big") == PROCESSING
    # "big" gave its reservation up; the oldest small task, waiting as long,
    # now has the worker kept for it in turn.
    assert sim.state.reservations == {"small-5": 1}
    # Then small tasks flow again into what is left (100 - 70 - 20 = 10: none
    # fit until more finishes).
    cmds = sim.finish("small-4")
    assert [a.key for a in assigns(cmds)] == ["small-5"]
    sim.finish("big")
    running = sorted(a.key for a in sim.runs.values())
    assert running == ["small-5", "small-6", "small-7", "small-8", "small-9"]
    for key in running:
        sim.finish(key)
    sim.assert_idle()


def test_reservation_never_loosens_resources() -> None:
    sim = Sim()
    sim.join(1, nthreads=4, GPU=1)
    sim.submit("a", GPU=1)
    sim.submit("needs-two", GPU=2)  # no worker can ever hold it
    sim(Tick(10.0))
    assert sim.state.reservations == {}  # nothing to reserve: it fits nowhere
    sim.submit("b", GPU=1)
    sim.finish("a")
    assert sim.status("b") == PROCESSING


def test_reservation_is_dropped_when_its_task_is_cancelled_or_its_worker_leaves() -> None:
    sim = Sim()
    busy_memory_worker(sim)
    sim.join(2, nthreads=10, MEMORY=100)  # fills up with the queued small ones below
    for i in range(5, 10):
        sim.submit(f"small-{i}", MEMORY=20)
    sim.submit("big", MEMORY=70)
    sim.submit("small-10", MEMORY=20)
    sim(Tick(3.0))
    # Both waiting heads starved: each has one worker kept for it.
    assert set(sim.state.reservations) == {"big", "small-10"}
    kept = sim.state.reservations["big"]
    sim(TasksCancelled("c", ("big",)))
    # The stale reservation is dropped on the next placement pass.
    other = 2 if kept == 1 else 1
    sim.finish(sim.running_on(kept)[0])
    assert "big" not in sim.state.reservations
    assert sim.state.workers[kept].reserved_for is None
    # small-10 may start on any worker with room (the freed one, here); its
    # own reservation then lapses.
    assert sim.status("small-10") == PROCESSING
    assert sim.state.reservations == {}
    assert other in sim.state.workers
    for run in list(sim.runs.values()):
        sim.finish(run)
    sim.assert_idle()


# ------------------------------------------------------------- queued runs


def overtaken_big_run(sim: Sim) -> None:
    """A worker with MEMORY=100 runs "a" (60); "big" (70) is queued behind
    it, then "small" (20), which the worker starts first: it fits in what is
    free, and big does not."""
    sim.join(1, nthreads=4, MEMORY=100)
    sim.submit("a", MEMORY=60)
    sim.submit("big", MEMORY=70)
    sim.submit("small", MEMORY=20)
    assert sim.held_on(1) == ["a"] and sim.queued_on(1) == ["big", "small"]
    sim.start("small")  # assigned after big: big is overtaken


def test_an_overtaken_queued_run_gets_its_worker_reserved_until_it_starts() -> None:
    sim = Sim(worker_queue=2)
    overtaken_big_run(sim)
    sim(Tick(1.0))  # queued 1 s ago: not yet
    assert sim.state.reservations == {}
    sim(Tick(2.5))
    assert sim.state.reservations == {"big": 1}
    assert sim.state.workers[1].reserved_for == "big"
    assert "w1 is kept for it" in sim.state.explain("big")
    # Nothing else is queued there meanwhile, though its queue has a place.
    assert assigns(sim.submit("small-2", MEMORY=20)) == []
    assert sim.status("small-2") == READY
    assert assigns(sim.finish("a")) == []
    # The worker starts big as soon as it fits: the reservation goes, and
    # the worker is open to every task again, in the same pass.
    cmds = sim.start("big")
    assert sim.state.reservations == {}
    assert sim.state.workers[1].reserved_for is None
    [queued] = assigns(cmds)
    assert (queued.key, queued.worker_id, queued.queued) == ("small-2", 1, True)
    for key in ("small", "big", "small-2"):
        sim.finish(key)
    sim.assert_idle()


def test_a_queued_run_waiting_its_turn_gets_no_reservation() -> None:
    sim = Sim(worker_queue=2)
    sim.join(1, nthreads=4, MEMORY=100)
    sim.submit("a", MEMORY=90)
    sim.submit("first", MEMORY=20)
    sim.submit("big", MEMORY=70)
    assert sim.queued_on(1) == ["first", "big"]
    sim(Tick(10.0))  # long queued, but nothing assigned after it started
    assert sim.state.reservations == {}
    sim.finish("a")
    sim.start("first")  # assigned before big: its turn, not an overtaking
    sim(Tick(20.0))
    assert sim.state.reservations == {}
    assert sim.queued_on(1) == ["big"]


def test_a_queued_run_s_reservation_goes_when_it_is_cancelled() -> None:
    sim = Sim(worker_queue=2)
    overtaken_big_run(sim)
    sim(Tick(2.5))
    assert sim.state.reservations == {"big": 1}
    big = sim.run_of("big")
    sim(TasksCancelled("c", ("big",)))
    assert sim.state.reservations == {}
    assert sim.state.workers[1].reserved_for is None
    # Its place stays taken until the worker reports; the other place is
    # open to new tasks again.
    [queued] = assigns(sim.submit("small-2", MEMORY=20))
    assert (queued.worker_id, queued.queued) == (1, True)
    sim.fail(big)  # dropped unstarted
    for key in ("a", "small", "small-2"):
        sim.finish(key)
    sim.assert_idle()


@pytest.mark.parametrize("how", ["ends unseen", "placed again"])
def test_a_queued_run_s_reservation_goes_when_it_leaves_the_queue(how: str) -> None:
    sim = Sim(worker_queue=2)
    overtaken_big_run(sim)
    sim(Tick(2.5))
    assert sim.state.reservations == {"big": 1}
    if how == "ends unseen":
        sim.finish("big")  # it started and ended before its start was heard
    else:
        # The worker can no longer ever run it: called off, ready again.
        sim(WorkerResourcesChanged(1, to_quanta({"MEMORY": 60})))
        assert sim.status("big") == READY
    assert sim.state.reservations == {}
    assert sim.state.workers[1].reserved_for is None


def test_validate_checks_a_queued_run_s_reservation() -> None:
    sim = Sim(worker_queue=2)
    overtaken_big_run(sim)
    sim(Tick(2.5))
    big = sim.run_of("big")
    sim.state.books.start(1, big.run_id, "big")  # behind the placement pass's back
    with pytest.raises(InvariantError, match="no longer queued"):
        sim.state.validate()


@settings(max_examples=30, deadline=None)
@given(stream=st.lists(st.sampled_from([10, 20, 30]), min_size=20, max_size=30))
def test_a_worker_that_always_overtakes_still_starts_the_big_queued_run(
    stream: list[int],
) -> None:
    """Each second the worker ends its oldest run, then starts the newest
    queued runs that fit its own books, while a client keeps submitting small
    tasks: without the reservation, "big" (90 of 100) would never fit."""
    sim = Sim(worker_queue=2)
    sim.join(1, nthreads=4, MEMORY=100)
    for i in range(3):
        sim.submit(f"first-{i}", MEMORY=30)
    sim.submit("big", MEMORY=90)
    capacity = q(MEMORY=100)["MEMORY"]
    holding: list[int] = []  # run ids holding resources on the worker, oldest first
    big_started_at = None
    for second, size in enumerate(stream, start=1):
        holding += [r.run_id for r in sim.runs.values() if not r.queued and r.run_id not in holding]
        if holding:
            sim.finish(sim.runs[holding.pop(0)])
        held = sum(sim.runs[r].resources["MEMORY"] for r in holding)
        for run in sorted(sim.runs.values(), key=lambda r: -r.run_id):
            need = run.resources["MEMORY"]
            startable = run.queued and run.run_id not in holding and len(holding) < 4
            if startable and held + need <= capacity:
                sim.start(run.key)
                holding.append(run.run_id)
                held += need
                if run.key == "big":
                    big_started_at = second
        sim(Tick(float(second)))
        sim.submit(f"small-{second}", MEMORY=size)
    # Kept for it once it waited 2 s overtaken; started once the runs ahead ended.
    assert big_started_at is not None and big_started_at <= 10, big_started_at
