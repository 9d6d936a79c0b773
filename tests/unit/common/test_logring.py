"""The ring of last log lines: what it keeps, how lines read, the root logger
it hangs from, and the GetLogs messages made of it."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator

import pytest

from apportion_common import logs_pb
from apportion_common.logring import (
    MAX_LINE_CHARS,
    LogLine,
    LogRing,
    install_log_ring,
    kept_lines,
    process_log_ring,
)

#: "2026-01-31 12:00:00,123 WARNING mytask: message"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>\S+): ")


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of its own that passes INFO, to hang rings from."""
    log = logging.getLogger("test_logring.task")
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield log
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)


@pytest.fixture
def root_without_ring() -> Iterator[logging.Logger]:
    """The root logger, its ring (if a test installs one) taken off again."""
    root = logging.getLogger()
    assert process_log_ring() is None
    try:
        yield root
    finally:
        ring = process_log_ring()
        if ring is not None:
            root.removeHandler(ring)


def test_lines_read_time_level_logger_and_message(logger: logging.Logger) -> None:
    ring = LogRing(10)
    logger.addHandler(ring)
    logger.warning("disk %s is %d%% full", "sda", 93)
    (line,) = ring.lines()
    assert line.level == "WARNING"
    match = LINE.match(line.text)
    assert match, line.text
    assert match["level"] == "WARNING" and match["name"] == "test_logring.task"
    assert line.text.endswith(": disk sda is 93% full")


def test_keeps_the_newest_lines_oldest_first(logger: logging.Logger) -> None:
    ring = LogRing(3)
    logger.addHandler(ring)
    logger.info("line 0")
    assert [line.text[-6:] for line in ring.lines()] == ["line 0"]
    for i in range(1, 10):
        logger.info("line %d", i)
    assert [line.text[-6:] for line in ring.lines()] == ["line 7", "line 8", "line 9"]
    assert [line.text[-6:] for line in ring.lines(2)] == ["line 8", "line 9"]
    assert [line.text[-6:] for line in ring.lines(50)] == ["line 7", "line 8", "line 9"]
    assert ring.lines(0) == []
    with pytest.raises(ValueError, match="-1"):
        ring.lines(-1)


def test_a_traceback_is_part_of_its_line_and_a_huge_line_is_cut(logger: logging.Logger) -> None:
    ring = LogRing(10)
    logger.addHandler(ring)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("it failed")
    logger.error("x" * (MAX_LINE_CHARS * 3))
    failed, huge = ring.lines()
    assert failed.level == "ERROR"
    assert "it failed\nTraceback (most recent call last):" in failed.text
    assert failed.text.rstrip().endswith("ZeroDivisionError: division by zero")
    assert len(huge.text) < MAX_LINE_CHARS + 100
    assert huge.text.endswith("more characters)")


def test_a_ring_of_zero_keeps_nothing(logger: logging.Logger) -> None:
    ring = LogRing(0)
    logger.addHandler(ring)
    logger.warning("gone")
    assert ring.lines() == []
    with pytest.raises(ValueError):
        LogRing(-1)


def test_reading_while_threads_log_sees_whole_lines(logger: logging.Logger) -> None:
    ring = LogRing(50)
    logger.addHandler(ring)
    stop = threading.Event()

    def chatter(n: int) -> None:
        for i in range(2000):
            if stop.is_set():
                return
            logger.info("thread %d line %d", n, i)

    threads = [threading.Thread(target=chatter, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):  # a copy that raced an append would raise here
            assert all(LINE.match(line.text) for line in ring.lines())
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(ring.lines()) == 50


def test_install_hangs_one_ring_on_the_root_logger(
    root_without_ring: logging.Logger, logger: logging.Logger
) -> None:
    assert kept_lines(None) == []  # no ring: GetLogs answers nothing
    ring = install_log_ring(5)
    assert process_log_ring() is ring
    assert install_log_ring(5) is ring  # once per process
    assert sum(isinstance(h, LogRing) for h in root_without_ring.handlers) == 1
    task_log = logging.getLogger("test_logring.mytask")  # a task's own logger
    task_log.warning("from the task")
    assert kept_lines(None)[-1].text.endswith("test_logring.mytask: from the task")
    for i in range(10):
        task_log.warning("w%d", i)
    assert install_log_ring(2) is ring  # a smaller ring keeps the newest
    assert [line.text[-2:] for line in kept_lines(None)] == ["w8", "w9"]
    own = LogRing(4)
    assert kept_lines(own) == []  # a ring given wins over the process's


def test_logs_messages_both_ways_and_the_reply_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not logs_pb.logs_request(None).HasField("n")
    assert logs_pb.lines_wanted(logs_pb.logs_request(None)) is None
    assert logs_pb.lines_wanted(logs_pb.logs_request(0)) == 0
    assert logs_pb.lines_wanted(logs_pb.logs_request(7)) == 7
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="n must be"):
            logs_pb.logs_request(bad)  # type: ignore[arg-type]
    lines = [LogLine("INFO", "a" * 10), LogLine("WARNING", "b" * 10), LogLine("ERROR", "c" * 10)]
    assert logs_pb.lines_from_pb(logs_pb.logs_reply(lines)) == lines
    monkeypatch.setattr(logs_pb, "MAX_REPLY_CHARS", 25)
    assert logs_pb.lines_from_pb(logs_pb.logs_reply(lines)) == lines[1:]  # the newest that fit
