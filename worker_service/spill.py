"""Results spilled to the worker's local disk: one file each, in a directory
of the worker process's own.

A file holds a result's wire form (as a shared-memory segment does, see
:mod:`apportion_common.shm`), so reading it back rebuilds the value the
same way: arrays over the file mapped privately, ``bytes`` read into new
objects. The directory is made under ``--local-directory`` (the system's
temp directory by default) and named after the process
(``apportion-worker-<pid>-<random>``): the worker removes it when it closes,
its nanny when it dies, and any worker starting removes those of processes
that no longer exist.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from apportion_common import shm
from apportion_common.frames import Frames

log = logging.getLogger("worker_service")

PREFIX = "apportion-worker-"
_NAME = re.compile(rf"{PREFIX}(\d+)-\w+")


class SpillDirectory:
    """Where one worker process writes the results it spills. Made on first use."""

    def __init__(self, parent: Path | str | None = None) -> None:
        #: the directory to make ours in (None: the system's temp directory)
        self.parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        self.path: Path | None = None
        self._names = itertools.count(1)

    def write(self, frames: Frames) -> Path:
        """A new file holding ``frames`` (raises OSError: the disk is full...)."""
        if self.path is None:
            self.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.parent))
        path = self.path / str(next(self._names))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            shm.write_frames(fd, frames)
        except OSError:
            os.close(fd)
            remove(path)
            raise
        os.close(fd)
        return path

    def close(self) -> None:
        """Remove the directory and every file left in it."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def open_spilled(path: Path) -> int:
    """A descriptor on a spilled file: it reads on even if the file is removed
    meanwhile (the result released while a peer is being sent it)."""
    return os.open(path, os.O_RDONLY)


def read_spilled(fd: int) -> Frames:
    """The value in the file open on ``fd``; closes ``fd``."""
    try:
        return shm.read_frames(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove spilled result %s: %s", path, exc)


def remove_directories_of(parent: Path | str | None, pid: int) -> int:
    """Remove what process ``pid`` spilled under ``parent`` (it died); how many
    directories."""
    return _remove(parent, lambda owner: owner == pid)


def remove_orphans(parent: Path | str | None) -> int:
    """Remove what processes that no longer exist spilled under ``parent``."""
    return _remove(parent, lambda owner: not shm.alive(owner))


def _remove(parent: Path | str | None, whose: Callable[[int], bool]) -> int:
    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    removed = 0
    try:
        entries = list(os.scandir(where))
    except OSError:
        return 0
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and whose(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d spill directories left behind in %s", removed, where)
    return removed
