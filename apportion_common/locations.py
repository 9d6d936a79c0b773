"""Where a result lives: what the scheduler tells a worker of each input a
run takes, in plain data on both sides of the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InputLocation:
    """Where an input's result lives (its holders' addresses), and how large it is."""

    key: str
    addresses: tuple[str, ...]
    nbytes: int
    #: per address: whether that holder shares the assignee's host (empty: none does)
    same_host: tuple[bool, ...] = ()
