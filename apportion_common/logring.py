"""A process's last log lines, kept in memory for ``client.get_worker_logs()``,
``client.get_scheduler_logs()`` and ``apportion logs``.

:class:`LogRing` is a :class:`logging.Handler` with one job: keep the newest
``maxlen`` records as formatted lines (time, level, logger, message), oldest
first. :func:`install_log_ring` attaches one to the root logger of the
process (the scheduler's and each worker's command does, as it sets up
logging), so records of every logger reach it, a task's own
(``logging.getLogger("mytask").warning(...)``) included;
:func:`process_log_ring` finds it again for the GetLogs calls.

Lines are formatted as they arrive rather than kept as records: a record
holds its arguments, and a task's arguments may be large.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import NamedTuple

#: Lines kept when no setting says otherwise (as Dask's log_length).
DEFAULT_LOG_LINES = 10_000
#: Characters kept of one line: one huge message must not fill the ring's memory.
MAX_LINE_CHARS = 10_000
#: The same layout as the lines on stderr (apportion.cli.options.setup_logging).
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogLine(NamedTuple):
    """One kept record: its level's name and the formatted line (a traceback,
    if the record had one, is part of the line)."""

    level: str
    text: str


class LogRing(logging.Handler):
    """The newest ``maxlen`` log lines, oldest first."""

    def __init__(self, maxlen: int = DEFAULT_LOG_LINES, level: int = logging.NOTSET) -> None:
        if maxlen < 0:
            raise ValueError(f"a log ring keeps >= 0 lines, not {maxlen}")
        super().__init__(level)
        self.setFormatter(logging.Formatter(LINE_FORMAT))
        self._lines: deque[LogLine] = deque(maxlen=maxlen)

    @property
    def maxlen(self) -> int:
        return self._lines.maxlen or 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if len(text) > MAX_LINE_CHARS:
            cut = len(text) - MAX_LINE_CHARS
            text = f"{text[:MAX_LINE_CHARS]}... ({cut} more characters)"
        # handle() holds the handler's lock here, as lines() does while copying.
        self._lines.append(LogLine(record.levelname, text))

    def lines(self, n: int | None = None) -> list[LogLine]:
        """The newest ``n`` lines (all kept when None), oldest first."""
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        # Under the lock: copying a deque another thread appends to can fail.
        with self.lock:  # type: ignore[union-attr]  # createLock() set it in __init__
            kept = list(self._lines)
        if n is None:
            return kept
        return kept[len(kept) - n :] if n else []


class LogsUnavailable(Exception):
    """A process did not give its lines; the message says why, in one line.
    ``timed_out``: it did not answer in time (rather than refusing or being gone)."""

    def __init__(self, why: str, timed_out: bool = False) -> None:
        super().__init__(why)
        self.timed_out = timed_out


def process_log_ring() -> LogRing | None:
    """The ring on the root logger, if :func:`install_log_ring` put one there."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogRing):
            return handler
    return None


def install_log_ring(maxlen: int = DEFAULT_LOG_LINES) -> LogRing:
    """The process's ring on the root logger: made and attached on the first
    call, the same one after (keeping ``maxlen`` lines from then on)."""
    ring = process_log_ring()
    if ring is None:
        ring = LogRing(maxlen)
        logging.getLogger().addHandler(ring)
    elif ring.maxlen != maxlen:
        with ring.lock:  # type: ignore[union-attr]  # createLock() set it in __init__
            ring._lines = deque(ring._lines, maxlen=maxlen)
    return ring


def kept_lines(ring: LogRing | None, n: int | None = None) -> list[LogLine]:
    """The newest ``n`` lines of ``ring``, else of the process's ring (none
    if it has none), as the GetLogs calls answer."""
    if ring is None:
        ring = process_log_ring()
    return [] if ring is None else ring.lines(n)
