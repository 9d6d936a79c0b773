"""``LocalCluster``: a scheduler and worker processes on loopback.

Each process is started the way a user starts it (``apportion scheduler``,
``apportion worker``), so what runs here is what runs on a real cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import grpc

from apportion_common.resources import check_resources, format_resources, spellings
from apportion_common.security import TLS
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from ._transport import client_security

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class LocalCluster:
    """Start a scheduler and ``n_workers`` worker processes on 127.0.0.1.

    Each worker gets ``nthreads`` threads and the full ``resources`` (resources
    are per worker process, as in Dask). ``add_worker`` adds workers with other
    resources.

    ``token`` and ``tls`` (paths, not PEM bytes) are handed to every process
    through the environment, and ``Client(cluster)`` uses them too.
    """

    def __init__(
        self,
        n_workers: int = 1,
        nthreads: int = 1,
        resources: Mapping[str, float | str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: TLS | None = None,
    ) -> None:
        if n_workers < 0 or nthreads < 1:
            raise ValueError("n_workers must be >= 0 and nthreads >= 1")
        self.nthreads = nthreads
        self.resources = check_resources(resources)
        #: the amounts given as text ("64GiB"), handed on as written
        self._resources_text = spellings(resources)
        self.token = token
        self.tls = tls
        # What this object's own calls present: the same, or what the processes
        # will read from the environment they inherit when not given here.
        self._security = client_security(None, token, tls)
        # Through the environment, not argv: other users on the machine see argv.
        self._env = dict(tls.env() if tls is not None else {})
        if token is not None:
            self._env["APPORTION_TOKEN"] = token
        self.workers: list[subprocess.Popen[bytes]] = []
        self.scheduler = _spawn(["scheduler", "--host", host, "--port", str(port)], env=self._env)
        try:
            line = _first_line(self.scheduler, START_TIMEOUT_S)
            self.address = line.rsplit(" ", 1)[-1]
            for _ in range(n_workers):
                self.add_worker(wait=False)
            self.wait_for_workers(n_workers)
        except BaseException:
            self.close()
            raise

    def add_worker(
        self,
        resources: Mapping[str, float | str] | None = None,
        nthreads: int | None = None,
        name: str | None = None,
        *,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start one more worker process (by default with the cluster's settings)."""
        res = self.resources if resources is None else check_resources(resources)
        written = self._resources_text if resources is None else spellings(resources)
        args = ["worker", self.address, "--nthreads", str(nthreads or self.nthreads)]
        args += ["--resources", format_resources(res, written)]
        if name:
            args += ["--name", name]
        proc = _spawn(args, quiet=True, env=self._env)
        self.workers.append(proc)
        if wait:
            self.wait_for_workers(sum(1 for p in self.workers if p.poll() is None))
        return proc

    def wait_for_workers(self, n: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with self._security.sync_channel(self.address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            while True:
                try:
                    state = stub.GetClusterState(
                        pb.GetClusterStateRequest(), timeout=5, metadata=self._security.metadata
                    )
                    if len(state.workers) >= n:
                        return
                except grpc.RpcError:
                    pass
                dead = [p for p in self.workers if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a worker process exited with code {dead[0].returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n} workers did not register within {timeout:g}s")
                time.sleep(0.05)

    def close(self) -> None:
        """Stop workers first (SIGTERM, then SIGKILL after a grace), then the scheduler."""
        _stop_all(self.workers)
        _stop_all([self.scheduler])

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.address} workers={len(self.workers)}>"


def _spawn(
    args: list[str], quiet: bool = False, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    # A local cluster is quiet unless asked (as Dask's silence_logs): warnings
    # and errors still reach stderr.
    env.setdefault("APPORTION_LOG_LEVEL", "WARNING")
    return subprocess.Popen(
        [sys.executable, "-m", "apportion", *args],
        stdout=subprocess.PIPE if not quiet else subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"the scheduler did not start within {timeout:g}s")
    line = proc.stdout.readline().decode().strip()
    if not line:
        raise RuntimeError(f"the scheduler exited with code {proc.wait()}")
    return line


def _stop_all(procs: list[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
