"""The nanny: a parent process that keeps N worker processes alive.

A task that calls ``os._exit`` or crashes the interpreter takes its worker
process down; the nanny starts a fresh one in its place (the scheduler places
the task again, and errs it after its allowed failures). A child that exits
with status 0 was retired or stopped on purpose: it is not started again, and
the nanny ends once none is left. SIGTERM reaches the children as SIGTERM
(each drains, see ``worker_service.retiring``), SIGINT as SIGINT (each stops). The nanny does not
know how a worker is started: its caller gives the command line of worker
``index``, so the command line stays the only place that knows its own flags;
and optionally what to add to its environment (its GPUs, through
``CUDA_VISIBLE_DEVICES``), merged over the nanny's own.

With ``terminate_at`` (bytes: the terminate fraction of each process's memory
limit) it also watches each child's resident memory as it polls them, and
kills one past it (SIGKILL: a process that large may be too stuck to drain),
as Dask's nanny does; the scheduler places its tasks again, and counts the
death towards ``KilledWorker``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

from apportion_common import shm
from apportion_common.process_memory import Resident

from . import spill
from .retiring import RESTART_EXIT_CODE

log = logging.getLogger("worker_service")

#: A child that exits with one of these would fail the same way again (2:
#: refused, bad settings, a name taken, not a scheduler; 77: refused
#: credentials; 75: no scheduler within --death-timeout), or must not be
#: hidden by a restart (70: its books broke, with invariant checks on).
FATAL_EXIT_CODES = frozenset({2, 70, 75, 77})
#: A child that dies younger than this is restarted after a pause (no hot loop).
MIN_LIFETIME_S = 1.0
#: How long stopping waits for a child to leave, past its drain, before SIGKILL.
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
    """Run ``nworkers`` children, ``command(index)`` each, with ``env(index)``
    over this process's environment; restart any that die.

    A child that exits with a status of :data:`FATAL_EXIT_CODES` is not
    restarted: the nanny stops the others and :meth:`run` returns its status.
    """

    def __init__(
        self,
        command: Callable[[int], list[str]],
        nworkers: int,
        drain_timeout: float = 0.0,
        env: Callable[[int], Mapping[str, str]] | None = None,
        terminate_at: int | None = None,
        local_directory: str | None = None,
    ) -> None:
        self._command = command
        self._env = env
        self._nworkers = nworkers
        self._drain_timeout = drain_timeout
        self._started: dict[int, float] = {}
        #: resident bytes past which a child is killed (None: never)
        self._terminate_at = terminate_at
        #: where the children spill: what a dead one left there goes
        self._local_directory = local_directory
        self._memory: dict[int, Resident] = {}
        self.stopping = threading.Event()
        #: the signal that stopped the nanny, passed on to the children
        self._signal = signal.SIGTERM

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        self._started[index] = time.monotonic()
        env = {**os.environ, **(self._env(index) if self._env else {})}
        proc = subprocess.Popen(
            self._command(index), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env
        )
        if self._terminate_at is not None:
            self._memory[index] = Resident(proc.pid)
        return proc

    def stop_on_signals(self) -> None:
        """SIGINT and SIGTERM stop the nanny and its children (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop_on)

    def _stop_on(self, sig: int, _frame: object) -> None:
        self._signal = signal.Signals(sig)
        self.stopping.set()

    def run(self) -> int:
        """Supervise until stopped; returns the exit status for the nanny."""
        children = {i: self._spawn(i) for i in range(self._nworkers)}
        status = 0
        while not self.stopping.wait(0.1):
            for index, proc in list(children.items()):
                code = proc.poll()
                if code is None and not self.stopping.is_set():
                    self._check_memory(index, proc)
                if code is None or self.stopping.is_set():
                    continue
                shm.remove_segments_of(proc.pid)  # what it was handing over when it died
                spill.remove_directories_of(self._local_directory, proc.pid)
                if code == 0:
                    log.info("worker process %d retired", index)
                    del children[index]
                    if not children:
                        return 0
                    continue
                if code == RESTART_EXIT_CODE:
                    log.info("worker process %d restarting, as the scheduler asked", index)
                    children[index] = self._spawn(index)
                    continue
                if code in FATAL_EXIT_CODES:
                    log.error("worker process %d exited with %d; stopping", index, code)
                    status = code
                    self.stopping.set()
                    break
                log.warning("worker process %d exited with %d; restarting it", index, code)
                if time.monotonic() - self._started[index] < MIN_LIFETIME_S:
                    self.stopping.wait(MIN_LIFETIME_S)
                children[index] = self._spawn(index)
        if status == 0:  # stopped by a signal: the children get the same
            drain = self._drain_timeout if self._signal == signal.SIGTERM else 0.0
            _stop(list(children.values()), self._signal, drain, self._local_directory)
        else:  # a child failed for good: the others stop at once
            _stop(list(children.values()), signal.SIGINT, 0.0, self._local_directory)
        return status

    def _check_memory(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        """Kill a child past its terminate fraction (the next poll restarts it)."""
        limit, measure = self._terminate_at, self._memory.get(index)
        if limit is None or measure is None:
            return
        used = measure()
        if used > limit:
            log.warning(
                "worker process %d uses %d MB, past its terminate threshold (%d MB); restarting it",
                index,
                used // 10**6,
                limit // 10**6,
            )
            proc.kill()
            proc.wait()


def _stop(
    children: list[subprocess.Popen[bytes]],
    sig: int,
    drain_timeout: float,
    local_directory: str | None = None,
) -> None:
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + drain_timeout + STOP_TIMEOUT_S
    for proc in children:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shm.remove_segments_of(proc.pid)
        spill.remove_directories_of(local_directory, proc.pid)
