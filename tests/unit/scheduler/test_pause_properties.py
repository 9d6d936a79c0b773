"""The random event sequences of ``test_state_properties``, with workers that
pause and resume for memory among them: ``validate()`` after every event
checks that nothing is assigned to a paused worker while it stays paused and
that none is kept for a starving task; here, that every assignment the
scheduler sends goes to a worker that is not paused, and that everything
still runs in the end."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

import tests.unit.scheduler.test_state_properties as base
from scheduler_service.commands import AssignTask, Command
from scheduler_service.events import WorkerMemoryReported


class PausingMachine(base.ClusterMachine):
    def check(self, cmd: Command) -> None:
        if isinstance(cmd, AssignTask):
            assert not self.state.workers[cmd.worker_id].paused, cmd
        super().check(cmd)

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), paused=st.booleans())
    def memory(self, data: st.DataObject, paused: bool) -> None:
        """A worker's memory crosses its pause fraction, or falls back below."""
        worker_id = data.draw(st.sampled_from(sorted(self.workers)))
        self.handle(WorkerMemoryReported(worker_id, 10**9, 0, paused))
        assert self.state.workers[worker_id].paused == paused


PausingMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPausingMachine = PausingMachine.TestCase
