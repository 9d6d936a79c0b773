"""Retiring workers without losing work: drain, hand results over, let go.

A retiring worker takes nothing new (the books close it to work); its
running and queued runs finish there. Once it has none, each result it holds
that is still wanted and that no open worker holds is copied to an open
worker (:class:`ReplicateData`; the copy comes back as a
:class:`DataReplicated` event), and once none is left the worker is told to
exit (:class:`RetireWorker`): nothing is computed again. A copy that has not
arrived within :data:`REPLICATE_RETRY_S` is asked for again, of another
worker where there is one; with no open worker at all, the worker waits.
"""

from __future__ import annotations

from collections.abc import Callable

from apportion_common.locations import InputLocation

from .books import Books
from .commands import Command, ReplicateData, RetireWorker
from .events import WorkerId
from .records import MEMORY, Clock, TaskRecord, WorkerRecord

#: How long a copy may take before it is asked for again.
REPLICATE_RETRY_S = 10.0


class Retirements:
    def __init__(
        self,
        tasks: dict[str, TaskRecord],
        books: Books,
        clock: Clock,
        needs_data: Callable[[TaskRecord], bool],
    ) -> None:
        self._tasks = tasks
        self._books = books
        self._clock = clock
        #: whether a result is still wanted (by a client, or a dependent to run)
        self._needs_data = needs_data
        #: workers retiring and not yet gone
        self.retiring: set[WorkerId] = set()
        #: key -> (the worker asked to copy it, when)
        self._asked: dict[str, tuple[WorkerId, float]] = {}

    def ask(self, worker: WorkerRecord) -> bool:
        """Start retiring ``worker``; False if it already was."""
        if worker.retiring:
            return False
        self._books.close_to_work(worker)
        self.retiring.add(worker.worker_id)
        return True

    def left(self, worker_id: WorkerId) -> None:
        self.retiring.discard(worker_id)
        for key, (target, _) in list(self._asked.items()):
            if target == worker_id:
                del self._asked[key]  # asked again of another, next time round

    def acquired(self, keys: list[str]) -> None:
        for key in keys:
            self._asked.pop(key, None)

    def progress(self, cmds: list[Command]) -> None:
        """Hand over what drained workers hold; tell those with nothing left to exit."""
        if not self.retiring:
            return
        for worker_id in sorted(self.retiring):
            worker = self._books.workers.get(worker_id)
            if worker is None or worker.told_to_retire or worker.runs or worker.queued:
                continue
            wanted = self._held_only_by_retiring(worker)
            if not wanted:
                worker.told_to_retire = True
                cmds.append(RetireWorker(worker_id))
                continue
            for task in wanted:
                self._replicate(worker, task, cmds)

    def _held_only_by_retiring(self, worker: WorkerRecord) -> list[TaskRecord]:
        open_workers = self._books.open
        wanted = []
        for key in sorted(worker.has):
            task = self._tasks.get(key)
            if (
                task is not None
                and task.state == MEMORY
                and not any(h in open_workers for h in task.who_has)
                and self._needs_data(task)
            ):
                wanted.append(task)
        return wanted

    def _replicate(self, worker: WorkerRecord, task: TaskRecord, cmds: list[Command]) -> None:
        now = self._clock.now
        asked = self._asked.get(task.key)
        if asked is not None and now - asked[1] < REPLICATE_RETRY_S:
            return
        target = self._recipient(worker, avoid=asked[0] if asked is not None else None)
        if target is None:
            return  # no open worker yet: the result stays until one comes
        self._asked[task.key] = (target.worker_id, now)
        location = InputLocation(task.key, (worker.address,), task.nbytes)
        cmds.append(ReplicateData(target.worker_id, location))

    def _recipient(self, worker: WorkerRecord, avoid: WorkerId | None) -> WorkerRecord | None:
        """An open worker to copy to: on the same host first (shared memory),
        then the one holding fewest results; ``avoid`` (it did not answer)
        only if there is no other."""
        candidates = [w for w in self._books.open.values() if w.worker_id != avoid]
        if not candidates:
            candidates = list(self._books.open.values())
        if not candidates:
            return None
        host = worker.host_id
        return min(
            candidates,
            key=lambda w: (not host or w.host_id != host, len(w.has), w.worker_id),
        )
