"""The scheduler's state as JSON-ready dicts: ``/api/v1/state`` (shaped like
``Client.scheduler_info()``) and the dashboard page's snapshot. Pure reads.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from apportion_common.resources import from_quanta

from .activity import RunActivity
from .demand import REASON_TEXT, Waiting
from .logpages import worker_logs_path

if TYPE_CHECKING:
    from ..state import ClusterState

#: The most runs one snapshot carries for the task stream (the newest), as
#: Dask's task stream draws 1,000: the page parses and draws them each second.
MAX_STREAM_RUNS = 1_000


def state_info(state: ClusterState, address: str, dashboard_address: str) -> dict[str, Any]:
    """What ``Client.scheduler_info()`` returns, from the scheduler's own books."""
    snap = state.snapshot()
    return {
        "address": address,
        "dashboard_address": dashboard_address,
        "workers": {
            w.address: {
                "name": w.name,
                "nthreads": w.nthreads,
                "resources": from_quanta(w.resources),
                "resources_text": dict(w.resources_text),
                "used_resources": from_quanta(w.used),
                "running": w.running,
                "queued": w.queued,
                "draining": w.draining,
                "gpus": [
                    {
                        "id": g.id,
                        "index": g.index,
                        "uuid": g.uuid,
                        "name": g.name,
                        "memory": g.memory_bytes,
                        "tasks": list(w.gpu_use.get(g.id, ())),
                    }
                    for g in w.gpus
                ],
                "memory_limit": w.memory_limit,
                "memory": w.memory,
                "spilled_bytes": w.spilled_bytes,
                "paused": w.paused,
            }
            for w in snap.workers
        },
        "tasks": snap.task_counts,
    }


def worker_rows(state: ClusterState) -> list[dict[str, Any]]:
    """Each connected worker: threads busy of total, its process's memory of
    its limit and what it spilled, per resource what it declares, what
    running tasks hold and what its queued runs wait for, and where its log
    lines are."""
    rows = []
    for w in sorted(state.workers.values(), key=lambda w: w.worker_id):
        declared = from_quanta(w.declared)
        held = from_quanta(w.held())
        queued_for = from_quanta(w.queued_need)
        rows.append(
            {
                "id": w.worker_id,
                "name": w.name,
                "address": w.address,
                "threads": w.nthreads,
                "busy": w.nthreads - w.free_slots,
                "queued": len(w.queued),
                "state": "draining" if w.retiring else "paused" if w.paused else "running",
                "logs": worker_logs_path(w.worker_id),
                # The process's own memory (not the MEMORY resource), in bytes.
                "memory": {"used": w.memory, "limit": w.memory_limit, "spilled": w.spilled_bytes},
                "resources": {
                    name: {
                        "declared": amount,
                        "held": held.get(name, 0.0),
                        "queued": queued_for.get(name, 0.0),
                    }
                    for name, amount in sorted(declared.items())
                },
            }
        )
    return rows


def page_snapshot(
    state: ClusterState,
    activity: RunActivity,
    waits: Waiting,
    now: float,
    workers: list[dict[str, Any]],
) -> dict[str, Any]:
    """One update of the dashboard page; times are seconds before ``now``."""
    # The newest runs of every worker (the stream comes in worker order).
    stream = heapq.nlargest(MAX_STREAM_RUNS, activity.stream(now), key=lambda run: run.start)
    prefixes = sorted({run.prefix for run in stream} | set(waits.progress))
    index = {prefix: i for i, prefix in enumerate(prefixes)}
    return {
        "workers": workers,
        "waiting": [
            {
                "resources": group.resources,
                "reason": group.reason,
                "why": REASON_TEXT[group.reason],
                "detail": group.detail,
                "count": group.count,
            }
            for group in waits.groups
        ],
        "progress": waits.progress,
        "tasks": waits.task_counts,
        "tasks_per_second": round(activity.tasks_per_second(now), 2),
        "prefixes": prefixes,
        # [worker id, lane, prefix index, started (s ago), stopped (s ago, null: running), status]
        "stream": [
            [
                run.worker_id,
                run.lane,
                index[run.prefix],
                round(now - run.start, 3),
                None if run.stop is None else round(now - run.stop, 3),
                run.status,
            ]
            for run in stream
        ],
    }
