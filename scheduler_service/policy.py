"""The scheduler's tunable rules, in one small value the state machine takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["spread", "pack"]

#: Queued runs per worker thread when SchedulingPolicy.worker_queue is None,
#: at least: one per thread hides too little of the round trip to pay for the
#: start reports it costs.
QUEUE_PER_THREAD = 2
#: With worker_queue None, a worker whose tasks are short gets a deeper queue:
#: enough to keep each thread busy this long, the time a refill takes to come
#: back under load (a worker's reports wait up to 1 ms to travel together, then
#: the scheduler's answer). At most QUEUE_MAX_PER_THREAD per thread: deeper
#: queues send bigger batches, but each worker idles between them.
QUEUE_TARGET_S = 0.005
QUEUE_MAX_PER_THREAD = 16
#: Weight of the newest run in a worker's mean task duration.
DURATION_WEIGHT = 0.2


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    #: Seconds a ready task may wait for capacity that a worker has in total,
    #: but not free, before that worker is reserved for it: smaller tasks stop
    #: being placed there until it starts (no starvation). So for a run queued
    #: on a worker that meanwhile started runs assigned after it.
    starvation_after: float = 2.0
    #: "spread" places each task on the least busy fitting worker; "pack" on
    #: the busiest, filling workers one by one so that whole ones stay free.
    placement: Placement = "spread"
    #: How many times a task may be running on a worker that dies before it
    #: errs with KilledWorker (instead of killing worker after worker).
    allowed_failures: int = 3
    #: Seconds a task that no connected worker could ever hold may wait before
    #: it errs with NoValidWorkerError; None waits for a fitting worker forever.
    no_worker_timeout: float | None = None
    #: Seconds a client that lost its stream has to come back before the tasks
    #: only it wanted are cancelled.
    client_grace: float = 10.0
    #: After a restart from the journal, seconds before anything is placed, so
    #: that reconnecting workers can offer the results they still hold.
    recovery_grace: float = 3.0
    #: Assigned runs each worker may hold queued, holding no resources yet, so
    #: that it starts the next one the moment one ends instead of waiting a
    #: round trip to the scheduler. None (what ``apportion scheduler`` uses
    #: unless told otherwise): per kind of task, about QUEUE_TARGET_S of its
    #: measured work per thread, from QUEUE_PER_THREAD up to
    #: QUEUE_MAX_PER_THREAD; N: N per worker, whatever the tasks; 0: no queue,
    #: a task is assigned only where it fits in what is free (the default
    #: here, so that a bare ClusterState places exactly as without queues).
    worker_queue: int | None = 0
