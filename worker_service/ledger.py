"""The worker's own books: it never runs more than it declared.

Every lease a run holds here is taken by :meth:`Ledger.acquire` and given
back, exactly once, by :meth:`Ledger.release`; nothing else adds or
subtracts. Amounts are fixed point (:mod:`apportion_common.resources`), as
on the scheduler, so fractional leases return to exactly zero.

The scheduler only assigns what fits, so an assignment that does not fit here
means the two disagree; the worker refuses it rather than over-run.
"""

from __future__ import annotations

from apportion_common.resources import Quanta


class OverCommitted(RuntimeError):
    pass


class Ledger:
    def __init__(self, declared: Quanta, nthreads: int) -> None:
        self.declared: Quanta = dict(declared)
        self.nthreads = nthreads
        #: run id -> what it holds
        self.held: dict[int, Quanta] = {}
        #: declared minus held, per resource; below zero only after the
        #: operator lowered a declaration while runs held more
        self.free: Quanta = dict(declared)

    def fits(self, need: Quanta) -> bool:
        """A thread is free and the free amounts cover ``need``."""
        if len(self.held) >= self.nthreads:
            return False
        free = self.free
        # A plain loop: called for every queued run each time one ends.
        for name, amount in need.items():  # noqa: SIM110
            if free.get(name, 0) < amount:
                return False
        return True

    def could_ever_fit(self, need: Quanta) -> bool:
        """What is declared covers ``need`` (once every run has ended)."""
        declared = self.declared
        return all(declared.get(name, 0) >= amount for name, amount in need.items())

    def acquire(self, run_id: int, need: Quanta) -> None:
        if run_id in self.held:
            raise OverCommitted(f"run {run_id} already holds resources")
        if len(self.held) >= self.nthreads:
            raise OverCommitted(f"all {self.nthreads} threads are busy")
        free = self.free
        for name, amount in need.items():
            if free.get(name, 0) < amount:
                raise OverCommitted(f"{name}: {amount} wanted, {free.get(name, 0)} free")
        for name, amount in need.items():
            if amount:
                free[name] = free.get(name, 0) - amount
        self.held[run_id] = need

    def release(self, run_id: int) -> None:
        need = self.held.pop(run_id)  # KeyError here would mean a double release
        free = self.free
        for name, amount in need.items():
            if amount:
                free[name] = free.get(name, 0) + amount

    def declare(self, declared: Quanta) -> None:
        """The operator changed what this worker declares (set-resources).

        Runs already holding more than the new amounts finish; nothing new
        that needs those resources is admitted until they fit again."""
        self.declared = dict(declared)
        self.free = dict(declared)
        for need in self.held.values():
            for name, amount in need.items():
                if amount:
                    self.free[name] = self.free.get(name, 0) - amount

    def used(self) -> Quanta:
        used: Quanta = {}
        for need in self.held.values():
            for name, amount in need.items():
                used[name] = used.get(name, 0) + amount
        return used

    def validate(self) -> None:
        """free + held == declared for every resource, nothing held is negative,
        and no more runs hold leases than there are threads. (Holds may exceed a
        declaration lowered while they ran; acquire() refuses new ones that
        would not fit.)"""
        used = self.used()
        for name in set(used) | set(self.declared) | set(self.free):
            free, held = self.free.get(name, 0), used.get(name, 0)
            if held < 0:
                raise AssertionError(f"worker holds {name}={held}")
            if free + held != self.declared.get(name, 0):
                raise AssertionError(
                    f"{name}: free {free} + held {held} != declared {self.declared.get(name, 0)}"
                )
        if len(self.held) > self.nthreads:
            raise AssertionError(f"{len(self.held)} runs on {self.nthreads} threads")
