"""Results a worker keeps until the scheduler releases them: in memory, or
spilled to its local disk when memory runs short (see :mod:`.memory`).

Spilling is transparent: :meth:`ResultStore.get` reads a spilled result back
(without keeping it in memory again: the point was to make room), for a peer,
a client or a task here alike. Results in memory are kept in the order they
were last stored or read, so the least recently used go to disk first, as in
Dask's worker. The loop, the task threads and the spilling thread share the
store, under one lock held only for bookkeeping: no file is written or read
while it is held.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apportion_common.serialize import Frames
from apportion_common.shm import Segment

from . import spill as files
from .spill import SpillDirectory

log = logging.getLogger("worker_service")


@dataclass(slots=True, eq=False)
class StoredResult:
    run_id: int  # the run that made it; 0 for a copy fetched from a peer
    #: the value (None while it is spilled)
    data: Frames | None
    #: the task incarnation that made it (0 for a fetched copy); see held()
    incarnation: int = 0
    #: the shared-memory segment peers on this host map it from, if it has one
    segment: Segment | None = None
    nbytes: int = 0
    #: the file it was spilled to (None: in memory)
    spilled: Path | None = None


class ResultStore:
    """Results by key. A result's segment (see :func:`apportion_common.shm.publish`)
    and its spill file are removed whenever the result leaves, however it leaves."""

    def __init__(self, spill_to: SpillDirectory | None = None) -> None:
        self._results: dict[str, StoredResult] = {}
        #: keys of the results in memory, least recently used first
        self._in_memory: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        #: one spill at a time: a result is never written twice at once
        self._spilling = threading.Lock()
        self._spill_to = spill_to
        #: bytes of the results held in memory (Dask's managed memory)
        self.managed = 0
        #: bytes of the results spilled to disk
        self.spilled_bytes = 0
        #: the last spill failed (a full disk): said once, not at every attempt
        self._spill_failed = False
        #: with ``on_over_target``: called after a put leaves more than this
        #: many bytes in memory (the monitor spills at once, not at its next sample)
        self.target: int | None = None
        self.on_over_target: Callable[[], None] | None = None

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
        stored = StoredResult(run_id, frames, incarnation, segment, frames.nbytes)
        with self._lock:
            replaced = self._results.get(key)
            if replaced is not None:
                self._forget(key, replaced)
            self._results[key] = stored
            self._in_memory[key] = None
            self.managed += stored.nbytes
            over = self.target is not None and self.managed > self.target
        if replaced is not None:
            _remove_files(replaced, keep=segment)
        if over and self.on_over_target is not None:
            self.on_over_target()

    def __contains__(self, key: str) -> bool:
        return key in self._results

    def get(self, key: str) -> Frames | None:
        """The result, read back from disk if it was spilled (None: not here)."""
        with self._lock:
            stored = self._results.get(key)
            if stored is None:
                return None
            if stored.data is not None:
                self._in_memory.move_to_end(key)
                return stored.data
            assert stored.spilled is not None
            try:
                # Opened under the lock: a release now removes the name, not the file.
                fd = files.open_spilled(stored.spilled)
            except OSError as exc:
                log.error("cannot read spilled result %r back: %s", key, exc)
                return None
        return files.read_spilled(fd)

    def nbytes(self, key: str) -> int | None:
        stored = self._results.get(key)
        return None if stored is None else stored.nbytes

    def open_spilled(self, key: str) -> int | None:
        """A descriptor on ``key``'s spill file, to stream it from disk a chunk
        at a time (the caller closes it); None if it is not spilled here."""
        with self._lock:
            stored = self._results.get(key)
            if stored is None or stored.spilled is None:
                return None
            try:
                return files.open_spilled(stored.spilled)
            except OSError as exc:
                log.error("cannot read spilled result %r back: %s", key, exc)
                return None

    def is_spilled(self, key: str) -> bool:
        """Whether getting ``key`` means reading a file (do it off the event loop)."""
        stored = self._results.get(key)
        return stored is not None and stored.data is None

    def segment(self, key: str) -> Segment | None:
        stored = self._results.get(key)
        return None if stored is None else stored.segment

    def release(self, key: str, run_id: int = 0) -> None:
        """Drop ``key``; with a ``run_id``, only if that run made what is stored."""
        with self._lock:
            stored = self._results.get(key)
            if stored is None or (run_id != 0 and stored.run_id != run_id):
                return
            del self._results[key]
            self._forget(key, stored)
        _remove_files(stored)

    def spill(self, nbytes: int) -> int:
        """Write results to disk, least recently used first, until ``nbytes``
        of memory are freed or none is left in memory; returns the bytes freed.
        Blocking: run it in a thread."""
        if self._spill_to is None:
            return 0
        freed = 0
        with self._spilling:
            while freed < nbytes:
                with self._lock:
                    key = next(iter(self._in_memory), None)
                    if key is None:
                        break
                    stored = self._results[key]
                data = stored.data
                assert data is not None
                try:
                    path = self._spill_to.write(data)
                except OSError as exc:
                    if not self._spill_failed:
                        log.error("cannot spill results to %s: %s", self._spill_to.parent, exc)
                    self._spill_failed = True
                    break
                self._spill_failed = False
                with self._lock:
                    if self._results.get(key) is not stored:
                        gone = True  # released or replaced while it was written
                    else:
                        gone = False
                        del self._in_memory[key]
                        stored.data, stored.spilled = None, path
                        self.managed -= stored.nbytes
                        self.spilled_bytes += stored.nbytes
                        segment, stored.segment = stored.segment, None
                if gone:
                    files.remove(path)
                    continue
                if segment is not None:
                    segment.remove()  # a peer on this host gets a new one if it asks
                freed += stored.nbytes
        return freed

    def keep_only_own(self) -> list[tuple[str, int, int]]:
        """After losing the scheduler: drop fetched copies (a peer holds the
        original) and return (key, incarnation, nbytes) of the results this
        worker made, for it to offer when it registers again."""
        with self._lock:
            dropped = [(k, r) for k, r in self._results.items() if not r.incarnation]
            for key, stored in dropped:
                del self._results[key]
                self._forget(key, stored)
            kept = [(k, r.incarnation, r.nbytes) for k, r in self._results.items()]
        for _, stored in dropped:
            _remove_files(stored)
        return kept

    def clear(self) -> None:
        with self._lock:
            results = list(self._results.values())
            self._results.clear()
            self._in_memory.clear()
            self.managed = self.spilled_bytes = 0
        for stored in results:
            _remove_files(stored)

    def _forget(self, key: str, stored: StoredResult) -> None:
        """(Holding the lock.) ``stored`` is no longer kept: off the books."""
        if stored.data is not None:
            self._in_memory.pop(key, None)
            self.managed -= stored.nbytes
        else:
            self.spilled_bytes -= stored.nbytes


def _remove_files(stored: StoredResult, keep: Segment | None = None) -> None:
    if stored.segment is not None and stored.segment != keep:
        stored.segment.remove()
    if stored.spilled is not None:
        files.remove(stored.spilled)
