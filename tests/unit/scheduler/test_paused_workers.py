"""Workers paused for memory: the scheduler places nothing more there (no
runs, no queued runs, no reservation) until they resume, and a task that only
they fit waits for them, as for a busy worker, rather than erring."""

from __future__ import annotations

import pytest

from scheduler_service.events import RetirementAsked, Tick, WorkerLeft, WorkerMemoryReported
from scheduler_service.state import PROCESSING, READY
from scheduler_service.validate import InvariantError
from tests.helpers.scheduler_sim import Sim, assigns


def memory(
    worker_id: int, paused: bool, used: int = 300_000_000, spilled: int = 0
) -> WorkerMemoryReported:
    return WorkerMemoryReported(worker_id, used, spilled, paused)


def test_a_paused_worker_gets_neither_runs_nor_queued_runs_until_it_resumes() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1)
    sim.join(2, nthreads=1)
    sim(memory(1, paused=True))
    for key in "abcd":
        sim.submit(key)
    assert sim.held_on(1) == [] and sim.queued_on(1) == []
    assert sim.held_on(2) == ["a"] and sim.queued_on(2) == ["b"]
    assert sim.status("c") == sim.status("d") == READY
    cmds = sim(memory(1, paused=False))
    assert {(a.key, a.worker_id, a.queued) for a in assigns(cmds)} == {
        ("c", 1, False),
        ("d", 1, True),
    }


def test_runs_it_held_before_pausing_carry_on_and_end_normally() -> None:
    sim = Sim(worker_queue=1)
    sim.join(1, nthreads=1)
    sim.submit("a")
    sim.submit("b")  # queued behind a
    sim(memory(1, paused=True))
    sim.finish("a")
    assert sim.queued_on(1) == ["b"]  # still there: the worker starts it when it resumes
    sim.submit("c")
    assert sim.status("c") == READY
    sim(memory(1, paused=False))
    sim.start("b")
    assert sim.queued_on(1) == ["c"]
    sim.finish("b")
    sim.start("c")
    sim.finish("c")
    sim.assert_idle()


def test_a_task_only_paused_workers_fit_waits_rather_than_erring() -> None:
    sim = Sim(no_worker_timeout=1.0)
    sim.join(1, nthreads=1, GPU=1)
    sim.join(2, nthreads=1)
    sim(memory(1, paused=True))
    sim.submit("gpu", GPU=1)
    sim(Tick(10.0))
    assert sim.status("gpu") == READY  # not NoValidWorkerError: w1 resumes
    assert "waits for w1 to resume: paused" in sim.state.explain("gpu")
    [run] = assigns(sim.join(3, nthreads=1, GPU=1))
    assert (run.key, run.worker_id) == ("gpu", 3)
    sim.submit("gpu-2", GPU=1)
    assert "paused for memory: w1" in sim.state.explain("gpu-2")  # w3 is busy
    [run] = assigns(sim(memory(1, paused=False)))
    assert (run.key, run.worker_id) == ("gpu-2", 1)


def test_a_paused_worker_loses_its_reservation_and_takes_none() -> None:
    sim = Sim(starvation_after=2.0)
    sim.join(1, nthreads=10, MEMORY=100)
    sim.join(2, nthreads=10, MEMORY=100)
    for i in range(10):
        sim.submit(f"small-{i}", MEMORY=20)
    sim.submit("big", MEMORY=70)
    sim(Tick(2.5))
    kept_on = sim.state.reservations["big"]
    other = 3 - kept_on
    sim(memory(kept_on, paused=True))
    # Kept for it now: the other worker, never the paused one.
    assert sim.state.reservations == {"big": other}
    assert sim.state.workers[kept_on].reserved_for is None
    for key in sorted(r.key for r in sim.runs.values() if r.worker_id == other)[:4]:
        sim.finish(key)
    big = sim.state.tasks["big"]
    assert big.state == PROCESSING and big.worker_id == other


def test_a_queued_run_on_a_paused_worker_takes_no_reservation() -> None:
    sim = Sim(worker_queue=2, starvation_after=2.0)
    sim.join(1, nthreads=2, GPU=2)
    sim.submit("s1", GPU=1)
    sim.submit("s2", GPU=1)
    sim.submit("big", GPU=2)
    sim.submit("small", GPU=1)
    sim.finish("s1")
    sim.start("small")  # assigned after big: big is overtaken
    sim(memory(1, paused=True))
    sim(Tick(10.0))
    assert sim.state.reservations == {}


def test_validate_finds_a_run_assigned_to_a_paused_worker() -> None:
    sim = Sim()
    sim.join(1, nthreads=2)
    sim(memory(1, paused=True))
    sim.submit("a")
    worker, task = sim.state.workers[1], sim.state.tasks["a"]
    # What placement must never do: give a paused worker a run.
    task.run_id = sim.state.books.assign(worker, task, False, 0.0)
    task.state, task.worker_id = PROCESSING, 1
    with pytest.raises(InvariantError, match="after it paused"):
        sim.state.validate()


def test_a_paused_worker_can_retire_and_leave() -> None:
    sim = Sim()
    sim.join(1, nthreads=1)
    sim.join(2, nthreads=1)
    sim(memory(1, paused=True))
    sim(RetirementAsked((1,)))
    assert 1 not in sim.state.books.paused and 1 not in sim.state.books.open
    sim(memory(1, paused=False))  # resuming does not reopen a retiring worker
    assert 1 not in sim.state.books.open
    sim(memory(2, paused=True))
    sim(WorkerLeft(2))
    assert sim.state.books.paused == {}


def test_memory_figures_show_in_the_snapshot() -> None:
    sim = Sim()
    sim.join(1, nthreads=1)
    sim(memory(1, paused=True, used=123, spilled=45))
    snap = sim.state.snapshot().workers[0]
    assert (snap.memory, snap.spilled_bytes, snap.paused) == (123, 45, True)
    sim(memory(1, paused=False, used=100, spilled=0))
    snap = sim.state.snapshot().workers[0]
    assert (snap.memory, snap.spilled_bytes, snap.paused) == (100, 0, False)
