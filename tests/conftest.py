"""Fixtures: real apportion processes started as a user starts them, and
in-process servers on port 0 for narrower tests. The harnesses themselves are
in :mod:`tests.helpers`; this file only hands them to tests.

Every process a test starts is stopped by the fixture that started it, and
after every end-to-end test each worker's used resources must be back to zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import tests
from apportion_common import config_file
from scheduler_service import SchedulerServer
from tests.helpers.processes import Processes, assert_all_released
from tests.helpers.worker_service_server import serving
from worker_service.store import ResultStore

# Worker processes cannot import the test modules, so functions defined in
# tests travel by value, as a user's __main__ functions do.
cloudpickle.register_pickle_by_value(tests)


@pytest.fixture(autouse=True)
def no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's ~/.config/apportion or /etc/apportion file:
    the processes it starts inherit an empty one, and this one looks nowhere
    (even where a test clears the APPORTION_* variables)."""
    monkeypatch.setenv(config_file.CONFIG_ENV, os.devnull)
    monkeypatch.setattr(config_file, "search_paths", lambda: ())


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def scheduler_address(processes: Processes) -> Iterator[str]:
    """A real ``apportion scheduler`` process; resources must be free at the end."""
    address = processes.scheduler()
    yield address
    assert_all_released(address)
    scheduler = processes.procs[0]
    assert scheduler.poll() is None, f"the scheduler died with status {scheduler.returncode}"


@pytest.fixture
async def scheduler_server() -> AsyncIterator[SchedulerServer]:
    """An in-process scheduler on port 0 that validates its books after every event."""
    server = SchedulerServer("127.0.0.1", 0, validate=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)
        server.servicer.state.validate()


@pytest.fixture
async def worker_server() -> AsyncIterator[tuple[ResultStore, str]]:
    """A Worker service (FetchResult, ShareResult) on port 0 over a store the test fills."""
    store = ResultStore()
    async with serving(store) as address:
        yield store, address


def _grpcurl() -> str:
    return str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture
def grpcurl() -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=60
        )

    return run


@pytest.fixture
def grpcurl_tls() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The real grpcurl without -plaintext: pass -cacert/-cert/-key (or -plaintext) yourself."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_grpcurl(), *args], capture_output=True, text=True, timeout=60)

    return run


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        if "e2e" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.e2e)
