"""Large results between worker processes on one host go through shared memory.

Real scheduler and worker processes. A watcher thread lists ``/dev/shm``
every half millisecond for the producer's segments: seeing one is the proof
that the hand-off went that way, and the moment to kill a process in the
middle of it. Afterwards no segment is left, whichever process died.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from apportion_common import shm
from apportion_common.host import host_id
from client_sdk import Client
from tests.helpers.processes import Processes, assert_all_released, cluster_state, wait_for

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here")

MB = 1000 * 1000


def make_blob(nbytes: int, seed: int) -> tuple[Any, dict[str, int]]:
    """The shape results usually have: a large array and a little metadata."""
    import numpy as np

    return np.full(nbytes // 8, float(seed)), {"seed": seed}


def make_bytes(nbytes: int) -> bytes:
    return b"b" * nbytes


def describe(value: tuple[Any, dict[str, int]]) -> tuple[str, int, float, int]:
    data, meta = value
    data[0] = -1.0  # writable, as it was made
    return type(data).__name__, int(data.nbytes), float(data[-1]), meta["seed"]


def maps_segment_of(value: object, pid: int) -> bool:
    """Whether this process maps a segment of process ``pid`` while it holds
    ``value``: the proof that the value came through shared memory."""
    del value
    with open("/proc/self/maps") as maps:
        return any(f"/dev/shm/{shm.PREFIX}{pid}-" in line for line in maps)


def segments_of(pids: set[int]) -> list[str]:
    prefixes = tuple(f"{shm.PREFIX}{pid}-" for pid in pids)
    try:
        return [name for name in os.listdir(shm.SHM_DIR) if name.startswith(prefixes)]
    except FileNotFoundError:
        return []


class Watcher:
    """Lists /dev/shm for ``pid``'s segments until stopped; ``on_seen`` runs once."""

    def __init__(self, pid: int, on_seen: Callable[[], None] | None = None) -> None:
        self.pid = pid
        self.seen: list[str] = []
        self._on_seen = on_seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            found = segments_of({self.pid})
            if found:
                self.seen.extend(found)
                if self._on_seen is not None:
                    self._on_seen()
                    self._on_seen = None
            time.sleep(0.0005)


def pid_of(address: str, name: str) -> int:
    pid = next(w.pid for w in cluster_state(address).workers if w.name == name)
    assert pid > 1, f"worker {name} reported no pid"
    return pid


def start_cluster(processes: Processes, consumer_env: dict[str, str] | None = None) -> str:
    address = processes.scheduler()
    processes.worker(address, "--name", "producer", "--resources", "PRODUCER=1")
    processes.worker(address, "--name", "consumer", "--resources", "CONSUMER=1", env=consumer_env)
    return address


def test_a_large_result_reaches_a_worker_on_the_same_host_through_shared_memory(
    processes: Processes,
) -> None:
    address = start_cluster(processes)
    producer = pid_of(address, "producer")
    with Client(address) as client, Watcher(producer) as watcher:
        blob = client.submit(make_blob, 64 * MB, 7, resources={"PRODUCER": 1})
        used = client.submit(describe, blob, resources={"CONSUMER": 1})
        assert used.result(timeout=60) == ("ndarray", 64 * MB, 7.0, 7)
        mapped = client.submit(maps_segment_of, blob, producer, resources={"CONSUMER": 1})
        assert mapped.result(timeout=60), "the consumer does not map the producer's segment"
        # A small one travels as before: inline, or in one stream.
        small = client.submit(make_blob, 1000, 8, resources={"PRODUCER": 1})
        assert client.submit(describe, small, resources={"CONSUMER": 1}).result(30)[1] == 1000
        assert watcher.seen, "the result was never written into a shared-memory segment"
        del blob, used, mapped
        # Released: its segment goes with it (the consumer's mapping may live on).
        wait_for(lambda: not segments_of({producer}), 10, "the segment to be removed")
    # Bytes too: the consumer copies them out of the segment into its own bytes.
    with Client(address) as client, Watcher(producer) as watcher:
        blob = client.submit(make_bytes, 32 * MB, resources={"PRODUCER": 1})
        assert client.submit(len, blob, resources={"CONSUMER": 1}).result(timeout=60) == 32 * MB
        assert blob.result(timeout=60) == b"b" * 32 * MB  # the client's copy, over gRPC
    assert watcher.seen
    wait_for(lambda: not segments_of({producer}), 10, "the segment to be removed")
    assert_all_released(address)


def test_without_shared_memory_the_same_result_streams_over_grpc(processes: Processes) -> None:
    address = start_cluster(processes, {"APPORTION_WORKER__SHARED_MEMORY": "false"})
    producer = pid_of(address, "producer")
    with Client(address) as client, Watcher(producer) as watcher:
        blob = client.submit(make_blob, 16 * MB, 9, resources={"PRODUCER": 1})
        used = client.submit(describe, blob, resources={"CONSUMER": 1})
        assert used.result(timeout=60) == ("ndarray", 16 * MB, 9.0, 9)
        mapped = client.submit(maps_segment_of, blob, producer, resources={"CONSUMER": 1})
        assert not mapped.result(timeout=60)
    # The producer has no peer on its host that takes shared memory: it never
    # wrote a segment, not even as it made the value.
    assert watcher.seen == []


@pytest.mark.parametrize("victim", ["producer", "consumer"])
def test_killing_either_worker_mid_hand_off_leaves_no_segment_and_loses_nothing(
    processes: Processes, victim: str
) -> None:
    address = start_cluster(processes)
    pids = {name: pid_of(address, name) for name in ("producer", "consumer")}
    killed: list[int] = []

    def kill() -> None:
        os.kill(pids[victim], signal.SIGKILL)
        killed.append(pids[victim])

    with Client(address) as client:
        # The kill must land while a segment exists: try a few fresh values.
        for attempt in range(4):
            with Watcher(pids["producer"], kill) as watcher:
                blob = client.submit(
                    make_blob, 200 * MB, attempt, resources={"PRODUCER": 1}, pure=False
                )
                used = client.submit(describe, blob, resources={"CONSUMER": 1}, pure=False)
                # Whatever died, the nanny restarts it and the work is done again.
                assert used.result(timeout=90) == ("ndarray", 200 * MB, float(attempt), attempt)
            del blob, used
            if watcher.seen and killed:
                break
            wait_for(lambda: len(cluster_state(address).workers) == 2, 30, "both workers")
            pids = {name: pid_of(address, name) for name in ("producer", "consumer")}
        assert killed, "never caught a hand-off in the act"
    everyone = {*killed, *(w.pid for w in cluster_state(address).workers)}
    wait_for(lambda: not segments_of(everyone), 15, "every segment to be removed")
    assert not segments_of({*pids.values()})
    assert_all_released(address)


def test_a_process_in_another_network_namespace_is_another_host() -> None:
    """What the cross-host (network namespace) tests rely on: values between
    namespaces stream over gRPC, because their workers' host ids differ."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    ns = f"apportion-hostid-{os.getpid()}"
    made = subprocess.run([ip or "ip", "netns", "add", ns], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        code = "from apportion_common.host import host_id; print(host_id())"
        here = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
        )
        there = subprocess.run(
            [ip or "ip", "netns", "exec", ns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert here.stdout.strip() == host_id()  # another process on this host: the same
        assert there.stdout.strip() not in ("", host_id())
    finally:
        subprocess.run([ip or "ip", "netns", "del", ns], capture_output=True, timeout=15)
