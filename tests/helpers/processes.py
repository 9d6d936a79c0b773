"""Real ``apportion`` processes, started as a user starts them, and the waits
and checks the tests make on them. Every process a :class:`Processes` starts
is stopped by :meth:`Processes.stop_all` (the ``processes`` fixture calls it)."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

#: The status a scheduler or worker exits with when a check of its books fails.
INVARIANT_EXIT_CODE = 70
APPORTION = str(Path(sys.executable).parent / "apportion")
START_TIMEOUT = 30.0


def cluster_state(address: str) -> pb.ClusterState:
    with grpc.insecure_channel(address) as channel:
        state: pb.ClusterState = pb_grpc.SchedulerStub(channel).GetClusterState(
            pb.GetClusterStateRequest(), timeout=10
        )
        return state


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def until(
    predicate: Callable[[], object],
    what: str = "condition",
    timeout: float = 5.0,
    interval: float = 0.002,
) -> None:
    """:func:`wait_for` on an event loop: poll, letting the loop run meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_for_workers(address: str, n: int, timeout: float = START_TIMEOUT) -> None:
    wait_for(lambda: len(cluster_state(address).workers) >= n, timeout, f"{n} workers")


def assert_all_released(address: str, timeout: float = 15.0) -> None:
    """Every worker's used resources and running count back to exactly zero."""

    def idle() -> bool:
        state = cluster_state(address)
        return all(
            w.running == 0 and all(v == 0 for v in w.used_resources.values()) for w in state.workers
        )

    try:
        wait_for(idle, timeout, "resources to be released")
    except TimeoutError:
        raise AssertionError(f"resources still held: {cluster_state(address)}") from None


class Processes:
    """Starts ``apportion`` commands and stops them all at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, capture: bool = False
    ) -> subprocess.Popen[bytes]:
        # Every scheduler and worker a test starts checks its books after every
        # event (and exits with INVARIANT_EXIT_CODE on a fault: stop_all fails then).
        full_env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            APPORTION_SCHEDULER__CHECK_INVARIANTS="1",
            APPORTION_WORKER__CHECK_INVARIANTS="1",
            # No dashboard unless a test asks for one (--dashboard-address): aiohttp's
            # start-up costs each of the suite's many schedulers a fifth of a second
            # of CPU.
            APPORTION_SCHEDULER__DASHBOARD="0",
        )
        if env:
            full_env.update(env)
        proc = subprocess.Popen(
            [APPORTION, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture else None,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
        self.procs.append(proc)
        return proc

    def scheduler(self, *args: str) -> str:
        proc = self.start("scheduler", "--port", "0", *args)
        line = read_line(proc, START_TIMEOUT)
        assert "listening on" in line, line
        return line.rsplit(" ", 1)[-1]

    def worker(
        self, address: str, *args: str, env: dict[str, str] | None = None, wait: bool = True
    ) -> subprocess.Popen[bytes]:
        # Wait for a worker id not seen before (ids only grow): counting workers
        # races with one that leaves meanwhile (a frozen one declared lost).
        seen = max((w.worker_id for w in cluster_state(address).workers), default=0)
        if "--nthreads" not in args and "APPORTION_WORKER__NTHREADS" not in (env or {}):
            # The tests were written for one thread; the default is the cores.
            args = (*args, "--nthreads", "1")
        proc = self.start("worker", address, *args, env=env)
        if wait:
            wait_for(
                lambda: any(w.worker_id > seen for w in cluster_state(address).workers),
                START_TIMEOUT,
                "the worker to register",
            )
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        broken = [p.args for p in self.procs if p.returncode == INVARIANT_EXIT_CODE]
        assert not broken, f"these processes found their books broken (status 70): {broken}"


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"{proc.args} printed nothing within {timeout}s")
    return proc.stdout.readline().decode().strip()


def run_apportion(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``apportion ARGS...`` to the end (a command that must exit on its own)."""
    return subprocess.run(
        [APPORTION, *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, **(env or {})),
    )
