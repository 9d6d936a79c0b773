"""Which workers have gone silent: heartbeats against a time-to-live.

A worker whose stream breaks is noticed at once; one that is frozen (SIGSTOP,
a hung host, a cut cable with no reset) keeps its TCP connection open and just
stops talking. Workers send something at least every ``ttl / 5`` seconds, so
one silent for ``ttl`` is declared lost.

Pure bookkeeping: the servicer passes the clock in. Time the scheduler itself
spent not listening (its event loop stalled on a huge batch, say) is not held
against the workers: their messages were waiting in its socket meanwhile.
"""

from __future__ import annotations

from .events import WorkerId

#: How many heartbeats fit in one time-to-live.
HEARTBEATS_PER_TTL = 5


class Liveness:
    def __init__(self, ttl: float) -> None:
        if not ttl > 0:
            raise ValueError(f"worker ttl must be > 0 seconds, not {ttl}")
        self.ttl = ttl
        self._last_heard: dict[WorkerId, float] = {}
        self._last_check: float | None = None

    @property
    def heartbeat_interval(self) -> float:
        return self.ttl / HEARTBEATS_PER_TTL

    def heard(self, worker_id: WorkerId, now: float) -> None:
        self._last_heard[worker_id] = now

    def forget(self, worker_id: WorkerId) -> None:
        self._last_heard.pop(worker_id, None)

    def expired(self, now: float, check_interval: float) -> list[WorkerId]:
        """Workers silent for longer than the ttl, as of ``now``.

        ``check_interval`` is how often the caller means to ask; a gap between
        two checks much longer than that is a stall of the scheduler, and is
        credited to every worker.
        """
        if self._last_check is not None:
            stall = now - self._last_check - 2 * check_interval
            if stall > 0:
                for worker_id in self._last_heard:
                    self._last_heard[worker_id] += stall
        self._last_check = now
        deadline = now - self.ttl
        return [w for w, heard in self._last_heard.items() if heard < deadline]
