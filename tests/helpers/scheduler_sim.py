"""Drive the scheduler's pure state machine with plain events, checking its
books (``validate()``) after every one: :class:`Sim` and small builders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from apportion_common.resources import Quanta, from_quanta, to_quanta
from apportion_common.serialize import ErrorInfo
from scheduler_service.commands import AssignTask, Command, NotifyClient
from scheduler_service.events import (
    Event,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksSubmitted,
    TaskStarted,
    TaskSubmission,
    WorkerJoined,
    WorkerLeft,
)
from scheduler_service.policy import SchedulingPolicy
from scheduler_service.state import ClusterState

BOOM = ErrorInfo(type_name="ValueError", message="boom", traceback="tb", exception=b"")


def q(**amounts: float) -> Quanta:
    """Fixed-point amounts, names as written: ``q(GPU=0.5)``."""
    return to_quanta(amounts)


def addr(worker_id: int) -> str:
    return f"10.0.0.{worker_id}:7000"


def assigns(cmds: Iterable[Command]) -> list[AssignTask]:
    return [c for c in cmds if isinstance(c, AssignTask)]


def updates(cmds: Iterable[Command], key: str | None = None) -> list[NotifyClient]:
    return [c for c in cmds if isinstance(c, NotifyClient) and (key is None or c.key == key)]


class Sim:
    """A ClusterState plus the runs it started; validates after every event.

    ``Sim(worker_queue=1, ...)`` runs it under that SchedulingPolicy."""

    def __init__(self, **policy: Any) -> None:
        self.state = ClusterState(SchedulingPolicy(**policy))
        #: run_id -> the AssignTask that started it, until its end is reported
        self.runs: dict[int, AssignTask] = {}
        self.log: list[Command] = []

    def __call__(self, event: Event) -> list[Command]:
        cmds = self.state.handle(event)
        self.state.validate()
        self.log.extend(cmds)
        for cmd in assigns(cmds):
            assert cmd.run_id not in self.runs
            self.runs[cmd.run_id] = cmd
        if isinstance(event, WorkerLeft):
            for run_id in [r for r, a in self.runs.items() if a.worker_id == event.worker_id]:
                del self.runs[run_id]
        return cmds

    # ---------------------------------------------------------- events

    def join(
        self, worker_id: int, nthreads: int = 1, host_id: str = "", **resources: float
    ) -> list[Command]:
        return self(
            WorkerJoined(
                worker_id,
                f"w{worker_id}",
                addr(worker_id),
                nthreads,
                q(**resources),
                host_id=host_id,
            )
        )

    def submit(
        self,
        key: str,
        deps: tuple[str, ...] = (),
        client: str = "c",
        priority: int = 0,
        retries: int = 0,
        **resources: float,
    ) -> list[Command]:
        spec = TaskSubmission(key, key.encode(), q(**resources), deps, priority, retries)
        return self(TasksSubmitted(client, (spec,)))

    def run_of(self, key: str) -> AssignTask:
        """The one run of ``key`` that has not reported yet."""
        found = [a for a in self.runs.values() if a.key == key]
        assert len(found) == 1, f"{key}: runs {found}"
        return found[0]

    def finish(
        self,
        key: str | AssignTask,
        nbytes: int = 100,
        fetched: tuple[tuple[str, int], ...] = (),
        duration: float = 0.0,
    ) -> list[Command]:
        run = self.run_of(key) if isinstance(key, str) else key
        del self.runs[run.run_id]
        return self(
            TaskFinished(run.worker_id, run.key, run.run_id, nbytes, fetched, b"", duration)
        )

    def start(self, key: str) -> list[Command]:
        """The worker starts the queued run of ``key`` (and reports it)."""
        run = self.run_of(key)
        assert run.queued
        return self(TaskStarted(run.worker_id, run.key, run.run_id))

    def fail(self, key: str | AssignTask, error: ErrorInfo = BOOM) -> list[Command]:
        run = self.run_of(key) if isinstance(key, str) else key
        del self.runs[run.run_id]
        return self(TaskErred(run.worker_id, run.key, run.run_id, error))

    def missing(self, key: str, *missing: tuple[str, str]) -> list[Command]:
        run = self.run_of(key)
        del self.runs[run.run_id]
        return self(TaskMissingInputs(run.worker_id, run.key, run.run_id, missing))

    # ------------------------------------------------------- inspection

    def used(self, worker_id: int) -> dict[str, float]:
        return {k: v for k, v in from_quanta(self.state.workers[worker_id].held()).items() if v}

    def queued_on(self, worker_id: int) -> list[str]:
        """Keys queued on the worker, unstarted, in assignment order."""
        return [r.key for r in self.state.workers[worker_id].queued.values()]

    def held_on(self, worker_id: int) -> list[str]:
        """Keys whose runs hold resources on the worker."""
        return sorted(r.key for r in self.state.workers[worker_id].runs.values())

    def running_on(self, worker_id: int) -> list[str]:
        return sorted(a.key for a in self.runs.values() if a.worker_id == worker_id)

    def status(self, key: str) -> str:
        return self.state.tasks[key].state

    def assert_idle(self) -> None:
        """Every lease back: free equals declared exactly, all threads free."""
        for worker in self.state.workers.values():
            assert worker.runs == {}
            assert worker.free == worker.declared
            assert worker.free_slots == worker.nthreads
