"""A worker's memory: the policy's decisions (pure), the monitor that acts on
them (with a fake measure), and the state machine's pause."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.worker_sim import WorkerSim
from worker_service.memory import MemoryFractions, MemoryPolicy, terminate_bytes
from worker_service.monitor import MemoryMonitor
from worker_service.spill import SpillDirectory
from worker_service.store import ResultStore
from worker_service.wire import Reports

MB = 1_000_000

# ------------------------------------------------------------------ policy


def test_held_results_past_the_target_spill_down_to_it() -> None:
    policy = MemoryPolicy(1000 * MB)  # target 600, spill 700, pause 800
    assert policy.decide(process=500 * MB, managed=600 * MB).spill == 0
    assert policy.decide(process=500 * MB, managed=650 * MB).spill == 50 * MB


def test_process_memory_past_spill_spills_until_back_at_the_target() -> None:
    policy = MemoryPolicy(1000 * MB)
    action = policy.decide(process=750 * MB, managed=300 * MB)
    assert action.spill == 150 * MB  # 750 down to 600
    assert not action.paused
    # Only results can go: never more than are held.
    assert policy.decide(process=790 * MB, managed=20 * MB).spill == 20 * MB


def test_past_pause_it_pauses_and_below_it_resumes() -> None:
    policy = MemoryPolicy(1000 * MB)
    action = policy.decide(process=810 * MB, managed=0)
    assert action.paused and action.pause_changed
    action = policy.decide(process=820 * MB, managed=0)
    assert action.paused and not action.pause_changed
    action = policy.decide(process=790 * MB, managed=0)
    assert not action.paused and action.pause_changed


def test_a_threshold_set_off_and_no_limit_decide_nothing() -> None:
    off = MemoryPolicy(1000 * MB, MemoryFractions(target=None, spill=None, pause=None))
    action = off.decide(process=990 * MB, managed=900 * MB)
    assert (action.spill, action.paused) == (0, False)
    none = MemoryPolicy(0)
    assert none.decide(process=10**12, managed=10**12).spill == 0
    assert not none.over_target(10**12)
    # Without a target, spilling past spill goes down to the spill threshold.
    spill_only = MemoryPolicy(1000 * MB, MemoryFractions(target=None))
    assert spill_only.decide(process=750 * MB, managed=500 * MB).spill == 50 * MB


def test_terminate_is_a_fraction_of_the_limit() -> None:
    assert terminate_bytes(1000 * MB, MemoryFractions()) == 950 * MB
    assert terminate_bytes(1000 * MB, MemoryFractions(terminate=None)) is None
    assert terminate_bytes(0, MemoryFractions()) is None


# ---------------------------------------------------------------- monitor


class Link:
    def __init__(self) -> None:
        self.reports = Reports()
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


async def test_the_monitor_spills_pauses_resumes_and_tells_the_scheduler(tmp_path: object) -> None:
    store = ResultStore(SpillDirectory(str(tmp_path)))
    resident = [100 * MB]
    pauses: list[bool] = []
    link = Link()
    monitor = MemoryMonitor(
        MemoryPolicy(1000 * MB), store, lambda: resident[0], pauses.append, link
    )
    assert store.target == 600 * MB
    for i in range(8):
        store.put(f"r{i}", i + 1, b"x" * 100)
    await monitor.check()
    assert link.reports.memory == (100 * MB, 0, False)  # the first round reports
    resident[0] = 850 * MB
    await monitor.check()
    assert pauses == [True]
    assert link.reports.memory == (850 * MB, 0, True) and link.woken == 1
    assert monitor.spilling is not None
    await monitor.spilling  # the held results went to disk
    assert store.managed == 0 and store.spilled_bytes > 0
    resident[0] = 300 * MB
    await monitor.check()
    assert pauses == [True, False] and link.reports.memory[2] is False
    link.reports = Reports()  # a new stream: tell it at once
    monitor.resend()
    assert link.reports.memory is not None and link.woken == 3


async def test_a_result_stored_past_the_target_wakes_the_monitor(tmp_path: object) -> None:
    store = ResultStore(SpillDirectory(str(tmp_path)))
    monitor = MemoryMonitor(
        MemoryPolicy(1000, MemoryFractions(target=0.5)), store, lambda: 0, print, Link()
    )
    running = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.01)
        store.put("big", 1, b"x" * 600)  # past 500 bytes: spilled at once, not at 0.1 s
        await asyncio.sleep(0.05)
        assert store.is_spilled("big") and store.managed == 0
        back = store.get("big")
        assert back is not None and back.pickled == b"x" * 600
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


# ----------------------------------------------------------- state machine


def test_a_paused_worker_starts_nothing_and_resuming_starts_what_waited() -> None:
    sim = WorkerSim(nthreads=2, R=2)
    assert sim.assign("a", queued=False, R=1) == ["a"]
    assert sim.state.pause(True) == []
    # Sent before the scheduler heard: a queued run waits in the queue even
    # though it fits; one sent into free capacity takes its lease and waits.
    assert sim.assign("q") == []
    assert sim.assign("direct", queued=False, R=1) == []
    assert sim.queued() == ["q"]
    assert [a.key for a in sim.state.pause_waiting] == ["direct"]
    assert sim.state.ledger.free == {"R": 0}  # held, as the scheduler counts it
    assert sim.end("a") == []  # room freed: still nothing starts
    started = sim.state.pause(False)
    sim.state.validate()
    assert [a.key for a in started] == ["direct", "q"]  # the one holding its lease first


def test_cancelling_a_run_that_waits_for_the_worker_to_resume_drops_it() -> None:
    sim = WorkerSim(nthreads=1, R=1)
    sim.state.pause(True)
    sim.assign("direct", queued=False, R=1)
    dropped = sim.state.cancel(sim.state.pause_waiting[0].run_id)
    sim.state.validate()
    assert dropped is not None and dropped.key == "direct"
    assert sim.state.ledger.free == {"R": 1_000_000_000} and not sim.state.running


def test_losing_the_scheduler_while_paused_drops_what_waited() -> None:
    sim = WorkerSim(nthreads=1, R=1)
    sim.state.pause(True)
    sim.assign("direct", queued=False, R=1)
    sim.assign("q", R=1)
    assert sorted(a.key for a in sim.state.drop_queue()) == ["direct", "q"]
    sim.state.validate()
    assert not sim.state.busy


@pytest.mark.parametrize("paused", [True, False])
def test_pausing_twice_changes_nothing(paused: bool) -> None:
    sim = WorkerSim(nthreads=1)
    sim.state.pause(paused)
    assert sim.state.pause(paused) == []
    assert sim.state.paused == paused
