"""Random event sequences against the scheduler's state machine.

A hypothesis rule-based machine joins and loses workers, submits tasks with
random (also fractional) resource needs and dependencies on earlier keys,
reports the end of the runs it was given (finished, erred, missing inputs,
stale and duplicate reports), starts runs queued on a worker once that
worker's own books (modelled here) have room for them, cancels and releases keys, and lets clients
leave, lose their streams and come back (resuming keys), or outlive their
grace period; the scheduler itself restarts from what its journal would hold,
and its workers come back offering the results they kept. ``validate()`` runs
after every event, and the commands that come back are checked against what a
worker and a client could observe.

At the end one worker that declares enough of everything joins and every run
is completed until none is left: each task a client still wants must then be
finished or erred, and every lease back.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from apportion_common.resources import Quanta, to_quanta
from apportion_common.serialize import ErrorInfo
from scheduler_service.commands import (
    AssignTask,
    CancelRun,
    Command,
    DeclareResources,
    NotifyClient,
    ReleaseData,
)
from scheduler_service.events import (
    ClientDisconnected,
    ClientJoined,
    ClientLeft,
    Event,
    HeldResult,
    KeysReleased,
    RecoveredTask,
    StateRecovered,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TasksCancelled,
    TasksSubmitted,
    TaskStarted,
    TaskSubmission,
    Tick,
    WorkerJoined,
    WorkerLeft,
    WorkerResourcesChanged,
)
from scheduler_service.placement import fits, infeasibility_reason
from scheduler_service.policy import SchedulingPolicy
from scheduler_service.state import ERRED, MEMORY, READY, ClusterState

BOOM = ErrorInfo(type_name="RuntimeError", message="boom", traceback="", exception=b"")
NAMES = ("A", "B", "GPU")
CLIENTS = ("c1", "c2")
# Half share a kind ("k"), so measured durations deepen their queues; half are each their own.
KEYS = tuple(f"k-{i}" for i in range(5)) + tuple(f"j{i}" for i in range(5))
BIG = 100  # the final worker's amount of every resource

# The first value of each list is the one hypothesis tries most: plain tasks,
# workers with a unit of what they declare.
need_amounts = st.sampled_from([0.5, 1, 0.1, 0.2, 0.25, 0.3, 1.5, 2])
worker_amounts = st.sampled_from([2, 1, 0, 0.5, 0.3, 3])  # 0: not declared
needs = st.dictionaries(st.sampled_from(NAMES), need_amounts, max_size=2)
declared = st.fixed_dictionaries(dict.fromkeys(NAMES, worker_amounts))


def addr(worker_id: int) -> str:
    return f"w{worker_id}:1"


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = ClusterState()
        self.now = 0.0
        self.workers: set[int] = set()
        self.next_worker = 1
        #: runs given out whose end has not been reported, on live workers
        self.live: dict[int, AssignTask] = {}
        #: run ids the scheduler called off (they still report their end)
        self.cancelled: set[int] = set()
        #: runs whose end was reported, or whose worker was lost
        self.gone: list[AssignTask] = []
        #: (client, key) -> last status a client was told
        self.told: dict[tuple[str, str], str] = {}
        #: (client, key) -> the last update that client got
        self.last: dict[tuple[str, str], NotifyClient] = {}
        self.restarts = 0
        #: what each live worker declares, and its threads (the worker's own books)
        self.declared: dict[int, Quanta] = {}
        self.nthreads: dict[int, int] = {}
        #: queued runs the worker started (they hold resources there now)
        self.started: set[int] = set()

    @initialize(queue=st.sampled_from([None, 0, 1, 2]), starving=st.sampled_from([2.0, 0.3]))
    def policy(self, queue: int | None, starving: float) -> None:
        """Worker queues of one place per thread, none, or one or two places;
        starvation after 2 s or (so that reservations come often) 0.3 s."""
        self.state = ClusterState(SchedulingPolicy(worker_queue=queue, starvation_after=starving))

    def running_on(self, worker_id: int) -> list[AssignTask]:
        """The runs that hold resources on the worker itself."""
        return [
            run
            for run in self.live.values()
            if run.worker_id == worker_id and (not run.queued or run.run_id in self.started)
        ]

    def room_for(self, worker_id: int, need: Quanta) -> bool:
        """The worker's own books have a thread and the resources for ``need``."""
        running = self.running_on(worker_id)
        if len(running) >= self.nthreads[worker_id]:
            return False
        free = dict(self.declared[worker_id])
        for run in running:
            for name, amount in run.resources.items():
                free[name] = free.get(name, 0) - amount
        return fits(need, free)

    # ------------------------------------------------------------ plumbing

    def handle(self, event: Event) -> list[Command]:
        cmds = self.state.handle(event)
        self.state.validate()
        for cmd in cmds:
            self.check(cmd)
        self.check_waiting_reasons()
        return cmds

    def check_waiting_reasons(self) -> None:
        """A client of a queued task that no worker can hold was told why."""
        if self.state.clock.hold_until:
            return  # recovering: told once workers had their chance to return
        declared = [w.declared for w in self.state.workers.values()]
        for key, task in self.state.tasks.items():
            if task.state != READY or infeasibility_reason(task.resources, declared) is None:
                continue
            for client in task.wanted_by:
                last = self.last.get((client, key))
                assert last is not None and last.status == "pending", (client, key, last)
                assert last.waiting_reason, (client, key, last)

    def check(self, cmd: Command) -> None:
        match cmd:
            case AssignTask():
                assert cmd.worker_id in self.workers, cmd
                assert cmd.run_id not in self.live and cmd.run_id not in self.cancelled
                if cmd.queued:
                    # Something it can run once its running tasks end.
                    assert fits(cmd.resources, self.declared[cmd.worker_id]), cmd
                    worker = self.state.workers[cmd.worker_id]
                    assert cmd.run_id in worker.queued
                    assert len(worker.queued) <= worker.queue_limit
                else:
                    # Held at once: the worker has room for it right now.
                    assert self.room_for(cmd.worker_id, cmd.resources), cmd
                task = self.state.tasks[cmd.key]
                assert cmd.resources == task.resources
                # At most one run of a key that is not called off.
                others = [
                    r for r, a in self.live.items() if a.key == cmd.key and r not in self.cancelled
                ]
                assert not others, (cmd, others)
                for loc in cmd.inputs:
                    assert loc.addresses, cmd
                    assert {addr(w) for w in self.workers} >= set(loc.addresses), cmd
                self.live[cmd.run_id] = cmd
            case DeclareResources():
                # The worker's books change with the scheduler's, in order.
                self.declared[cmd.worker_id] = dict(cmd.resources)
            case CancelRun():
                run = self.live.get(cmd.run_id)
                assert run is not None and (run.worker_id, run.key) == (cmd.worker_id, cmd.key)
                assert cmd.run_id not in self.cancelled, "called off twice"
                self.cancelled.add(cmd.run_id)
            case ReleaseData():
                assert cmd.worker_id in self.workers, cmd
            case NotifyClient():
                previous = self.told.get((cmd.client_id, cmd.key))
                if cmd.status == "error":
                    assert previous != "finished", f"{cmd.key}: error after finished"
                if cmd.status == "finished":
                    assert cmd.addresses
                    assert {addr(w) for w in self.workers} >= set(cmd.addresses)
                self.told[(cmd.client_id, cmd.key)] = cmd.status
                self.last[(cmd.client_id, cmd.key)] = cmd

    def end(self, run: AssignTask) -> None:
        del self.live[run.run_id]
        self.cancelled.discard(run.run_id)
        self.started.discard(run.run_id)
        self.gone.append(run)

    def forget_told(self, client: str, keys: tuple[str, ...] | None = None) -> None:
        for told_client, key in list(self.told):
            if told_client == client and (keys is None or key in keys):
                del self.told[(told_client, key)]

    # -------------------------------------------------------------- workers

    # Hypothesis tries rules with fewer arguments first, so the rules that
    # build work up (join, submit, finish) take one argument and the rules
    # that tear it down take two.

    @precondition(lambda self: len(self.workers) < 4)
    @rule(data=st.data())
    def join(self, data: st.DataObject) -> None:
        nthreads = data.draw(st.integers(1, 3), label="nthreads")
        resources = data.draw(declared, label="resources")
        worker_id = self.next_worker
        self.next_worker += 1
        self.workers.add(worker_id)
        self.declared[worker_id] = to_quanta(resources)
        self.nthreads[worker_id] = nthreads
        self.handle(
            WorkerJoined(
                worker_id, f"w{worker_id}", addr(worker_id), nthreads, to_quanta(resources)
            )
        )

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), twice=st.booleans())
    def lose(self, data: st.DataObject, twice: bool) -> None:
        worker_id = data.draw(st.sampled_from(sorted(self.workers)))
        self.workers.discard(worker_id)
        for run in [r for r in self.live.values() if r.worker_id == worker_id]:
            self.end(run)
        suspects = {key: list(task.suspects) for key, task in self.state.tasks.items()}
        queued = {
            run.key
            for run_id, run in self.state.workers[worker_id].queued.items()
            if self.state.tasks.get(run.key) is not None
            and self.state.tasks[run.key].run_id == run_id
        }
        self.handle(WorkerLeft(worker_id))
        for key in queued:
            # It never ran there: the lost worker is no suspect of it.
            task = self.state.tasks.get(key)
            assert task is None or task.suspects == suspects[key], key
        if twice:
            assert self.handle(WorkerLeft(worker_id)) == []

    # -------------------------------------------------------------- clients

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(CLIENTS), label="client")
        # Inputs are keys that exist now; rarely any key, which may be unknown
        # (the task errs) or the task's own, released key.
        known = sorted(self.state.tasks)
        if data.draw(st.integers(0, 9), label="any inputs") == 9:
            dep_keys = st.lists(st.sampled_from(KEYS), max_size=2)
        elif known:
            dep_keys = st.lists(st.sampled_from(known), max_size=3)
        else:
            dep_keys = st.just([])
        specs = data.draw(
            st.lists(
                st.tuples(
                    st.sampled_from(KEYS),
                    needs,
                    dep_keys,
                    st.integers(-1, 1),
                    st.integers(0, 1),
                    # Restrictions: none; strict to the worker teardown adds
                    # (so it can still run); a mere preference for w1.
                    st.sampled_from([((), False), (("big",), False), (("w1",), True)]),
                ),
                min_size=1,
                max_size=3,
            ),
            label="(key, resources, dependencies, priority, retries, restriction)",
        )
        tasks = tuple(
            TaskSubmission(
                key,
                key.encode(),
                to_quanta(resources),
                tuple(deps),
                priority,
                retries,
                workers,
                loose,
            )
            for key, resources, deps, priority, retries, (workers, loose) in specs
        )
        self.handle(TasksSubmitted(client, tasks))

    @rule(data=st.data())
    def submit_burst(self, data: st.DataObject) -> None:
        """More tasks than workers have room for: their queues fill."""
        client = data.draw(st.sampled_from(CLIENTS), label="client")
        keys = data.draw(
            st.lists(st.sampled_from(KEYS), min_size=3, max_size=6, unique=True), label="keys"
        )
        resources = to_quanta(data.draw(needs, label="resources"))
        priorities = st.integers(-1, 1)
        tasks = tuple(
            TaskSubmission(key, key.encode(), resources, (), data.draw(priorities)) for key in keys
        )
        self.handle(TasksSubmitted(client, tasks))

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def change_capacity(self, data: st.DataObject) -> None:
        """An operator raises or lowers what a worker declares, mid-run."""
        worker_id = data.draw(st.sampled_from(sorted(self.workers)))
        resources = data.draw(declared, label="resources")
        cmds = self.handle(WorkerResourcesChanged(worker_id, to_quanta(resources)))
        assert any(isinstance(cmd, DeclareResources) for cmd in cmds)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.5, 12.0]))
    def tick(self, seconds: float) -> None:
        """Time passes: starving tasks get workers reserved, disconnected
        clients run out of grace, a recovery's hold ends."""
        self.now += seconds
        self.handle(Tick(self.now))
        for client in CLIENTS:
            if client not in self.state.clients:
                self.forget_told(client)

    @rule(data=st.data())
    def client_stream_breaks(self, data: st.DataObject) -> None:
        """A client's stream breaks; it may come back (resuming some keys,
        perhaps ones it never had) before its grace period ends."""
        client = data.draw(st.sampled_from(CLIENTS), label="client")
        self.handle(ClientDisconnected(client, self.now))
        if data.draw(st.booleans(), label="back"):
            resume = tuple(data.draw(st.lists(st.sampled_from(KEYS), max_size=3), label="resume"))
            for cmd in self.handle(ClientJoined(client, resume)):
                if isinstance(cmd, NotifyClient) and cmd.client_id == client:
                    assert cmd.key in resume or cmd.key in self.state.clients[client], cmd
            for key in resume:
                assert key not in self.state.tasks or client in self.state.tasks[key].wanted_by

    @rule(data=st.data())
    def scheduler_restarts(self, data: st.DataObject) -> None:
        """The scheduler dies and comes back with what its journal holds;
        its workers come back (as new ones) offering the results they kept,
        some of them stale (another incarnation of the key)."""
        old = self.state
        recovered = tuple(
            RecoveredTask(
                TaskSubmission(
                    t.key,
                    t.payload,
                    dict(t.resources),
                    t.dependencies,
                    t.priority,
                    t.retries_left,
                    tuple(sorted(t.allowed)),
                    t.loose,
                ),
                t.incarnation,
                tuple(sorted(t.wanted_by)),
                t.error if t.state == ERRED else None,
            )
            for t in sorted(old.tasks.values(), key=lambda t: t.seq)
        )
        stale = data.draw(st.booleans(), label="a stale held result")
        comeback = [
            (
                w,
                tuple(
                    HeldResult(k, old.tasks[k].incarnation + (1 if stale else 0), 7)
                    for k in sorted(w.has)
                ),
            )
            for w in old.workers.values()
        ]
        self.restarts += 1
        self.state = ClusterState(old.policy, incarnation_base=1_000_000 * self.restarts)
        for run in list(self.live.values()):
            self.end(run)
        self.workers.clear()
        self.told.clear()
        self.last.clear()
        self.handle(StateRecovered(recovered, self.now))
        for w, held in comeback:
            worker_id = self.next_worker
            self.next_worker += 1
            self.workers.add(worker_id)
            declared_now = dict(w.declared)
            self.declared[worker_id] = declared_now
            self.nthreads[worker_id] = w.nthreads
            self.handle(
                WorkerJoined(worker_id, w.name, addr(worker_id), w.nthreads, declared_now, held)
            )
        # The clients come back and name what they hold futures of.
        for client in CLIENTS:
            if client in self.state.clients:
                self.handle(ClientJoined(client, tuple(sorted(self.state.clients[client]))))

    @rule(data=st.data(), kind=st.sampled_from(["release", "cancel", "leave"]))
    def client_drops(self, data: st.DataObject, kind: str) -> None:
        """KeysReleased, TasksCancelled, or ClientLeft (and maybe back)."""
        client = data.draw(st.sampled_from(CLIENTS), label="client")
        if kind == "leave":
            self.forget_told(client)
            self.handle(ClientLeft(client))
            assert client not in self.state.clients
            if data.draw(st.booleans(), label="rejoin"):
                self.handle(ClientJoined(client))
            return
        keys = tuple(data.draw(st.lists(st.sampled_from(KEYS), max_size=3), label="keys"))
        if kind == "release":
            self.forget_told(client, keys)
            self.handle(KeysReleased(client, keys))
        else:
            # Keys other clients also want are only released for this one.
            shared = {
                key
                for key in keys
                if key in self.state.tasks and self.state.tasks[key].wanted_by - {client}
            }
            self.forget_told(client, keys)  # the canceller marks them itself
            cmds = self.handle(TasksCancelled(client, keys))
            for key in keys:
                if key in shared:
                    # Released for this client; gone for all if another named
                    # key it depends on was cancelled.
                    task = self.state.tasks.get(key)
                    assert task is None or client not in task.wanted_by
                else:
                    assert key not in self.state.tasks
            for cmd in cmds:
                if isinstance(cmd, NotifyClient):
                    assert cmd.status == "cancelled"
                    # The canceller is not told of the keys it named.
                    assert not (cmd.client_id == client and cmd.key in keys), cmd

    # ---------------------------------------------------------- run reports

    def _pick_run(self, data: st.DataObject) -> AssignTask:
        run_id = data.draw(st.sampled_from(sorted(self.live)))
        return self.live[run_id]

    def _startable(self) -> list[AssignTask]:
        return [
            run
            for run_id, run in sorted(self.live.items())
            if run.queued
            and run_id not in self.started
            and self.room_for(run.worker_id, run.resources)
        ]

    @precondition(lambda self: any(r.queued for r in self.live.values()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        """The worker starts a queued run its own books have room for."""
        startable = self._startable()
        if not startable:
            return
        run = data.draw(st.sampled_from(startable))
        self.started.add(run.run_id)
        self.handle(TaskStarted(run.worker_id, run.key, run.run_id))
        worker = self.state.workers[run.worker_id]
        assert run.run_id in worker.runs and run.run_id not in worker.queued

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        holding = sorted(r for r, a in self.live.items() if not a.queued or r in self.started)
        if holding and data.draw(st.booleans(), label="a run that holds resources"):
            run = self.live[data.draw(st.sampled_from(holding))]
        else:
            run = self._pick_run(data)
        nbytes = data.draw(st.integers(0, 1000), label="nbytes")
        fetched = (
            data.draw(st.lists(st.sampled_from(run.inputs), unique=True)) if run.inputs else []
        )
        # Durations size queues by kind: none measured, no-op, short, long.
        duration = data.draw(st.sampled_from([0.0, 1e-6, 0.001, 0.5]), label="duration")
        called_off = run.run_id in self.cancelled
        self.end(run)
        cmds = self.handle(
            TaskFinished(
                run.worker_id,
                run.key,
                run.run_id,
                nbytes,
                tuple((loc.key, loc.nbytes) for loc in fetched),
                b"",
                duration,
            )
        )
        if called_off:
            # Not the current run: its result is dropped by run id, so that a
            # newer result stored under the same key survives.
            assert ReleaseData(run.worker_id, run.key, run.run_id) in cmds
        else:
            task = self.state.tasks[run.key]
            held = task.state == MEMORY and run.worker_id in task.who_has
            assert held or ReleaseData(run.worker_id, run.key) in cmds
        if data.draw(st.integers(0, 3), label="the worker starts what now fits (0: not yet)"):
            # As a worker does when a run ends: its queued runs, in order,
            # the first that fits, reported after the end.
            while startable := [r for r in self._startable() if r.worker_id == run.worker_id]:
                self.started.add(startable[0].run_id)
                first = startable[0]
                self.handle(TaskStarted(first.worker_id, first.key, first.run_id))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), message=st.sampled_from(["boom", "bang"]))
    def fail(self, data: st.DataObject, message: str) -> None:
        run = self._pick_run(data)
        self.end(run)
        error = ErrorInfo("RuntimeError", message, "", b"")
        for cmd in self.handle(TaskErred(run.worker_id, run.key, run.run_id, error)):
            if isinstance(cmd, NotifyClient) and cmd.status == "error":
                assert cmd.error is not None
                if cmd.key == run.key:
                    assert cmd.error == error

    @precondition(lambda self: any(run.inputs for run in self.live.values()))
    @rule(data=st.data(), elsewhere=st.booleans())
    def missing_inputs(self, data: st.DataObject, elsewhere: bool) -> None:
        with_inputs = sorted(r for r, run in self.live.items() if run.inputs)
        run = self.live[data.draw(st.sampled_from(with_inputs))]
        locs = data.draw(st.lists(st.sampled_from(run.inputs), min_size=1, unique=True))
        # The address a fetch failed from: a holder the scheduler named, or
        # (rarely) one it did not, which must change nothing about holders.
        missing = tuple(
            (loc.key, addr(0) if elsewhere else data.draw(st.sampled_from(loc.addresses)))
            for loc in locs
        )
        self.end(run)
        self.handle(TaskMissingInputs(run.worker_id, run.key, run.run_id, missing))

    @precondition(lambda self: self.gone)
    @rule(data=st.data(), kind=st.sampled_from(["finished", "erred", "missing", "started"]))
    def stale_report(self, data: st.DataObject, kind: str) -> None:
        """A second report of an ended run, or a late one from a lost worker."""
        run = data.draw(st.sampled_from(self.gone))
        before = self.state.snapshot()
        event: Event
        if kind == "finished":
            event = TaskFinished(run.worker_id, run.key, run.run_id, 1)
        elif kind == "erred":
            event = TaskErred(run.worker_id, run.key, run.run_id, BOOM)
        elif kind == "started":
            event = TaskStarted(run.worker_id, run.key, run.run_id)
        else:
            event = TaskMissingInputs(run.worker_id, run.key, run.run_id, ())
        assert self.handle(event) == []
        assert self.state.snapshot() == before

    # -------------------------------------------------------------- the end

    def teardown(self) -> None:
        """Everything that can run eventually runs."""
        big: Quanta = to_quanta(dict.fromkeys(NAMES, BIG))
        if self.state.clock.hold_until:
            self.now = self.state.clock.hold_until
            self.handle(Tick(self.now))  # the recovery's hold ends
        worker_id = self.next_worker
        self.workers.add(worker_id)
        self.declared[worker_id] = big
        self.nthreads[worker_id] = 4
        self.handle(WorkerJoined(worker_id, "big", addr(worker_id), 4, big))
        for _ in range(200):
            if not self.live:
                break
            for run in sorted(self.live.values(), key=lambda r: r.run_id):
                self.end(run)
                self.handle(TaskFinished(run.worker_id, run.key, run.run_id, 10))
        assert not self.live, "runs keep coming"
        for key, task in self.state.tasks.items():
            if task.wanted_by:
                assert task.state in (MEMORY, ERRED), f"{key} stuck in {task.state}"
            for client in task.wanted_by:
                expected = "finished" if task.state == MEMORY else "error"
                assert self.told.get((client, key)) == expected, (client, key)
        for worker in self.state.workers.values():
            assert worker.runs == {}
            assert worker.queued == {}
            assert worker.free == worker.declared
            assert worker.free_slots == worker.nthreads


ClusterMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestClusterMachine = ClusterMachine.TestCase
