"""Drive the worker's pure state machine step by step, checking it
(``validate()``) after every stimulus: :class:`WorkerSim` and small builders."""

from __future__ import annotations

from apportion_common.resources import to_quanta
from worker_service.assignment import Assignment
from worker_service.state import Ended, Refused, WorkerState


def run(
    key: str,
    run_id: int,
    *,
    queued: bool = True,
    priority: int = 0,
    depth: int = 0,
    **resources: float,
) -> Assignment:
    """An assignment of ``key`` needing ``resources`` (queued unless told)."""
    return Assignment(
        key=key,
        run_id=run_id,
        payload=b"",
        resources=dict(resources),
        need=to_quanta(resources),
        inputs=(),
        queued=queued,
        priority=priority,
        depth=depth,
    )


class WorkerSim:
    """A WorkerState plus the keys it is executing; validates after every step."""

    def __init__(self, nthreads: int = 1, gpus: tuple[str, ...] = (), **declared: float) -> None:
        self.state = WorkerState(to_quanta(declared), nthreads, gpus)
        #: key -> run id of the runs holding a lease, in the order they started
        self.executing: dict[str, int] = {}
        #: key -> its assignment (its GPUs once it has some)
        self.assignments: dict[str, Assignment] = {}
        self._run_ids = iter(range(1, 1_000_000))

    def assign(
        self, key: str, *, queued: bool = True, priority: int = 0, depth: int = 0, **res: float
    ) -> list[str]:
        """Assign ``key``; the keys that started because of it."""
        a = run(key, next(self._run_ids), queued=queued, priority=priority, depth=depth, **res)
        self.assignments[key] = a
        admitted = self.state.assign(a)
        self.state.validate()
        assert not isinstance(admitted, Refused), admitted
        if admitted is None:
            return []
        self.executing[key] = admitted.run_id
        return [key]

    def end(self, key: str) -> list[str]:
        """``key``'s code returned; the keys that started in the room it freed."""
        ended = self.end_run(key)
        return [a.key for a in ended.started]

    def end_run(self, key: str) -> Ended:
        ended = self.state.end(self.executing.pop(key))
        self.state.validate()
        for a in ended.started:
            self.executing[a.key] = a.run_id
        return ended

    def gpus(self, key: str) -> tuple[str, ...]:
        """The GPUs ``key``'s run was given (none yet: ``()``)."""
        return self.assignments[key].gpus

    def queued(self) -> list[str]:
        return [a.key for a in self.state.queued_in_order()]

    def run_id(self, key: str) -> int:
        if key in self.executing:
            return self.executing[key]
        return next(a.run_id for a in self.state.queued_in_order() if a.key == key)
