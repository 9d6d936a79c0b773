"""Results a worker keeps until the scheduler releases them."""

from __future__ import annotations

from dataclasses import dataclass

from apportion_common.serialize import Frames
from apportion_common.shm import Segment


@dataclass(frozen=True, slots=True)
class StoredResult:
    run_id: int  # the run that made it; 0 for a copy fetched from a peer
    data: Frames
    #: the task incarnation that made it (0 for a fetched copy); see held()
    incarnation: int = 0
    #: the shared-memory segment peers on this host map it from, if it has one
    segment: Segment | None = None


class ResultStore:
    """Results by key. A result's segment (see :func:`apportion_common.shm.publish`)
    is removed whenever the result leaves, however it leaves."""

    def __init__(self) -> None:
        self._results: dict[str, StoredResult] = {}

    def put(
        self,
        key: str,
        run_id: int,
        data: Frames | bytes | bytearray,
        incarnation: int = 0,
        segment: Segment | None = None,
    ) -> None:
        """Keep ``data``: a result's Frames, or a plain pickle (kept as it is)."""
        frames = data if isinstance(data, Frames) else Frames(bytes(data))
        replaced = self._results.get(key)
        self._results[key] = StoredResult(run_id, frames, incarnation, segment)
        if replaced is not None and replaced.segment not in (None, segment):
            replaced.segment.remove()

    def get(self, key: str) -> Frames | None:
        stored = self._results.get(key)
        return None if stored is None else stored.data

    def segment(self, key: str) -> Segment | None:
        stored = self._results.get(key)
        return None if stored is None else stored.segment

    def release(self, key: str, run_id: int = 0) -> None:
        """Drop ``key``; with a ``run_id``, only if that run made what is stored."""
        stored = self._results.get(key)
        if stored is not None and (run_id == 0 or stored.run_id == run_id):
            del self._results[key]
            _remove_segment(stored)

    def keep_only_own(self) -> list[tuple[str, int, int]]:
        """After losing the scheduler: drop fetched copies (a peer holds the
        original) and return (key, incarnation, nbytes) of the results this
        worker made, for it to offer when it registers again."""
        for stored in self._results.values():
            if not stored.incarnation:
                _remove_segment(stored)
        self._results = {k: r for k, r in self._results.items() if r.incarnation}
        return [(k, r.incarnation, len(r.data)) for k, r in self._results.items()]

    def clear(self) -> None:
        for stored in self._results.values():
            _remove_segment(stored)
        self._results.clear()


def _remove_segment(stored: StoredResult) -> None:
    if stored.segment is not None:
        stored.segment.remove()
