"""``LocalCluster``: a scheduler and worker processes on loopback.

Each process is started the way a user starts it (``apportion scheduler``,
``apportion worker``), so what runs here is what runs on a real cluster.

``resources={"GPU": "auto"}`` (or ``GPU_MEMORY``) lets each worker declare
the GPUs it finds; several workers share this machine's out evenly, each
seeing its own through ``CUDA_VISIBLE_DEVICES``.

What ``config.set`` set in this process reaches the processes (see
:mod:`client_sdk.config`), below the arguments given here.
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

from apportion_common.gpus import auto_label, need_gpus, split_devices, visible_devices_value
from apportion_common.process_memory import check_memory_limit, resolve_memory_limit
from apportion_common.resources import (
    AUTO,
    auto_names,
    check_resources,
    format_resources,
    spellings,
)
from apportion_common.security import TLS
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from ._transport import client_security
from .config import _for_local_cluster

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class LocalCluster:
    """Start a scheduler and ``n_workers`` worker processes on 127.0.0.1.

    Each worker gets ``nthreads`` threads and the full ``resources`` (resources
    are per worker process, as in Dask). ``add_worker`` adds workers with other
    resources.

    Not given, ``nthreads`` and ``resources`` are ``worker.nthreads`` and
    ``worker.resources`` as ``config.set`` set them, else the environment,
    else the configuration file (else 1 thread, no resources); ``host`` and
    ``port`` are ``scheduler.host`` and ``scheduler.port`` as ``config.set``
    set them, else 127.0.0.1 and a free port. The processes read their other
    settings as ``apportion scheduler`` and ``apportion worker`` do, with
    those of ``config.set`` above the environment and the file.

    ``memory_limit`` is each worker process's (not the ``MEMORY`` resource):
    bytes, ``"4GiB"``, 0 for none, or ``"auto"`` (the default, unless
    ``worker.memory_limit`` says otherwise): the machine's memory divided by
    ``n_workers``, as Dask's ``LocalCluster`` divides it.

    ``GPU`` and ``GPU_MEMORY`` may be ``"auto"``: the GPUs are found first
    (none, or a count of workers that does not divide them, raises
    ``ValueError`` before anything starts), and with several workers each
    gets an even share. A worker added later with ``auto`` sees every GPU.

    ``token`` and ``tls`` (paths, not PEM bytes) are handed to every process
    through the environment, and ``Client(cluster)`` uses them too.
    """

    def __init__(
        self,
        n_workers: int = 1,
        nthreads: int | None = None,
        resources: Mapping[str, float | str] | None = None,
        *,
        memory_limit: int | str | None = None,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        tls: TLS | None = None,
    ) -> None:
        configured = _for_local_cluster()  # a bad setting raises here, before anything starts
        if nthreads is None:
            nthreads = configured.nthreads or 1
        if n_workers < 0 or nthreads < 1:
            raise ValueError("n_workers must be >= 0 and nthreads >= 1")
        self.nthreads = nthreads
        given = resources if resources is not None else configured.resources
        self.resources, self._resources_text, self._auto = _split_auto(given)
        #: each worker process's memory limit in bytes (0: none)
        self.memory_limit = _memory_limit(
            memory_limit if memory_limit is not None else configured.memory_limit, n_workers
        )
        # A configured name would be every worker's, and names are unique.
        self._name = configured.worker_name
        # Each first worker's CUDA_VISIBLE_DEVICES (its share), found before anything starts.
        shares = _gpu_shares(self._auto, n_workers)
        self.token = token
        self.tls = tls
        # What this object's own calls present: the same, or what the processes
        # will read from the environment they inherit when not given here.
        self._security = client_security(None, token, tls)
        # Through the environment, not argv: other users on the machine see argv.
        # config.set's settings too: variables rank above the file, and replace
        # the ones inherited; a temporary file would rank below those.
        self._env = {**configured.env, **(tls.env() if tls is not None else {})}
        if token is not None:
            self._env["APPORTION_TOKEN"] = token
        self.workers: list[subprocess.Popen[bytes]] = []
        host = host if host is not None else configured.scheduler_host or "127.0.0.1"
        port = port if port is not None else configured.scheduler_port or 0
        self.scheduler = _spawn(["scheduler", "--host", host, "--port", str(port)], env=self._env)
        try:
            line = _first_line(self.scheduler, START_TIMEOUT_S)
            self.address = line.rsplit(" ", 1)[-1]
            for index in range(n_workers):
                self._start_worker(shares[index] if shares else None)
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
        given = None if resources is None else _split_auto(resources)
        proc = self._start_worker(None, given, nthreads, name)
        if wait:
            self.wait_for_workers(sum(1 for p in self.workers if p.poll() is None))
        return proc

    def _start_worker(
        self,
        visible: str | None,
        given: tuple[dict[str, float], dict[str, str], frozenset[str]] | None = None,
        nthreads: int | None = None,
        name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """A worker process declaring ``given`` (by default the cluster's
        resources) and seeing the GPUs ``visible`` names (None: as we do)."""
        res, written, auto = given or (self.resources, self._resources_text, self._auto)
        # As written ("64GiB"), and auto as auto: the worker finds its own GPUs.
        spec = " ".join([format_resources(res, written), *(f"{n}={AUTO}" for n in sorted(auto))])
        args = ["worker", self.address, "--nthreads", str(nthreads or self.nthreads)]
        # One process each: n_workers counts them, whatever worker.nworkers says.
        args += ["--resources", spec.strip(), "--nworkers", "1"]
        args += ["--memory-limit", str(self.memory_limit)]
        if not name and self._name:
            name = f"{self._name}-{len(self.workers)}"
        if name:
            args += ["--name", name]
        env = self._env if visible is None else {**self._env, "CUDA_VISIBLE_DEVICES": visible}
        proc = _spawn(args, quiet=True, env=env)
        self.workers.append(proc)
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


def _memory_limit(given: int | str, n_workers: int) -> int:
    """Each worker's memory limit in bytes; a bad one raises ``ValueError``."""
    try:
        checked = check_memory_limit(given)
    except ValueError as exc:
        raise ValueError(f"memory_limit {exc}") from None
    # auto: the machine's, shared out among the workers this cluster starts.
    return resolve_memory_limit(checked, max(n_workers, 1))


def _split_auto(
    resources: Mapping[str, float | str] | None,
) -> tuple[dict[str, float], dict[str, str], frozenset[str]]:
    """The amounts, those written as text ("64GiB", handed on as written), and
    the names given as ``auto``; a bad amount raises ``ResourceSpecError``."""
    if not isinstance(resources, Mapping):  # None, or a mistake check_resources names
        return check_resources(resources), {}, frozenset()
    auto = auto_names(resources)
    plain = {k: v for k, v in resources.items() if k not in auto}
    return check_resources(plain), spellings(plain), auto


def _gpu_shares(auto: frozenset[str], n_workers: int) -> list[str] | None:
    """Each worker's ``CUDA_VISIBLE_DEVICES`` where ``auto`` and several workers
    share the GPUs; None where each sees what this process does."""
    if not auto:
        return None
    devices = need_gpus(auto_label(auto))  # none raises here, before anything starts
    if n_workers <= 1:
        return None
    shares = split_devices(devices, n_workers, asked=f"{n_workers} workers")
    return [visible_devices_value(share) for share in shares]


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
