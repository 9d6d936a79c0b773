"""No starvation: a task that waited longer than the bound for capacity a
worker has in total (but not free) gets that worker reserved, and smaller
tasks stop being placed there until it starts. Time comes only from Tick."""

from __future__ import annotations

from scheduler_service.events import Tick
from scheduler_service.state import PROCESSING, READY
from tests.helpers.scheduler_sim import Sim, assigns


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
    from scheduler_service.events import TasksCancelled

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
