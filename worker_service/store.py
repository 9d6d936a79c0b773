"""Results a worker keeps until the scheduler releases them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredResult:
    run_id: int  # the run that made it; 0 for a copy fetched from a peer
    data: bytes | bytearray


class ResultStore:
    def __init__(self) -> None:
        self._results: dict[str, StoredResult] = {}

    def put(self, key: str, run_id: int, data: bytes | bytearray) -> None:
        self._results[key] = StoredResult(run_id, data)

    def get(self, key: str) -> bytes | bytearray | None:
        stored = self._results.get(key)
        return None if stored is None else stored.data

    def release(self, key: str, run_id: int = 0) -> None:
        """Drop ``key``; with a ``run_id``, only if that run made what is stored."""
        stored = self._results.get(key)
        if stored is not None and (run_id == 0 or stored.run_id == run_id):
            del self._results[key]

    def clear(self) -> None:
        self._results.clear()
