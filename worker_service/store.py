"""Results a worker keeps until the scheduler releases them."""

from __future__ import annotations

from dataclasses import dataclass

from apportion_common.serialize import Frames


@dataclass(frozen=True, slots=True)
class StoredResult:
    run_id: int  # the run that made it; 0 for a copy fetched from a peer
    data: Frames
    #: the task incarnation that made it (0 for a fetched copy); see held()
    incarnation: int = 0


class ResultStore:
    def __init__(self) -> None:
        self._results: dict[str, StoredResult] = {}

    def put(
        self, key: str, run_id: int, data: Frames | bytes | bytearray, incarnation: int = 0
    ) -> None:
        """Keep ``data``: a result's Frames, or a plain pickle (kept as it is)."""
        frames = data if isinstance(data, Frames) else Frames(bytes(data))
        self._results[key] = StoredResult(run_id, frames, incarnation)

    def get(self, key: str) -> Frames | None:
        stored = self._results.get(key)
        return None if stored is None else stored.data

    def release(self, key: str, run_id: int = 0) -> None:
        """Drop ``key``; with a ``run_id``, only if that run made what is stored."""
        stored = self._results.get(key)
        if stored is not None and (run_id == 0 or stored.run_id == run_id):
            del self._results[key]

    def keep_only_own(self) -> list[tuple[str, int, int]]:
        """After losing the scheduler: drop fetched copies (a peer holds the
        original) and return (key, incarnation, nbytes) of the results this
        worker made, for it to offer when it registers again."""
        self._results = {k: r for k, r in self._results.items() if r.incarnation}
        return [(k, r.incarnation, len(r.data)) for k, r in self._results.items()]

    def clear(self) -> None:
        self._results.clear()
