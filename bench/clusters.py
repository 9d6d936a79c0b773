"""Start real apportion and Dask clusters (separate processes on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
#: The repo root, so that every process (Dask's scheduler too) imports
#: bench.workloads by name, the same way for both systems.
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _spawn(
    procs: list[subprocess.Popen[bytes]], args: list[str], extra_env: dict[str, str] | None = None
) -> None:
    env = dict(
        os.environ,
        APPORTION_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        **(extra_env or {}),
    )
    procs.append(
        subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    )


@contextlib.contextmanager
def apportion_cluster(
    workers: list[tuple[int, str]], worker_env: dict[int, dict[str, str]] | None = None
) -> Iterator[Any]:
    """workers: (nthreads, resources) per worker process; worker_env: more
    environment for some of them, by index. Yields a connected Client."""
    from client_sdk import Client

    port = free_port()
    address = f"127.0.0.1:{port}"
    with processes() as procs:
        _spawn(procs, [str(BIN / "apportion"), "scheduler", "--port", str(port)])
        for i, (nthreads, resources) in enumerate(workers):
            args = [
                str(BIN / "apportion"),
                "worker",
                address,
                "--nthreads",
                str(nthreads),
                "--name",
                f"w{i}",
            ]
            if resources:
                args += ["--resources", resources]
            _spawn(procs, args, (worker_env or {}).get(i))
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as probe:
                    if len(probe.scheduler_info()["workers"]) == len(workers):
                        break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("apportion cluster did not start")
            time.sleep(0.2)
        with Client(address) as client:
            yield client


@contextlib.contextmanager
def dask_cluster(workers: list[tuple[int, str]], saturation_inf: bool = False) -> Iterator[Any]:
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env_extra = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "inf"} if saturation_inf else {}
    with processes() as procs:
        old = dict(os.environ)
        os.environ.update(env_extra)
        try:
            _spawn(
                procs,
                [
                    str(BIN / "dask"),
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-dashboard",
                ],
            )
            for i, (nthreads, resources) in enumerate(workers):
                args = [
                    str(BIN / "dask"),
                    "worker",
                    address,
                    "--nthreads",
                    str(nthreads),
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                    "--no-nanny",
                ]
                if resources:
                    args += ["--resources", resources]
                _spawn(procs, args)
        finally:
            os.environ.clear()
            os.environ.update(old)
        client = Client(address, timeout=60)  # type: ignore[no-untyped-call]
        try:
            client.wait_for_workers(len(workers), timeout=60)
            yield client
        finally:
            client.close()  # type: ignore[no-untyped-call]
