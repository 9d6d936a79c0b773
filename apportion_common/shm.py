"""Shared-memory segments: a result handed to a worker process on the same host.

The holder writes a result's wire form (:class:`~apportion_common.frames.Frames`)
once into a new file under ``/dev/shm`` (what ``shm_open`` makes on Linux)
and names it to the peer; the peer opens it and rebuilds the value: NumPy
arrays and pandas columns over the segment mapped privately, without a copy;
``bytes`` read into new objects, the one copy Python needs. The memory goes
back to the system when the name is gone and the last mapping with it.

A large result is written as it is made (:func:`publish`) and its name kept
until the result is released, so a peer waits for nothing but a round trip;
the holder's own copy becomes a view of the segment, not a second copy. A
value that was not (a copy fetched from a peer) is written when a peer asks
with arrays in it, and its name removed once the peer has mapped it (or the
hand-off ended some other way).

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

from . import fresh
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
        segment, fd = cls._made(frames)
        os.close(fd)
        return segment

    @classmethod
    def _made(cls, frames: Frames) -> tuple[Segment, int]:
        """A new segment holding ``frames``, and a descriptor open on it."""
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot make {path}: {exc}") from None
        try:
            # write(), not a mapping: a full /dev/shm then says ENOSPC rather
            # than killing the process with SIGBUS.
            _write_all(fd, frames.segments())
        except OSError as exc:
            os.close(fd)
            _unlink(path)
            raise SharedMemoryUnavailable(
                f"cannot write {frames.nbytes} bytes into {path}: {exc}"
            ) from None
        return cls(name, frames.nbytes), fd

    def remove(self) -> None:
        _unlink(SHM_DIR / self.name)


def publish(frames: Frames, min_bytes: int) -> tuple[Frames, Segment] | None:
    """A result with at least ``min_bytes`` in buffers, written into a
    segment as it is made, so a peer on this host maps it the moment it asks;
    and the holder's own frames, whose buffers are now views of that segment
    (mapped privately), so the value is not kept twice: arrays are rebuilt
    over it without a copy, a ``bytes`` copied out when a task here takes it.
    None: nothing worth it, or no room in ``/dev/shm`` (the value stays put).
    """
    if sum(b.nbytes for b in frames.buffers) < min_bytes:
        return None
    try:
        segment, fd = Segment._made(frames)
    except SharedMemoryUnavailable as exc:
        log.info("result kept out of shared memory: %s", exc)
        return None
    try:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mapped = memoryview(mmap.mmap(fd, segment.nbytes, flags=mmap.MAP_PRIVATE, prot=prot))
    except OSError as exc:
        segment.remove()
        log.info("result kept out of shared memory: cannot map it: %s", exc)
        return None
    finally:
        os.close(fd)
    at = frames.head_bytes() + len(frames.pickled)
    buffers = []
    for buffer, readonly in zip(frames.buffers, frames.readonly, strict=True):
        view = mapped[at : at + buffer.nbytes]
        buffers.append(view.toreadonly() if readonly else view)
        at += buffer.nbytes
    own = Frames(frames.pickled, tuple(buffers), frames.readonly, frames.by_id)
    return own, segment


def read(name: str, nbytes: int, *, remove: bool = True) -> Frames:
    """The value in segment ``name`` (made by a peer); the name is removed
    unless the peer keeps it (``remove=False``: a published result's).

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
        if remove:
            _unlink(path)


def write_frames(fd: int, frames: Frames) -> None:
    """``frames``' wire form into the open file ``fd`` (a result spilled to
    disk is kept in the same form a segment holds)."""
    _write_all(fd, frames.segments())


def read_frames(fd: int) -> Frames:
    """The value in the open file ``fd``, as :func:`read` rebuilds a segment's:
    arrays over the file mapped privately, ``bytes`` read into new objects."""
    return _frames_from(fd, os.fstat(fd).st_size)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (whoever's it is)."""
    return _alive(pid)


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
            buffers.append(memoryview(_read_fresh(fd, n, at)))
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


def _read_fresh(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` read straight into a new ``bytes`` (on huge
    pages when large: see :mod:`apportion_common.fresh`)."""
    obj, view = fresh.new_bytes(n)
    got = 0
    while got < n:
        # preadv reads at most about 2 GiB at once: the rest in pieces.
        read = os.preadv(fd, [view[got:]], offset + got)
        if not read:
            raise ValueError(f"a segment cut short at {offset + got} bytes")
        got += read
    view.release()
    return obj if type(obj) is bytes else bytes(obj)


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
