"""The scheduler's tunable rules, in one small value the state machine takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    #: Seconds a ready task may wait for capacity that a worker has in total,
    #: but not free, before that worker is reserved for it: smaller tasks stop
    #: being placed there until it starts (no starvation).
    starvation_after: float = 2.0
