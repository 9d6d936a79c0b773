"""Heartbeats against a time-to-live, with the scheduler's own stalls forgiven."""

from __future__ import annotations

import pytest

from scheduler_service.liveness import HEARTBEATS_PER_TTL, Liveness


def checks(live: Liveness, start: float, end: float) -> list[int]:
    """Ask every 0.25 s from ``start`` to ``end`` (as the servicer's clock
    does); the workers found expired at the last check."""
    found: list[int] = []
    steps = round((end - start) / 0.25)
    for i in range(steps + 1):
        found = live.expired(start + i * 0.25, 0.25)
    return found


def test_a_silent_worker_expires_after_the_ttl() -> None:
    live = Liveness(ttl=2.0)
    assert live.heartbeat_interval == 2.0 / HEARTBEATS_PER_TTL
    live.heard(1, 0.0)
    live.heard(2, 0.0)
    assert checks(live, 0.0, 1.5) == []
    live.heard(2, 1.5)
    assert checks(live, 1.75, 2.25) == [1]
    live.forget(1)
    assert checks(live, 2.5, 3.25) == []
    assert checks(live, 3.5, 3.75) == [2]


def test_time_the_scheduler_did_not_listen_is_not_held_against_workers() -> None:
    live = Liveness(ttl=2.0)
    live.heard(1, 0.0)
    assert checks(live, 0.0, 1.0) == []
    # The scheduler's loop stalled for 10 s (a huge batch): the worker's
    # heartbeats are waiting in the socket, unread. It is not declared lost.
    assert live.expired(11.0, 0.25) == []
    # Silent 1 s before the stall, and 0.5 s of it (two check intervals) count.
    assert checks(live, 11.25, 11.25) == []
    assert checks(live, 11.5, 11.75) == [1]


def test_the_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Liveness(0)
