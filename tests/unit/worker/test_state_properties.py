"""The worker's state machine under random stimuli (hypothesis): after every
one, ``validate()`` holds (books balance, threads bound, a queued run that fits
never waits), nothing is over-committed except after the operator lowered a
declaration, and every run assigned is accounted for exactly once: running,
queued, refused, dropped or ended. While the worker is paused for memory
nothing starts; resuming starts what waited."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from apportion_common.resources import to_quanta
from tests.helpers.worker_sim import run
from worker_service.state import Refused, WorkerState

NAMES = ["GPU", "MEMORY"]
AMOUNTS = st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0, 2.0])
NEEDS = st.dictionaries(st.sampled_from(NAMES), AMOUNTS, max_size=2)


class WorkerMachine(RuleBasedStateMachine):
    @initialize(
        nthreads=st.integers(1, 3),
        declared=st.dictionaries(st.sampled_from(NAMES), st.sampled_from([0.5, 1.0, 2.0])),
    )
    def start(self, nthreads: int, declared: dict[str, float]) -> None:
        self.state = WorkerState(to_quanta(declared), nthreads)
        self.next_run = 1
        #: run ids still assigned here (running or queued), and those settled
        self.live: set[int] = set()
        self.settled: set[int] = set()
        #: the operator lowered a declaration below what runs held
        self.lowered = False

    def _started(self, run_ids: list[int]) -> None:
        for run_id in run_ids:
            assert run_id in self.live and run_id in self.state.running

    @rule(need=NEEDS, queued=st.booleans(), priority=st.integers(-2, 2), depth=st.integers(0, 3))
    def assign(self, need: dict[str, float], queued: bool, priority: int, depth: int) -> None:
        run_id, self.next_run = self.next_run, self.next_run + 1
        admitted = self.state.assign(
            run(f"k{run_id}", run_id, queued=queued, priority=priority, depth=depth, **need)
        )
        if isinstance(admitted, Refused):
            self.settled.add(run_id)
        else:
            self.live.add(run_id)
            assert admitted is None or not self.state.paused, "a run started while paused"

    def _executing(self) -> list[int]:
        """Runs whose code runs: holding a lease, not waiting for the worker to resume."""
        return sorted(self.state.running - {a.run_id for a in self.state.pause_waiting})

    @precondition(lambda self: bool(self._executing()))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        run_id = data.draw(st.sampled_from(self._executing()))
        ended = self.state.end(run_id)
        assert not (ended.started and self.state.paused), "a run started while paused"
        self.live.discard(run_id)
        self.settled.add(run_id)
        self._started([a.run_id for a in ended.started])

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        run_id = data.draw(st.sampled_from(sorted(self.live)))
        dropped = self.state.cancel(run_id)
        if dropped is not None:
            self.live.discard(run_id)
            self.settled.add(run_id)

    @rule(declared=st.dictionaries(st.sampled_from(NAMES), st.sampled_from([0.0, 0.5, 1.0, 3.0])))
    def declare(self, declared: dict[str, float]) -> None:
        self._started([a.run_id for a in self.state.declare(to_quanta(declared))])
        if any(amount < 0 for amount in self.state.ledger.free.values()):
            self.lowered = True

    @rule(paused=st.booleans())
    def pause(self, paused: bool) -> None:
        """Memory past the pause fraction, or back below it."""
        started = self.state.pause(paused)
        assert not (started and paused)
        self._started([a.run_id for a in started])

    @rule()
    def lose_the_scheduler(self) -> None:
        for a in self.state.drop_queue():
            self.live.discard(a.run_id)
            self.settled.add(a.run_id)

    @invariant()
    def books_hold(self) -> None:
        if not hasattr(self, "state"):
            return
        self.state.validate()
        if not self.lowered:
            assert all(amount >= 0 for amount in self.state.ledger.free.values())
        assert len(self.state.running) <= self.state.ledger.nthreads
        assert self.live == self.state.running | self.state.queue.keys()
        assert not (self.live & self.settled)


WorkerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestWorkerMachine = WorkerMachine.TestCase
