"""The worker's own books: it never runs more than it declared.

The scheduler only assigns what fits, so an assignment that does not fit here
means the two disagree; the worker refuses it rather than over-run. A queued
assignment (one that holds nothing yet) waits in the worker until
:meth:`Ledger.fits` says it has room.
"""

from __future__ import annotations

from collections.abc import Mapping

from apportion_common.resources import Quanta, to_quanta


class OverCommitted(RuntimeError):
    pass


class Ledger:
    def __init__(self, declared: Mapping[str, float], nthreads: int) -> None:
        self.declared: Quanta = to_quanta(declared)
        self.nthreads = nthreads
        self.held: dict[int, Quanta] = {}

    def fits(self, resources: Mapping[str, float]) -> bool:
        """A thread is free and the free amounts cover ``resources``."""
        if len(self.held) >= self.nthreads:
            return False
        used = self.used()
        declared = self.declared
        for name, amount in to_quanta(resources).items():
            if used.get(name, 0) + amount > declared.get(name, 0):
                return False
        return True

    def could_ever_fit(self, resources: Mapping[str, float]) -> bool:
        """What is declared covers ``resources`` (once every run has ended)."""
        declared = self.declared
        return all(declared.get(n, 0) >= a for n, a in to_quanta(resources).items())

    def acquire(self, run_id: int, resources: Mapping[str, float]) -> None:
        if run_id in self.held:
            raise OverCommitted(f"run {run_id} already holds resources")
        need = to_quanta(resources)
        if len(self.held) >= self.nthreads:
            raise OverCommitted(f"all {self.nthreads} threads are busy")
        used = self.used()
        for name, amount in need.items():
            if used.get(name, 0) + amount > self.declared.get(name, 0):
                free = self.declared.get(name, 0) - used.get(name, 0)
                raise OverCommitted(f"{name}: {amount} wanted, {free} free")
        self.held[run_id] = need

    def declare(self, declared: Mapping[str, float]) -> None:
        """The operator changed what this worker declares (set-resources).

        Runs already holding more than the new amounts finish; nothing new
        that needs those resources is admitted until they fit again."""
        self.declared = to_quanta(declared)

    def release(self, run_id: int) -> None:
        del self.held[run_id]  # KeyError here would mean a double release

    def used(self) -> Quanta:
        used: Quanta = {}
        for need in self.held.values():
            for name, amount in need.items():
                used[name] = used.get(name, 0) + amount
        return used

    def validate(self) -> None:
        """Every hold is non-negative and the thread bound holds. (Holds may
        exceed a declaration lowered while they ran; acquire() refuses new
        ones that would not fit.)"""
        used = self.used()
        for name, amount in used.items():
            if amount < 0:
                raise AssertionError(
                    f"worker holds {name}={amount} of {self.declared.get(name, 0)}"
                )
        if len(self.held) > self.nthreads:
            raise AssertionError(f"{len(self.held)} runs on {self.nthreads} threads")
