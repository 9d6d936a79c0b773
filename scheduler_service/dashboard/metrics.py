"""Prometheus metrics of one scheduler, read from its state when scraped.

A custom collector on a registry of its own (tests run many schedulers in one
process): gauges are read from the books at scrape time, and the counters and
the histogram are the plain numbers :class:`~.activity.RunActivity` keeps, so
nothing is updated per task for Prometheus' sake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from apportion_common.resources import from_quanta

from ..records import TaskState
from .activity import DURATION_BUCKETS_S, RunActivity
from .demand import BUSY, UNPLACEABLE, waiting

if TYPE_CHECKING:
    from ..state import ClusterState

#: Every metric, with the one line the README shows.
METRICS = {
    "apportion_workers": "Workers connected.",
    "apportion_worker_threads": "Threads per worker.",
    "apportion_worker_threads_busy": "Threads running a task, per worker.",
    "apportion_worker_resource_declared": "What each worker declares, per resource.",
    "apportion_worker_resource_held": "What running tasks hold on each worker, per resource.",
    "apportion_worker_resource_queued": (
        "What the runs queued on each worker will need, per resource (held by none yet)."
    ),
    "apportion_worker_memory_bytes": (
        "Each worker process's resident memory (not the MEMORY resource)."
    ),
    "apportion_worker_memory_limit_bytes": "Each worker process's memory limit (0: none).",
    "apportion_worker_spilled_bytes": "Bytes of results each worker spilled to its disk.",
    "apportion_worker_paused": "1 where a worker is paused: its memory is past its pause fraction.",
    "apportion_pending_demand": (
        "What tasks waiting for placement need together, per resource, by reason: "
        "unplaceable (no worker offers it) or busy (every worker that fits is busy); "
        "tasks queued on a worker or waiting for inputs are not counted."
    ),
    "apportion_tasks": "Tasks by state.",
    "apportion_tasks_started": "Runs started, per key prefix.",
    "apportion_tasks_finished": "Runs finished, per key prefix.",
    "apportion_tasks_erred": "Runs whose task raised, per key prefix.",
    "apportion_task_duration_seconds": "How long tasks' code ran, per key prefix.",
    "apportion_transfer_bytes": "Result bytes moved between workers.",
    "apportion_event_loop_lag_seconds": "How late the scheduler's event loop woke lately.",
}


class SchedulerCollector(Collector):
    def __init__(
        self, state: ClusterState, activity: RunActivity, loop_lag: Callable[[], float]
    ) -> None:
        self._state = state
        self._activity = activity
        self._loop_lag = loop_lag

    def _gauge(self, name: str, labels: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, METRICS[name], labels=labels)

    def collect(self) -> Iterator[Metric]:
        state = self._state
        workers = sorted(state.workers.values(), key=lambda w: w.worker_id)
        count = self._gauge("apportion_workers")
        count.add_metric([], len(workers))
        yield count

        threads = self._gauge("apportion_worker_threads", ["worker"])
        busy = self._gauge("apportion_worker_threads_busy", ["worker"])
        declared = self._gauge("apportion_worker_resource_declared", ["worker", "resource"])
        held = self._gauge("apportion_worker_resource_held", ["worker", "resource"])
        queued = self._gauge("apportion_worker_resource_queued", ["worker", "resource"])
        for w in workers:
            threads.add_metric([w.name], w.nthreads)
            busy.add_metric([w.name], w.nthreads - w.free_slots)
            held_now = from_quanta(w.held())
            queued_for = from_quanta(w.queued_need)
            for name, amount in sorted(from_quanta(w.declared).items()):
                declared.add_metric([w.name, name], amount)
                held.add_metric([w.name, name], held_now.get(name, 0.0))
                queued.add_metric([w.name, name], queued_for.get(name, 0.0))
        yield from (threads, busy, declared, held, queued)

        memory = self._gauge("apportion_worker_memory_bytes", ["worker"])
        limit = self._gauge("apportion_worker_memory_limit_bytes", ["worker"])
        spilled = self._gauge("apportion_worker_spilled_bytes", ["worker"])
        paused = self._gauge("apportion_worker_paused", ["worker"])
        for w in workers:
            memory.add_metric([w.name], w.memory)
            limit.add_metric([w.name], w.memory_limit)
            spilled.add_metric([w.name], w.spilled_bytes)
            paused.add_metric([w.name], int(w.paused))
        yield from (memory, limit, spilled, paused)

        waits = waiting(state)
        demand = self._gauge("apportion_pending_demand", ["resource", "reason"])
        for reason in (UNPLACEABLE, BUSY):
            need = from_quanta(waits.demand[reason])
            # Every resource ever declared, at 0 when none is wanted: an
            # autoscaler's query finds a number, not an absent series.
            for name in sorted(state.books.names_seen | set(need)):
                demand.add_metric([name, reason], need.get(name, 0.0))
        yield demand

        tasks = self._gauge("apportion_tasks", ["state"])
        for st in TaskState:
            tasks.add_metric([st.value], waits.task_counts.get(st, 0))
        yield tasks

        activity = self._activity
        for name, counts in (
            ("apportion_tasks_started", activity.started),
            ("apportion_tasks_finished", activity.finished),
            ("apportion_tasks_erred", activity.erred),
        ):
            counter = CounterMetricFamily(name, METRICS[name], labels=["prefix"])
            for prefix, value in sorted(counts.items()):
                counter.add_metric([prefix], value)
            yield counter

        durations = HistogramMetricFamily(
            "apportion_task_duration_seconds",
            METRICS["apportion_task_duration_seconds"],
            labels=["prefix"],
        )
        for prefix, histogram in sorted(activity.durations.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(DURATION_BUCKETS_S, histogram.counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            durations.add_metric([prefix], buckets, histogram.total)
        yield durations

        moved = CounterMetricFamily("apportion_transfer_bytes", METRICS["apportion_transfer_bytes"])
        moved.add_metric([], activity.transfer_bytes)
        yield moved

        lag = self._gauge("apportion_event_loop_lag_seconds")
        lag.add_metric([], self._loop_lag())
        yield lag


def make_registry(
    state: ClusterState, activity: RunActivity, loop_lag: Callable[[], float]
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(state, activity, loop_lag))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)
