"""The nanny: a parent process that keeps N worker processes alive.

A task that calls ``os._exit`` or crashes the interpreter takes its worker
process down; the nanny starts a fresh one in its place (the scheduler places
the task again, and errs it after its allowed failures). The nanny does not
know how a worker is started: its caller gives the command line of worker
``index``, so the command line stays the only place that knows its own flags.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from apportion_common import shm

log = logging.getLogger("worker_service")

#: A child that exits with one of these would fail the same way again (2:
#: refused, bad settings, a name taken, not a scheduler; 77: refused
#: credentials; 75: no scheduler within --death-timeout), or must not be
#: hidden by a restart (70: its books broke, with invariant checks on).
FATAL_EXIT_CODES = frozenset({2, 70, 75, 77})
#: A child that dies younger than this is restarted after a pause (no hot loop).
MIN_LIFETIME_S = 1.0
#: How long stopping waits for a child to leave after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 10.0


def _die_with_parent() -> None:
    """In a child, before exec: get SIGKILL when the nanny dies, so that a
    killed nanny leaves no worker behind (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class Nanny:
    """Run ``nworkers`` children, ``command(index)`` each; restart any that die.

    A child that exits with a status of :data:`FATAL_EXIT_CODES` is not
    restarted: the nanny stops the others and :meth:`run` returns its status.
    """

    def __init__(self, command: Callable[[int], list[str]], nworkers: int) -> None:
        self._command = command
        self._nworkers = nworkers
        self._started: dict[int, float] = {}
        self.stopping = threading.Event()

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        self._started[index] = time.monotonic()
        return subprocess.Popen(
            self._command(index), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )

    def stop_on_signals(self) -> None:
        """SIGINT and SIGTERM stop the nanny and its children (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())

    def run(self) -> int:
        """Supervise until stopped; returns the exit status for the nanny."""
        children = {i: self._spawn(i) for i in range(self._nworkers)}
        status = 0
        while not self.stopping.wait(0.1):
            for index, proc in list(children.items()):
                code = proc.poll()
                if code is None or self.stopping.is_set():
                    continue
                shm.remove_segments_of(proc.pid)  # what it was handing over when it died
                if code in FATAL_EXIT_CODES:
                    log.error("worker process %d exited with %d; stopping", index, code)
                    status = code
                    self.stopping.set()
                    break
                log.warning("worker process %d exited with %d; restarting it", index, code)
                if time.monotonic() - self._started[index] < MIN_LIFETIME_S:
                    self.stopping.wait(MIN_LIFETIME_S)
                children[index] = self._spawn(index)
        _stop(list(children.values()))
        return status


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in children:
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shm.remove_segments_of(proc.pid)
