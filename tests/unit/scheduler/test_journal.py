"""The write-ahead journal: what the state machine says goes in, and a restart
reads back exactly the tasks still known, in order, with who wants them; the
restarted scheduler holds placement back while workers offer what they kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from apportion_common.resources import to_quanta
from apportion_common.serialize import ErrorInfo
from scheduler_service.commands import (
    JOURNAL_COMMANDS,
    AssignTask,
    Command,
    NotifyClient,
    ReleaseData,
)
from scheduler_service.events import (
    ClientDisconnected,
    ClientJoined,
    Event,
    HeldResult,
    KeysReleased,
    StateRecovered,
    TaskErred,
    TaskFinished,
    TasksSubmitted,
    TaskSubmission,
    Tick,
    WorkerJoined,
)
from scheduler_service.journal import Journal, JournalError
from scheduler_service.policy import SchedulingPolicy
from scheduler_service.state import ERRED, MEMORY, PROCESSING, READY, ClusterState

BOOM = ErrorInfo("builtins.ValueError", "boom", "Traceback ...", b"\x80\x04pickled")


class JournaledState:
    """A state machine whose journal commands go to ``journal``, as the
    servicer routes them."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.state = ClusterState(incarnation_base=100)
        self.state.journaling = True

    def handle(self, event: Event) -> list[Command]:
        cmds = self.state.handle(event)
        for cmd in cmds:
            if isinstance(cmd, JOURNAL_COMMANDS):
                self.journal.record(cmd)
        self.journal.commit()
        self.state.validate()
        return cmds


def spec(key: str, *deps: str, gpu: float = 0, priority: int = 0) -> TaskSubmission:
    resources = to_quanta({"GPU": gpu}) if gpu else {}
    payload = f"payload-{key}".encode()
    return TaskSubmission(key, payload, resources, deps, priority, 2, ("w",), True)


def test_tasks_and_wants_survive_a_restart_in_submission_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    scheduler = JournaledState(journal)
    scheduler.handle(TasksSubmitted("c1", (spec("a", gpu=0.5, priority=3), spec("b", "a"))))
    scheduler.handle(TasksSubmitted("c2", (spec("b"), spec("c"))))
    scheduler.handle(KeysReleased("c2", ("c",)))  # forgotten: nobody wants it
    journal.close()

    recovered = Journal(tmp_path).load()
    assert [t.submission.key for t in recovered] == ["a", "b"]
    a, b = recovered
    assert a.submission == spec("a", gpu=0.5, priority=3)
    assert a.incarnation == scheduler.state.tasks["a"].incarnation
    assert a.wanted_by == ("c1",)
    assert set(b.wanted_by) == {"c1", "c2"}
    assert b.submission.dependencies == ("a",)


def test_final_errors_are_kept_not_run_again(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    scheduler = JournaledState(journal)
    scheduler.handle(TasksSubmitted("c1", (spec("a"), spec("b", "a"))))
    scheduler.handle(WorkerJoined(1, "w", "w:1", 1, {}))
    for _ in range(3):  # the first run and both retries fail
        scheduler.handle(TaskErred(1, "a", scheduler.state.tasks["a"].run_id, BOOM))
    assert scheduler.state.tasks["a"].state == ERRED
    journal.close()

    recovered = Journal(tmp_path).load()
    assert [t.error for t in recovered] == [BOOM, BOOM]
    restarted = ClusterState()
    restarted.handle(StateRecovered(recovered, 0.0))
    restarted.validate()
    assert restarted.tasks["a"].state == restarted.tasks["b"].state == ERRED
    assert restarted.tasks["a"].error == BOOM


def test_a_restart_holds_placement_then_reclaims_results_workers_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    scheduler = JournaledState(journal)
    scheduler.handle(WorkerJoined(1, "w", "w:1", 2, {}))
    scheduler.handle(TasksSubmitted("c1", (spec("a"), spec("b", "a"), spec("c"))))
    a = scheduler.state.tasks["a"]
    scheduler.handle(TaskFinished(1, "a", a.run_id, 11))
    assert a.state == MEMORY
    journal.close()

    policy = SchedulingPolicy(recovery_grace=3.0, client_grace=10.0)
    restarted = ClusterState(policy, incarnation_base=10_000)
    cmds = restarted.handle(StateRecovered(Journal(tmp_path).load(), 50.0))
    restarted.validate()
    assert not [c for c in cmds if isinstance(c, AssignTask)]  # held back
    # The worker comes back offering a's result, and a stale copy of c's.
    held = (HeldResult("a", a.incarnation, 11), HeldResult("c", 999, 5))
    cmds = restarted.handle(WorkerJoined(7, "w", "w:1", 2, {}, held))
    restarted.validate()
    assert restarted.tasks["a"].state == MEMORY and restarted.tasks["a"].nbytes == 11
    assert ReleaseData(7, "c") in cmds
    assert restarted.tasks["b"].state == READY  # its input is back: a is not recomputed
    assert not [c for c in cmds if isinstance(c, AssignTask)]
    restarted.handle(Tick(53.0))  # the hold ends
    restarted.validate()
    assert restarted.tasks["b"].state == PROCESSING
    assert restarted.tasks["c"].state == PROCESSING


def test_a_disconnected_client_keeps_its_tasks_for_its_grace_period() -> None:
    state = ClusterState(SchedulingPolicy(client_grace=5.0))
    state.handle(Tick(1.0))
    state.handle(ClientJoined("c1"))
    state.handle(TasksSubmitted("c1", (spec("a"),)))
    state.handle(ClientDisconnected("c1", 1.0))
    state.handle(Tick(5.9))
    assert "a" in state.tasks
    # Back in time: nothing is lost, and it is told where its task stands.
    cmds = state.handle(ClientJoined("c1", ("a", "never-heard-of")))
    told = sorted((c.key, c.status) for c in cmds if isinstance(c, NotifyClient))
    assert told == [("a", "pending"), ("never-heard-of", "error")]
    state.handle(ClientDisconnected("c1", 6.0))
    state.handle(Tick(10.9))
    assert "a" in state.tasks
    state.handle(Tick(11.0))
    state.validate()
    assert "a" not in state.tasks and "c1" not in state.clients


def test_an_unusable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalError, match="cannot keep a journal"):
        Journal(blocker / "state")
