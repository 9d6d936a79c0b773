"""Logs at hand and ``status --watch``, with real processes: a task's own
logger reaches its worker's ring, clients and ``apportion logs`` read it
(and the scheduler's own lines), the ring keeps what it is told to, and
``apportion status --watch`` redraws until Ctrl-C."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Callable

from client_sdk import Client, get_task_context
from tests.helpers.processes import APPORTION, Processes, run_apportion

#: Seconds the watch tests wait for what they expect to be drawn.
DRAW_TIMEOUT_S = 20.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def log_through_own_logger(marker: str, times: int = 1) -> str:
    """A task that logs as user code does; returns where it ran."""
    log = logging.getLogger("mytask")
    for i in range(times):
        log.warning("%s line %d", marker, i)
    return get_task_context().worker_address


def test_a_tasks_own_log_lines_reach_its_workers_logs(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "alpha")
    processes.worker(scheduler_address, "--name", "beta")
    marker = f"marker-{uuid.uuid4().hex}"
    with Client(scheduler_address) as client:
        where = client.submit(log_through_own_logger, marker, workers=["alpha"]).result(30)
        by_address = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        assert where == by_address["alpha"]

        logs = client.get_worker_logs()
        assert set(logs) == set(by_address.values())
        (found,) = [(level, line) for level, line in logs[where] if marker in line]
        assert found[0] == "WARNING"
        assert re.search(rf" WARNING mytask: {marker} line 0$", found[1]), found
        assert not any(marker in line for _, line in logs[by_address["beta"]])
        assert logs[where][-1] == found  # nothing logged after it meanwhile
        assert client.get_worker_logs(n=1, workers="alpha") == {where: [found]}

        scheduler_lines = client.get_scheduler_logs(n=None)
        assert any(
            line.endswith(f"scheduler_service: scheduler listening on {scheduler_address}")
            for _, line in scheduler_lines
        ), scheduler_lines
        assert len(client.get_scheduler_logs(n=2)) == 2

    for named in ("alpha", where):
        shown = run_apportion("logs", scheduler_address, named)
        assert shown.returncode == 0, shown
        assert f"WARNING mytask: {marker} line 0" in shown.stdout
    shown = run_apportion("logs", scheduler_address, "-n", "1000")
    assert shown.returncode == 0, shown
    assert f"scheduler listening on {scheduler_address}" in shown.stdout
    assert marker not in shown.stdout  # the scheduler's own lines, not the worker's

    unknown = run_apportion("logs", scheduler_address, "nobody")
    assert unknown.returncode != 0
    assert unknown.stderr.strip().splitlines() == [
        f"apportion: error: no worker 'nobody' at {scheduler_address}"
    ]


def test_a_worker_keeps_as_many_lines_as_it_is_told_from_info_up(
    processes: Processes, scheduler_address: str
) -> None:
    # stderr quieted to WARNING, as a LocalCluster does: the ring still keeps INFO.
    env = {"APPORTION_WORKER__LOG_LINES": "5", "APPORTION_LOG_LEVEL": "WARNING"}
    processes.worker(scheduler_address, "--name", "small", env=env)
    marker = f"marker-{uuid.uuid4().hex}"
    with Client(scheduler_address) as client:
        (before,) = client.get_worker_logs().values()
        assert [level for level, line in before if "registered with" in line] == ["INFO"]
        where = client.submit(log_through_own_logger, marker, 20).result(30)
        (lines,) = client.get_worker_logs(n=None).values()
        assert lines == client.get_worker_logs(n=None, workers=[where])[where]
    assert [line.rsplit(" ", 1)[-1] for _, line in lines] == ["15", "16", "17", "18", "19"]


def _read_until(
    fd: int, done: Callable[[str], bool], proc: subprocess.Popen[bytes], what: str
) -> str:
    """What the command printed on ``fd`` until ``done(everything so far)``."""
    seen = b""
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    while not done(seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {what} within {DRAW_TIMEOUT_S}s: {seen!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            seen += os.read(fd, 65536)
    return seen.decode(errors="replace")


def test_status_watch_redraws_on_a_terminal_until_ctrl_c(
    processes: Processes, scheduler_address: str
) -> None:
    title = f"apportion scheduler {scheduler_address}"
    primary, secondary = pty.openpty()
    # An 80-column terminal: the width the table must fit.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    watch = subprocess.Popen(
        [APPORTION, "status", scheduler_address, "--watch"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=dict(env, TERM="xterm"),
    )
    os.close(secondary)
    try:
        first = _read_until(primary, lambda s: "no workers connected" in s, watch, "first view")
        assert title in first
        processes.worker(scheduler_address, "--name", "late-joiner")
        # Redrawn in place (cursor moved back up), now with the worker that joined.
        drawn = _read_until(primary, lambda s: "late-joiner" in s, watch, "redraw")
        assert "\x1b[" in drawn
        drawn += _read_until(primary, lambda s: s.count(title) >= 1, watch, "another redraw")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        os.close(primary)
    with Client(scheduler_address) as client:
        ((address, _),) = client.scheduler_info()["workers"].items()
    rows = [ANSI.sub("", line) for line in drawn.splitlines() if "late-joiner" in line]
    assert rows and all(row.split()[:2] == ["late-joiner", address] for row in rows), rows


def test_status_watch_into_a_pipe_prints_each_view_until_ctrl_c(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "alpha", "--resources", "MEMORY=100GB")
    title = f"apportion scheduler {scheduler_address}"
    watch = subprocess.Popen(
        [APPORTION, "status", scheduler_address, "--watch"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert watch.stdout is not None
        started = time.monotonic()
        views = _read_until(watch.stdout.fileno(), lambda s: s.count(title) >= 2, watch, "views")
        assert time.monotonic() - started >= 0.9  # one second apart, not all at once
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err
    assert err == b""
    assert "alpha" in views and "\x1b[" not in views
    assert views.count("MEMORY 0/100GB") >= 2  # as written, in every view
