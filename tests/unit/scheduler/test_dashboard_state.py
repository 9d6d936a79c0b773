"""What the dashboard and /metrics read from the state machine: run counters,
the task stream's lanes, pending demand by reason, the Prometheus text."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from apportion_common.resources import from_quanta
from scheduler_service.commands import Command
from scheduler_service.dashboard.activity import (
    ERRED,
    LOST,
    MAX_PREFIXES,
    OK,
    OTHER_PREFIX,
    RunActivity,
)
from scheduler_service.dashboard.demand import BUSY, INPUTS, UNPLACEABLE, waiting
from scheduler_service.dashboard.feed import GONE_SHOWN_S, Feed
from scheduler_service.dashboard.metrics import exposition, make_registry
from scheduler_service.dashboard.view import MAX_STREAM_RUNS
from scheduler_service.events import (
    Event,
    RetirementAsked,
    TaskFinished,
    TaskStarted,
    WorkerLeft,
    WorkerMemoryReported,
)
from tests.helpers.scheduler_sim import Sim


class Watched(Sim):
    """A Sim whose every event and answer a RunActivity sees, at ``now``."""

    def __init__(self, **policy: Any) -> None:
        super().__init__(**policy)
        self.activity = RunActivity(self.state)
        self.now = 1000.0

    def __call__(self, event: Event) -> list[Command]:
        cmds = super().__call__(event)
        self.activity.observe((event,), cmds, self.now)
        return cmds


def samples(sim: Watched) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = exposition(make_registry(sim.state, sim.activity, lambda: 0.25)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_runs_are_counted_per_prefix_and_drawn_in_one_lane_per_thread() -> None:
    sim = Watched(worker_queue=0)
    sim.join(1, nthreads=2, GPU=2)
    for i in range(3):
        sim.submit(f"load-{i}", GPU=1)
    assert sim.activity.started == {"load": 2}
    lanes = {run.lane for run in sim.activity.stream(sim.now) if run.stop is None}
    assert lanes == {0, 1}

    sim.now += 2.0
    sim.finish("load-0", duration=0.5, fetched=(("x", 300),))
    assert sim.activity.finished == {"load": 1}
    assert sim.activity.transfer_bytes == 300
    assert sim.activity.durations["load"].counts[5] == 1  # 0.5 s: the bucket le=0.5
    assert sim.activity.started == {"load": 3}  # load-2 took the freed GPU
    stream = sim.activity.stream(sim.now)
    ended = [run for run in stream if run.stop is not None]
    assert [(run.status, run.stop - run.start) for run in ended] == [(OK, 0.5)]
    # load-2 started when load-0 ended: it takes the lane load-0 left.
    load_2 = next(run for run in stream if run.stop is None and run.start == sim.now)
    assert load_2.lane == ended[0].lane

    sim.now += 1.0
    sim.fail("load-1")
    assert sim.activity.erred == {"load": 1}
    assert sorted(r.status for r in sim.activity.stream(sim.now) if r.stop is not None) == [
        ERRED,
        OK,
    ]
    # Two runs ended in the second before now; the rate counts whole seconds.
    assert sim.activity.tasks_per_second(sim.now + 1.0) == 2 / 5


def test_a_queued_run_that_starts_and_ends_in_one_batch_counts_once() -> None:
    sim = Watched(worker_queue=2)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("a-1", GPU=1)
    sim.submit("a-2", GPU=1)
    queued = sim.run_of("a-2")
    assert queued.queued
    first = sim.run_of("a-1")
    del sim.runs[first.run_id]
    del sim.runs[queued.run_id]
    # The worker ran a-2 after a-1 and reports it all at once, ends first.
    batch: tuple[Event, ...] = (
        TaskFinished(1, "a-1", first.run_id, 10, duration=0.2),
        TaskFinished(1, "a-2", queued.run_id, 10, duration=0.1),
        TaskStarted(1, "a-2", queued.run_id),
    )
    cmds = sim.state.handle_all(batch)
    sim.activity.observe(batch, cmds, sim.now)
    assert sim.activity.started == {"a": 2}
    assert sim.activity.finished == {"a": 2}


def test_the_runs_of_a_lost_worker_end_as_lost() -> None:
    sim = Watched()
    sim.join(1, nthreads=1)
    sim.submit("x-1")
    sim.now += 1
    sim(WorkerLeft(1))
    assert [(r.prefix, r.status) for r in sim.activity.stream(sim.now)] == [("x", LOST)]


def test_unbounded_prefixes_fold_into_one() -> None:
    sim = Watched()
    sim.join(1, nthreads=1)
    for i in range(MAX_PREFIXES + 5):
        sim.submit(f"k{i}")
        sim.finish(f"k{i}")
    assert len(sim.activity.finished) == MAX_PREFIXES + 1
    assert sim.activity.finished[OTHER_PREFIX] == 5


def test_pending_demand_says_why_tasks_wait_and_leaves_out_queued_ones() -> None:
    sim = Watched(worker_queue=1)
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("gpu-1", GPU=1)  # runs
    sim.submit("gpu-2", GPU=1)  # queued on the worker: not pending demand
    sim.submit("gpu-3", GPU=1)  # ready, waits: busy
    sim.submit("tpu-1", TPU=2)  # no worker offers it
    sim.submit("after-1", ("gpu-3",), GPU=1)  # waits for its input
    waits = waiting(sim.state)
    demand = {reason: from_quanta(need) for reason, need in waits.demand.items()}
    assert demand == {BUSY: {"GPU": 1.0}, UNPLACEABLE: {"TPU": 2.0}}
    groups = {(g.reason, tuple(g.resources.items())): g for g in waits.groups}
    assert groups[(BUSY, (("GPU", 1.0),))].count == 1
    assert groups[(INPUTS, (("GPU", 1.0),))].count == 1
    never = groups[(UNPLACEABLE, (("TPU", 2.0),))]
    assert never.count == 1 and "no worker offers TPU=2" in never.detail
    assert waits.progress["gpu"] == {"done": 0, "erred": 0, "running": 2, "waiting": 1}

    seen = samples(sim)
    pending = "apportion_pending_demand"
    assert seen[(pending, frozenset({("resource", "GPU"), ("reason", BUSY)}))] == 1.0
    assert seen[(pending, frozenset({("resource", "TPU"), ("reason", UNPLACEABLE)}))] == 2.0
    assert seen[(pending, frozenset({("resource", "GPU"), ("reason", UNPLACEABLE)}))] == 0.0
    worker_gpu = frozenset({("worker", "w1"), ("resource", "GPU")})
    assert seen[("apportion_worker_resource_declared", worker_gpu)] == 1.0
    assert seen[("apportion_worker_resource_held", worker_gpu)] == 1.0
    assert seen[("apportion_worker_resource_queued", worker_gpu)] == 1.0
    assert seen[("apportion_tasks", frozenset({("state", "ready")}))] == 2.0
    assert seen[("apportion_workers", frozenset())] == 1.0
    assert seen[("apportion_event_loop_lag_seconds", frozenset())] == 0.25

    sim.now += 1
    sim.finish("gpu-1", duration=0.02)
    sim.start("gpu-2")  # the worker started it from its queue
    seen = samples(sim)
    prefix = frozenset({("prefix", "gpu")})
    assert seen[("apportion_tasks_finished_total", prefix)] == 1.0
    assert seen[("apportion_tasks_started_total", prefix)] == 2.0
    assert seen[("apportion_task_duration_seconds_count", prefix)] == 1.0
    assert seen[("apportion_task_duration_seconds_bucket", prefix | {("le", "0.05")})] == 1.0
    assert seen[("apportion_task_duration_seconds_bucket", prefix | {("le", "0.01")})] == 0.0


def test_the_page_shows_workers_that_left_as_lost_or_retired() -> None:
    sim = Watched()
    sim.join(1, nthreads=2, GPU=2)
    sim.join(2, nthreads=1)
    sim.submit("gpu-1", GPU=1)
    feed = Feed(sim.state, sim.activity, clock=lambda: sim.now)
    page = feed.build()
    rows = {row["name"]: row for row in page["workers"]}
    assert rows["w1"]["busy"] == 1 and rows["w1"]["threads"] == 2
    assert rows["w1"]["resources"] == {"GPU": {"declared": 2.0, "held": 1.0, "queued": 0.0}}
    assert {row["state"] for row in page["workers"]} == {"running"}
    assert page["stream"] == [[1, 0, page["prefixes"].index("gpu"), 0.0, None, "running"]]

    # The process's own memory, apart from the resources: no limit here, then a paused worker.
    assert rows["w2"]["memory"] == {"used": 0, "limit": 0, "spilled": 0}
    sim.state.workers[2].memory_limit = 400_000_000
    sim(WorkerMemoryReported(2, 350_000_000, 20_000_000, True))
    row = {row["name"]: row for row in feed.build()["workers"]}["w2"]
    assert row["memory"] == {"used": 350_000_000, "limit": 400_000_000, "spilled": 20_000_000}
    assert row["state"] == "paused"
    sim(WorkerMemoryReported(2, 100_000_000, 0, False))

    sim(RetirementAsked((2,)))
    assert {row["name"]: row["state"] for row in feed.build()["workers"]}["w2"] == "draining"
    sim(WorkerLeft(2))
    sim(WorkerLeft(1))
    sim.now += 1
    gone = {row["name"]: row["state"] for row in feed.build()["workers"]}
    assert gone == {"w1": "lost", "w2": "retired"}
    sim.now += GONE_SHOWN_S + 1
    assert feed.build()["workers"] == []


def test_the_page_carries_the_newest_runs_of_every_worker() -> None:
    sim = Watched(worker_queue=0)
    sim.join(1, nthreads=1, GPU=1)
    sim.join(2, nthreads=1, GPU=1)
    total = MAX_STREAM_RUNS + 200
    for i in range(0, total, 2):  # both workers busy, then both done, a second apart
        sim.submit(f"a-{i}", GPU=1)
        sim.submit(f"a-{i + 1}", GPU=1)
        sim.now += 0.01
        sim.finish(f"a-{i}", duration=0.01)
        sim.finish(f"a-{i + 1}", duration=0.01)
    stream = Feed(sim.state, sim.activity, clock=lambda: sim.now).build()["stream"]
    assert len(stream) == MAX_STREAM_RUNS
    assert {run[0] for run in stream} == {1, 2}  # not only the last worker's
    # The newest: the 200 oldest (started 5.01-6 s ago, a pair each 0.01 s) left out.
    assert max(run[3] for run in stream) <= 5.0 + 1e-6
