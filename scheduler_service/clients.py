"""Clients: who wants which task, who is away, and what each is told.

:class:`Clients` owns the wants (``ClusterState.clients``: each client's keys,
and ``TaskRecord.wanted_by``, kept in step), the clients whose stream broke
and when their grace period ends, and the journal commands about wants. It
turns what a client asks (submit, cancel, release, come back, leave) into
changes of the graph, and answers with where each task stands.

It must never change a task's state or links itself (the graph does), nor
touch a worker's books.
"""

from __future__ import annotations

from collections.abc import Iterable

from apportion_common.serialize import ErrorInfo
from apportion_common.status import ErrorKind, TaskStatus

from .books import Books
from .commands import (
    Command,
    JournalForgetClient,
    JournalTask,
    JournalUnwant,
    JournalWant,
    NotifyClient,
)
from .events import (
    ClientDisconnected,
    ClientId,
    ClientJoined,
    StateRecovered,
    TasksCancelled,
    TasksForgotten,
    TasksSubmitted,
)
from .graph import Graph, post_order
from .policy import SchedulingPolicy
from .records import ERRED, MEMORY, RELEASED, WAITING, Clock, TaskRecord

#: The want that keeps fire-and-forget tasks until they end (no client sends
#: it: the wire refuses it as a client id).
FORGET: ClientId = "<fire-and-forget>"


def status_of(task: TaskRecord) -> TaskStatus:
    if task.state == MEMORY:
        return TaskStatus.FINISHED
    if task.state == ERRED:
        return TaskStatus.ERROR
    return TaskStatus.PENDING


class Clients:
    def __init__(self, policy: SchedulingPolicy, graph: Graph, books: Books, clock: Clock) -> None:
        self._policy = policy
        self._graph = graph
        self._tasks = graph.tasks
        self._books = books
        self._clock = clock
        #: emit journal commands (JournalTask, JournalWant...) for a state dir
        self.journaling = False
        #: each client's wanted keys
        self.wants: dict[ClientId, set[str]] = {}
        #: clients whose stream broke -> when their grace period ends
        self.disconnected: dict[ClientId, float] = {}

    # ------------------------------------------------------------ asking

    def submitted(self, event: TasksSubmitted, cmds: list[Command]) -> None:
        client = event.client_id
        wanted = self.wants.setdefault(client, set())
        tasks = self._tasks
        graph = self._graph
        for spec in event.tasks:
            task = tasks.get(spec.key)
            if task is None:
                task = graph.new_task(spec)
                task.wanted_by.add(client)
                wanted.add(spec.key)
                if self.journaling:
                    cmds.append(JournalTask(task.key, task.incarnation, client, spec))
                graph.enter(task, cmds)
                if task.state == WAITING:
                    self._warn_unknown_names(client, task, cmds)
            else:
                # Same key: the existing task's future comes back.
                if self.journaling and client not in task.wanted_by:
                    cmds.append(JournalWant(client, task.key))
                task.wanted_by.add(client)
                wanted.add(spec.key)
                if task.state == RELEASED:
                    graph.make_runnable(task, cmds)
                cmds.append(self._update_for(client, task))

    def forgotten(self, event: TasksForgotten, cmds: list[Command]) -> None:
        """Keep these tasks, wanted by FORGET, until they end (let_go)."""
        forgotten = self.wants.setdefault(FORGET, set())
        for key in event.keys:
            task = self._tasks.get(key)
            if task is None or task.state in (MEMORY, ERRED) or FORGET in task.wanted_by:
                continue  # gone, or done already: nothing to keep running
            if self.journaling:
                cmds.append(JournalWant(FORGET, key))
            task.wanted_by.add(FORGET)
            forgotten.add(key)

    def let_go(self, cmds: list[Command]) -> None:
        """Release FORGET's want of each task these commands say has ended
        (its result, unwanted, is released then): one look at the commands
        of an event, only while fire-and-forget tasks run."""
        ended = [
            cmd.key
            for cmd in cmds
            if isinstance(cmd, NotifyClient)
            and cmd.client_id == FORGET
            and cmd.status != TaskStatus.PENDING
        ]
        if ended:
            self.release(FORGET, ended, cmds)

    def _warn_unknown_names(self, client: ClientId, task: TaskRecord, cmds: list[Command]) -> None:
        """Tell at once of a resource no worker ever seen declares (a typo,
        often), even while the task still waits for its inputs. A queued
        task is told why it waits anyway (Graph.tell_why_waiting)."""
        seen = self._books.names_seen
        unknown = sorted(name for name in task.resources if name not in seen)
        if unknown:
            names = ", ".join(unknown)
            # "task 'k': " first, as every reason: clients log one per reason, not per task.
            reason = f"task {task.key!r}: needs {names}, which no worker seen so far declares"
            cmds.append(NotifyClient(client, task.key, TaskStatus.PENDING, waiting_reason=reason))

    def cancelled(self, event: TasksCancelled, cmds: list[Command]) -> None:
        for key in event.keys:
            task = self._tasks.get(key)
            if task is None:
                continue
            if task.wanted_by - {event.client_id}:
                # Other clients still want it: cancelling only releases it for
                # this one (as Dask's cancel without force=True).
                self.release(event.client_id, [key], cmds)
            else:
                self._cancel(task, cmds, event.client_id, frozenset(event.keys))

    def _cancel(
        self,
        task: TaskRecord,
        cmds: list[Command],
        requester: ClientId,
        named: frozenset[str],
    ) -> None:
        """Cancel ``task`` and everything that depends on it, for every client.

        The requester already marked the keys it ``named`` cancelled and is
        not told again: an answer arriving after it submitted one of those keys
        anew would be mistaken for the new task's fate.
        """
        tasks = self._tasks
        # Cancel the dependents first, then the task: each after all that
        # depend on it.
        for current in post_order(task, lambda current: [tasks[k] for k in current.dependents]):
            if tasks.get(current.key) is not current:
                continue  # forgotten while its dependents were cancelled
            for client in current.wanted_by:
                if not (client == requester and current.key in named):
                    cmds.append(NotifyClient(client, current.key, TaskStatus.CANCELLED))
                self.wants.get(client, set()).discard(current.key)
            current.wanted_by.clear()
            self._graph.forget(current, cmds)

    def cancel_everything(self, cmds: list[Command]) -> None:
        """Cancel every task any client wants (and so every task): each
        client hears that its futures are cancelled (client.restart())."""
        for wanted in list(self.wants.values()):
            for key in sorted(wanted):
                task = self._tasks.get(key)
                if task is not None:
                    self._cancel(task, cmds, "", frozenset())

    def release(self, client: ClientId, keys: Iterable[str], cmds: list[Command]) -> None:
        wanted = self.wants.get(client)
        for key in keys:
            if wanted is not None:
                wanted.discard(key)
            task = self._tasks.get(key)
            if task is None:
                continue
            if self.journaling and client in task.wanted_by:
                cmds.append(JournalUnwant(client, key))
            task.wanted_by.discard(client)
            self._graph.drop_if_unneeded(task, cmds)

    # ------------------------------------------------------ coming, going

    def joined(self, event: ClientJoined, cmds: list[Command]) -> None:
        """A new client, or one coming back within its grace period (or after
        a scheduler restart): tell it again where each task it waits for stands."""
        client = event.client_id
        self.disconnected.pop(client, None)
        wanted = self.wants.setdefault(client, set())
        for key in event.resume:
            task = self._tasks.get(key)
            if task is None:
                error = ErrorInfo(
                    "SchedulerConnectionError",
                    f"the scheduler no longer knows task {key!r}: it restarted without "
                    "--state-dir, or this client stayed away longer than its grace period",
                    kind=ErrorKind.SCHEDULER_CONNECTION,
                )
                cmds.append(NotifyClient(client, key, TaskStatus.ERROR, error=error))
                continue
            if client not in task.wanted_by:
                if self.journaling:
                    cmds.append(JournalWant(client, key))
                task.wanted_by.add(client)
                wanted.add(key)
                if task.state == RELEASED:
                    self._graph.make_runnable(task, cmds)
            cmds.append(self._update_for(client, task))

    def disconnected_at(self, event: ClientDisconnected) -> None:
        if event.client_id in self.wants:
            self.disconnected[event.client_id] = event.at + self._policy.client_grace

    def drop(self, client: ClientId, cmds: list[Command]) -> None:
        """The client is gone for good: what only it wanted is cancelled."""
        self.disconnected.pop(client, None)
        keys = self.wants.pop(client, None)
        if keys is None:
            return
        self.release(client, list(keys), cmds)
        if self.journaling:
            cmds.append(JournalForgetClient(client))

    def expire(self, cmds: list[Command]) -> None:
        """Drop the clients whose grace period ended by now."""
        if not self.disconnected:
            return
        now = self._clock.now
        gone = [c for c, deadline in self.disconnected.items() if deadline <= now]
        for client in gone:
            self.drop(client, cmds)

    def recovered(self, event: StateRecovered, cmds: list[Command]) -> None:
        """Rebuild the journal's tasks and who wants them after a restart.
        Every client has its grace period to reconnect."""
        tasks = self._tasks
        graph = self._graph
        grace_ends = event.now + self._policy.client_grace
        for recovered in event.tasks:
            spec = recovered.submission
            if spec.key in tasks:
                continue
            task = graph.new_task(spec)
            task.incarnation = recovered.incarnation
            for client in recovered.wanted_by:
                task.wanted_by.add(client)
                self.wants.setdefault(client, set()).add(spec.key)
                if client != FORGET:  # FORGET never reconnects: it is not away
                    self.disconnected.setdefault(client, grace_ends)
            if recovered.error is None:
                graph.enter(task, cmds)
            else:
                graph.enter_erred(task, recovered.error)
        for task in list(tasks.values()):
            graph.drop_if_unneeded(task, cmds)

    def _update_for(self, client: ClientId, task: TaskRecord) -> NotifyClient:
        status = status_of(task)
        if status == TaskStatus.FINISHED:
            workers = self._books.workers
            addresses = tuple(workers[w].address for w in sorted(task.who_has))
            return NotifyClient(client, task.key, status, addresses, task.nbytes)
        if status == TaskStatus.ERROR:
            return NotifyClient(client, task.key, status, error=task.error)
        return NotifyClient(client, task.key, status, waiting_reason=task.waiting_reason)
