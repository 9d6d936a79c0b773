"""Shared-memory segments: a result handed to a worker process on the same host.

The holder writes a result's wire form (:class:`~apportion_common.frames.Frames`)
once into a new file under ``/dev/shm`` (what ``shm_open`` makes on Linux)
and names it to the peer; the peer opens it, removes the name, and rebuilds
the value: NumPy arrays and pandas columns over the segment mapped privately,
without a copy; ``bytes`` read into new objects, the one copy Python needs.
The memory goes back to the system when the last mapping goes, so a
segment's name lives only as long as a hand-off.

Names carry the holder's process id (``apportion-<pid>-<n>-<token>``): a
worker's nanny removes the names its dead child left behind, and every
worker, starting, removes those of processes that no longer exist.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .frames import HEAD_START_BYTES, Frames, Head

log = logging.getLogger("apportion_common")

SHM_DIR = Path("/dev/shm")
PREFIX = "apportion-"
_NAME = re.compile(r"apportion-(\d+)-\d+-[0-9a-f]{8}")
_counter = itertools.count(1)


class SharedMemoryUnavailable(OSError):
    """No segment could be made or mapped: hand the value over another way."""


def available() -> bool:
    """Whether this system has a ``/dev/shm`` this process may write to."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK)


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment this process made and named; :meth:`remove` drops the name."""

    name: str
    nbytes: int

    @classmethod
    def write(cls, frames: Frames) -> Segment:
        """A new segment holding ``frames``' wire form (one copy of each byte)."""
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot make {path}: {exc}") from None
        try:
            # write(), not a mapping: a full /dev/shm then says ENOSPC rather
            # than killing the process with SIGBUS.
            _write_all(fd, frames.segments())
        except OSError as exc:
            _unlink(path)
            raise SharedMemoryUnavailable(
                f"cannot write {frames.nbytes} bytes into {path}: {exc}"
            ) from None
        finally:
            os.close(fd)
        return cls(name, frames.nbytes)

    def remove(self) -> None:
        _unlink(SHM_DIR / self.name)


def read(name: str, nbytes: int) -> Frames:
    """The value in segment ``name`` (made by a peer); the name is removed.

    Read-only buffers (``bytes`` values) are read into new ``bytes``: the one
    copy Python needs. Writable ones (NumPy arrays, pandas columns) are views
    of the segment mapped privately, uncopied: the mapping keeps the memory
    while the value lives.
    """
    if not _NAME.fullmatch(name):
        raise SharedMemoryUnavailable(f"{name!r} is not an apportion segment name")
    path = SHM_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SharedMemoryUnavailable(f"cannot open {path}: {exc}") from None
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise SharedMemoryUnavailable(f"{path} holds {size} bytes, not the {nbytes} announced")
        return _frames_from(fd, size)
    except (OSError, ValueError) as exc:
        raise SharedMemoryUnavailable(f"cannot read {path}: {exc}") from None
    finally:
        os.close(fd)
        _unlink(path)


def _frames_from(fd: int, size: int) -> Frames:
    head_size = Head.size(os.pread(fd, HEAD_START_BYTES, 0))
    if not head_size:
        return Frames(_read_exactly(fd, size, 0))
    head = Head.read(_read_exactly(fd, head_size, 0))
    at = head_size + head.pickle_len
    if at + sum(n for n, _, _ in head.buffers) != size:
        raise ValueError(f"a framed value of {size} bytes whose header says otherwise")
    pickled = _read_exactly(fd, head.pickle_len, head_size)
    mapped: memoryview | None = None
    buffers: list[memoryview] = []
    for n, readonly, _ in head.buffers:
        if readonly:
            buffers.append(memoryview(_read_exactly(fd, n, at)))
        else:
            if mapped is None:
                # Private: a task that writes into an array it was handed
                # changes its own copy of the page, nobody else's.
                # Pages come in as the task touches them (populating them all
                # up front would copy each one, the mapping being writable).
                prot = mmap.PROT_READ | mmap.PROT_WRITE
                mapped = memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot))
            buffers.append(mapped[at : at + n])
        at += n
    return Frames(pickled, tuple(buffers), *head.flags())


def _read_exactly(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    # pread returns at most about 2 GiB at once: the rest in pieces.
    pieces = [data]
    got = len(data)
    while got < n:
        piece = os.pread(fd, n - got, offset + got)
        if not piece:
            raise ValueError(f"a segment cut short at {offset + got} bytes")
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _write_all(fd: int, segments: list[bytes | memoryview]) -> None:
    views = [memoryview(s).cast("B") for s in segments]
    while views:
        # writev takes at most IOV_MAX pieces and writes at most ~2 GiB at once.
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def remove_segments_of(pid: int) -> int:
    """Remove the names process ``pid`` left (it died or restarted); how many."""
    return _remove(lambda owner: owner == pid)


def remove_orphans() -> int:
    """Remove the names left by processes that no longer exist; how many."""
    return _remove(lambda owner: not _alive(owner))


def _remove(whose: Callable[[int], bool]) -> int:
    removed = 0
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return 0
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match and whose(int(match.group(1))):
            removed += _unlink(Path(entry.path))
    if removed:
        log.info("removed %d shared-memory segments left behind in %s", removed, SHM_DIR)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return 0
    return 1
