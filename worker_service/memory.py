"""What a worker does about its memory, decided from two numbers: pure.

As Dask's worker does, against the process's memory limit (not the ``MEMORY``
resource, which is an amount tasks declare and the scheduler accounts):

- **target**: the results it holds (managed memory: their bytes) above this
  fraction of the limit go to disk, least recently used first;
- **spill**: the process's resident memory (RSS) above this fraction: results
  go to disk until it is back at the target;
- **pause**: RSS above this fraction: no new task starts here, and the
  scheduler places nothing more here, until it is below again;
- **terminate**: RSS above this fraction: the nanny kills the process and
  starts a fresh one (:func:`terminate_bytes`; the nanny measures it, as the
  worker itself may be too stuck to).

:class:`MemoryPolicy` reads no clock and touches no file or process: the
worker's monitor (:mod:`.monitor`) measures, asks it, and acts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemoryFractions:
    """Fractions of the memory limit (None: that threshold is off)."""

    target: float | None = 0.6
    spill: float | None = 0.7
    pause: float | None = 0.8
    terminate: float | None = 0.95


@dataclass(frozen=True, slots=True)
class MemoryAction:
    #: bytes of results to move to disk now, least recently used first (0: none)
    spill: int
    #: whether the worker is (now) paused
    paused: bool
    #: paused differs from the previous decision: tell the state machine and
    #: the scheduler
    pause_changed: bool


def _of(limit: int, fraction: float | None) -> int | None:
    return None if fraction is None or not limit else int(limit * fraction)


def terminate_bytes(limit: int, fractions: MemoryFractions) -> int | None:
    """Resident memory above which the nanny restarts the process (None: never)."""
    return _of(limit, fractions.terminate)


class MemoryPolicy:
    """The thresholds of one worker process with ``limit`` bytes (0: no limit,
    nothing is ever decided), and whether it is paused now."""

    def __init__(self, limit: int, fractions: MemoryFractions | None = None) -> None:
        self.limit = limit
        fractions = fractions or MemoryFractions()
        self.fractions = fractions
        #: held results above this many bytes go to disk (None: never for their size)
        self.target_bytes = _of(limit, fractions.target)
        #: resident memory above this starts spilling
        self.spill_bytes = _of(limit, fractions.spill)
        #: resident memory above this pauses the worker
        self.pause_bytes = _of(limit, fractions.pause)
        self.paused = False

    def decide(self, process: int, managed: int) -> MemoryAction:
        """Given the process's resident bytes and the bytes of results it holds
        in memory: how many bytes of results to spill, and whether to pause."""
        spill = 0
        if self.target_bytes is not None and managed > self.target_bytes:
            spill = managed - self.target_bytes
        if self.spill_bytes is not None and process > self.spill_bytes:
            # Down to the target, as Dask does: spilling only to just below
            # the spill threshold would cross it again at the next result.
            goal = self.target_bytes if self.target_bytes is not None else self.spill_bytes
            spill = max(spill, process - goal)
        spill = min(spill, managed)  # only results can go to disk
        paused = self.pause_bytes is not None and process > self.pause_bytes
        changed = paused != self.paused
        self.paused = paused
        return MemoryAction(spill, paused, changed)

    def over_target(self, managed: int) -> bool:
        """Results held past the target: spill now, not at the next sample."""
        return self.target_bytes is not None and managed > self.target_bytes
